"""Preemptible class-incremental training: checkpoint after every experience, resume on restart.

    python examples/resume_training.py --checkpoint-dir ckpt --stop-after 2   # "preempted"
    python examples/resume_training.py --checkpoint-dir ckpt --out final.json  # continues
    torchrun --standalone --nproc-per-node=2 examples/resume_training.py --checkpoint-dir ckpt

Naive + DistributedReplayPlugin on scikit-learn's digits (5 experiences of 2 classes).
After each experience, every rank calls ``save_training_checkpoint`` (model, optimizer,
strategy clock, plugin state, RNG states and every rank's buffer shard, written
atomically to ``<checkpoint-dir>/latest``). On start, if that checkpoint exists, it is
loaded and training continues at the experience its ``extra`` names. Resuming on the same
number of ranks gives the same model, bit for bit, as a run that was never interrupted;
resuming on another number of ranks keeps every buffered sample (the buffer is dealt out
anew) but changes the data order, so results then differ slightly.

``--out`` (written by rank 0 once the whole stream is trained) holds the test accuracy and
a SHA-256 digest of the model's parameters, to compare runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Import Avalanche before the process group exists: it builds a logger at import time,
# which it refuses to do on a non-main rank afterwards.
from avalanche.evaluation.metrics import accuracy_metrics  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

from avalanche_distributed_rehearsal import DistributedReplayPlugin  # noqa: E402
from avalanche_distributed_rehearsal.integration.checkpoint import (  # noqa: E402
    load_training_checkpoint, save_training_checkpoint)
from avalanche_distributed_rehearsal.app.data import digits_benchmark  # noqa: E402
from digits_replay import distributed_mlp  # noqa: E402


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in order: equal digests mean identical models."""
    model = getattr(model, "module", model)  # unwrap DDP
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def checkpoint_exists(path: str) -> bool:
    # A crash between the two renames of a save leaves the checkpoint at <path>.old.
    return any(os.path.exists(os.path.join(p, "manifest.json")) for p in (path, path + ".old"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", required=True,
                        help="where the checkpoint lives (shared by all ranks)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="K",
                        help="exit after training K experiences in this run "
                             "(simulates a preemption)")
    parser.add_argument("--out", default=None, help="JSON file for the final accuracy (rank 0)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--mem-size", type=int, default=200, help="global budget M")
    parser.add_argument("--sync", action="store_true",
                        help="buffer work inline, not in the background")
    args = parser.parse_args()

    rank, world, model = distributed_mlp()
    plugin = DistributedReplayPlugin(mem_size=args.mem_size, batch_size_mem=8, num_candidates=16,
                                     async_mode=not args.sync, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    strategy = Naive(model=model, optimizer=optimizer, train_mb_size=32, train_epochs=args.epochs,
                     eval_mb_size=256, plugins=[plugin], device="cpu",
                     evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]))
    bench = digits_benchmark()
    stream = bench.train_stream

    path = os.path.join(args.checkpoint_dir, "latest")
    start = 0
    if checkpoint_exists(path):
        extra = load_training_checkpoint(path, strategy, plugin)  # collective
        start = int(extra["next_experience"])
        if rank == 0:
            print(f"resumed from {path}: experiences 0..{start - 1} done "
                  f"(saved by {extra.get('world_size', '?')} rank(s), now {world})", flush=True)

    trained = 0
    for i in range(start, len(stream)):
        if args.stop_after is not None and trained >= args.stop_after:
            if rank == 0:
                print(f"stopping after {trained} experience(s) (--stop-after); rerun to resume "
                      f"at experience {i}", flush=True)
            plugin.close()
            return
        strategy.train(stream[i])
        save_training_checkpoint(path, strategy, plugin,  # collective
                                 extra={"next_experience": i + 1, "world_size": world})
        trained += 1
        if rank == 0:
            print(f"experience {i} trained, checkpoint saved", flush=True)

    results = strategy.eval(bench.test_stream)
    out = {"accuracy": results["Top1_Acc_Stream/eval_phase/test_stream/Task000"],
           "parameters_sha256": parameter_digest(strategy.model),
           "world_size": world, "resumed_at_experience": start,
           "trained_in_this_run": trained,
           "buffer_size": sum(plugin.storage_policy.core.global_counts().values())}  # collective
    plugin.close()
    if rank == 0:
        print(json.dumps(out), flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
