"""Class-incremental digits with DistributedReplayPlugin, on 1..N ranks.

    python examples/train_distributed.py                                  # one process
    torchrun --nproc-per-node=2 examples/train_distributed.py             # 2 ranks, one machine
    torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d \\
        --rdzv-endpoint=HEAD:29500 --rdzv-id=adr examples/train_distributed.py   # see multinode/

Each rank trains a DDP replica on its share of every experience (Avalanche's loaders shard
the data over ranks) and keeps M / N samples of the global buffer; representatives are
drawn from the union of all shards every step. Buffer metrics go to Avalanche's
interactive logger on rank 0. Prints the final accuracy on every experience.
"""

from __future__ import annotations

import argparse
import os

import torch

# Import Avalanche before creating the process group: it builds a logger at import time,
# which it refuses to do on a non-main rank once the group exists.
from avalanche.logging import InteractiveLogger
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.supervised import Naive

from avalanche_distributed_rehearsal import DistributedReplayPlugin
from avalanche_distributed_rehearsal.app.data import digits_benchmark
from avalanche_distributed_rehearsal.integration.metrics import buffer_metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mem-size", type=int, default=200, help="global budget M")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")  # env:// from torchrun
    rank = torch.distributed.get_rank() if world > 1 else 0
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))

    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    plugin = DistributedReplayPlugin(mem_size=args.mem_size, batch_size_mem=args.batch_size,
                                     sampling="class_balanced", seed=args.seed)
    evaluator = EvaluationPlugin(*buffer_metrics(every="epoch", class_counts=False),
                                 loggers=[InteractiveLogger()] if rank == 0 else [])
    strategy = Naive(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                     torch.nn.CrossEntropyLoss(), train_mb_size=args.batch_size,
                     train_epochs=args.epochs, device="cpu", plugins=[plugin],
                     evaluator=evaluator, eval_every=-1)
    bm = digits_benchmark(seed=args.seed)
    try:
        for exp in bm.train_stream:
            strategy.train(exp, eval_streams=[])
    finally:
        plugin.close()

    net = getattr(model, "module", model)
    net.eval()
    with torch.no_grad():  # every rank holds the same weights; evaluate on rank 0 only
        accs = []
        for exp in bm.test_stream:
            x, y = zip(*[(s[0], s[1]) for s in exp.dataset])
            accs.append((net(torch.stack(x)).argmax(1) == torch.tensor(y)).float().mean().item())
    if rank == 0:
        print(f"world {world}: accuracy per experience "
              + " ".join(f"{a * 100:.1f}" for a in accs) + f" | average {sum(accs) / len(accs) * 100:.1f}%")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
