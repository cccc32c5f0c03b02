"""Bytes per rank per step, and step time, against the world size (weak scaling).

Every rank keeps a full shard of ``per_rank`` samples (the global budget grows with the
world) and runs pipeline steps (synchronous ``RehearsalPipeline.augment``: ``b`` samples,
``c`` candidates, ``r`` representatives). Bytes come from each step's statistics
(``DrawRecord.stats``): the records and the metadata a rank sends to and receives from
the *other* ranks, averaged over steps, then over ranks. Times are maxima over ranks,
medians over steps; with more ranks than cores they are oversubscribed (see the report).
"""

from __future__ import annotations

from typing import Dict, List

import torch

from .buffer_ops import barrier_for, sample_pool
from .timing import max_over_ranks, summarize, time_interleaved

FIELDS = {"payload_sent": "payload_to_others", "payload_received": "payload_from_others",
          "metadata_sent": "metadata_to_others", "metadata_received": "metadata_from_others",
          "records_received_all": "payload_received"}


def _mean_over_ranks(value: float) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def scaling(rank: int, world: int, cfg: dict) -> List[Dict]:
    from avalanche_distributed_rehearsal.core import RehearsalPipeline, ShardedRehearsalBuffer

    rows = []
    r, c = cfg["r"], cfg["c"]
    for shape_name, dtype_name in cfg["cases"]:
        per_rank = cfg["per_rank"][shape_name]
        buf = ShardedRehearsalBuffer(per_rank * world, seed=0)
        pipe = RehearsalPipeline(buf, batch_size_mem=r, num_candidates=c, async_mode=False)
        pool = sample_pool(shape_name, dtype_name, cfg, rank)
        for i in range(2 * per_rank // c + 4):  # full shards: the steady state
            pipe.augment(*pool[i % len(pool)])
        totals = dict.fromkeys(FIELDS, 0)
        state = {"i": 0}

        def step():
            pipe.augment(*pool[state["i"] % len(pool)])
            state["i"] += 1
            stats = pipe.last_draw.stats
            for name, field in FIELDS.items():
                totals[name] += getattr(stats, field)

        samples = time_interleaved({"step": step}, cfg["warmup"], cfg["repeats"],
                                   buf.device, before=barrier_for(buf))["step"]
        n = state["i"]
        row = {"world": world, "shape": shape_name, "dtype": dtype_name, "r": r, "c": c,
               "per_rank": buf.local_capacity, "row_bytes": buf.bytes_per_sample, "steps": n,
               "step": summarize(max_over_ranks(samples)),
               "oversubscribed": world > (cfg.get("cores") or world), "device": str(buf.device)}
        for name in FIELDS:
            row[name] = _mean_over_ranks(totals[name] / n)
        row["total_received"] = row["payload_received"] + row["metadata_received"]
        row["total_sent"] = row["payload_sent"] + row["metadata_sent"]
        rows.append(row)
        pipe.close()
        buf.close()
    return rows
