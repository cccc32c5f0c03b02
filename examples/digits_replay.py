"""An end-to-end Avalanche run (Naive + DistributedReplayPlugin on scikit-learn digits).

Runs in one process or under ``torchrun``; each rank writes ``rank<R>.json`` to ``--out``.
"""

import argparse
import json
import os
import warnings

import torch

warnings.filterwarnings("ignore")


def distributed_mlp():
    """Join torchrun's process group (none in a plain process) and build the digits MLP.

    Returns ``(rank, world_size, model)``, the model wrapped in DDP when there are ranks.
    """
    from avalanche.distributed import DistributedHelper

    DistributedHelper.init_distributed(random_seed=0, use_cuda=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    return DistributedHelper.rank, DistributedHelper.world_size, DistributedHelper.wrap_model(model)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mem-size", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--sync", action="store_true")
    args = parser.parse_args()

    from avalanche.core import SupervisedPlugin
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_distributed_rehearsal import DistributedReplayPlugin
    from avalanche_distributed_rehearsal.app.data import digits_benchmark

    rank, world, model = distributed_mlp()

    class RowCounter(SupervisedPlugin, supports_distributed=True):
        def __init__(self):
            super().__init__()
            self.rows, self.steps = [], 0

        def before_forward(self, strategy, **kwargs):
            self.rows.append(int(strategy.mb_x.shape[0]))
            self.steps += 1

    counter = RowCounter()
    plugin = DistributedReplayPlugin(mem_size=args.mem_size, batch_size_mem=8, num_candidates=16,
                                     async_mode=not args.sync, seed=0)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     train_mb_size=32, train_epochs=args.epochs, eval_mb_size=256,
                     plugins=[plugin, counter], device="cpu",
                     evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]))
    bench = digits_benchmark()
    for exp in bench.train_stream:
        strategy.train(exp)
    results = strategy.eval(bench.test_stream)
    core = plugin.storage_policy.core
    counts = core.global_counts()  # collective
    global_counts = [counts.get(c, 0) for c in range(max(counts, default=-1) + 1)]
    out = {
        "rank": rank, "world": world,
        "accuracy": results["Top1_Acc_Stream/eval_phase/test_stream/Task000"],
        "local_size": len(core), "local_capacity": core.local_capacity,
        "global_counts": global_counts, "steps": counter.steps,
        "max_rows": max(counter.rows), "last_rows": counter.rows[-1],
        "ddp": type(strategy.model).__name__,
    }
    plugin.close()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
