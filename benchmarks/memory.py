"""Buffer memory per rank: ours (budget / world per rank) against the stock Avalanche buffer.

Both buffers see the same class-incremental stream with the same global budget M.
Ours: each rank inserts its share of every experience into a ``ShardedRehearsalBuffer``
(what ``DistributedReplayPlugin`` does); bytes are the shard's preallocated storage.
Stock: ``ClassBalancedBuffer(max_size=M, adaptive_size=True)`` updated the way Avalanche's
``ReplayPlugin`` updates it under ``torch.distributed`` (every rank from the experience's
whole dataset, since the policy knows nothing of other ranks); bytes are the samples it
holds times a sample's bytes (input + int64 label + int64 task label), a lower bound: it
also keeps the experience datasets it indexes alive.
"""

from __future__ import annotations

from typing import Dict

import torch

from .workloads import class_incremental


def memory(rank: int, world: int, cfg: dict) -> Dict:
    from avalanche.training.storage_policy import ClassBalancedBuffer

    from avalanche_distributed_rehearsal.core import ShardedRehearsalBuffer

    mem, shape, classes = cfg["mem_size"], tuple(cfg["shape"]), cfg["classes"]
    bench = class_incremental(cfg["samples_per_exp"], cfg["experiences"], shape, classes)
    ours = ShardedRehearsalBuffer(mem, seed=0, device=cfg["device"])
    stock = ClassBalancedBuffer(max_size=mem, adaptive_size=True)
    for exp in bench.train_stream:
        ds = exp.dataset.eval()
        mine = list(range(rank, len(ds), world))
        for start in range(0, len(mine), 256):
            batch = [ds[i] for i in mine[start:start + 256]]
            x = torch.stack([s[0] for s in batch])
            y = torch.tensor([int(s[1]) for s in batch])
            ours.insert(x.to(cfg["device"]), y)
        stock.update_from_dataset(exp.dataset)
    sample_bytes = 4 * int(torch.Size(shape).numel()) + 16
    stock_samples = len(stock.buffer)
    result = {
        "ours_samples": len(ours), "ours_capacity": ours.local_capacity,
        "ours_bytes": ours.storage.nbytes,
        "stock_samples": stock_samples, "stock_bytes": stock_samples * sample_bytes,
        "sample_bytes": sample_bytes,
    }
    ours.close()
    return result
