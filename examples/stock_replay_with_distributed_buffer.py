"""Avalanche's stock ReplayPlugin with a DistributedRehearsalBuffer as its storage policy.

    python examples/stock_replay_with_distributed_buffer.py
    torchrun --nproc-per-node=2 examples/stock_replay_with_distributed_buffer.py

Used this way the buffer is updated once per experience (``post_adapt``): each rank inserts
its share of the experience into its shard (M / N samples per rank instead of Avalanche's
M on every rank) and ``ReplayPlugin`` replays from the rank's own shard. For globally
sampled, per-step replay use ``DistributedReplayPlugin`` (see train_distributed.py).

Avalanche 0.6's ``ReplayPlugin`` calls the deprecated ``ExemplarsBuffer.update`` after every
experience, and the ``@deprecated`` decorator re-enables ``DeprecationWarning`` for the
whole process before it warns, so no filter set up front holds it back: training runs
inside the main job's ``no_deprecation_warnings()``, which collects the warnings raised in
the block, drops the ``DeprecationWarning``\ s and shows any other.
"""

from __future__ import annotations

import os
import warnings

import torch

from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin  # before the process group
from avalanche.training.supervised import Naive

from avalanche_distributed_rehearsal import DistributedRehearsalBuffer
from avalanche_distributed_rehearsal.app.data import digits_benchmark, load_digits
from avalanche_distributed_rehearsal.app.stock import no_deprecation_warnings
from avalanche_distributed_rehearsal.integration.metrics import BufferSize

MEM_SIZE = 200


def main() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))

    bm = digits_benchmark()
    _, test, _ = load_digits(seed=0)  # the benchmark's test split, as one TensorDataset

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    policy = DistributedRehearsalBuffer(max_size=MEM_SIZE, sampling="class_balanced", seed=0)
    replay = ReplayPlugin(mem_size=MEM_SIZE, batch_size_mem=32, storage_policy=policy)
    warnings.filterwarnings("ignore", message="No loggers specified")  # we read the metrics
    evaluator = EvaluationPlugin(BufferSize("global"), BufferSize("local"), loggers=[])
    strategy = Naive(model=model,
                     optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=10,
                     device="cpu", plugins=[replay], evaluator=evaluator, eval_every=-1)
    try:
        for exp in bm.train_stream:
            with no_deprecation_warnings():  # ReplayPlugin's deprecated update()
                strategy.train(exp, eval_streams=[])
        sizes = {k.split("/")[0]: v for k, v in evaluator.get_last_metrics().items()}
    finally:
        policy.close()

    net = getattr(model, "module", model).eval()
    with torch.no_grad():
        xs, ys = test.tensors
        acc = (net(xs).argmax(1) == ys).float().mean().item()
    if rank == 0:
        print(f"world {world}: test accuracy {acc * 100:.1f}% | buffer: "
              f"{sizes['Buffer_GlobalSize_Exp']} samples in all, "
              f"{sizes['Buffer_LocalSize_Exp']} on rank 0")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
