"""Bytes per rank per step, and exchange time, against the world size (weak scaling).

Every rank keeps a full shard of ``per_rank`` samples (the global budget grows with the
world) and draws ``r`` representatives per step. Bytes come from ``buffer.last_exchange``
(payload: the rows a rank sends and receives, its own rows included; metadata: the
all-gathered class counts) and, from the step's plan, the payload that leaves the rank
(``off_rank_sent``). Averaged over steps, then over ranks. Times are maxima over ranks,
medians over steps; with more ranks than cores they are oversubscribed (see the report).
"""

from __future__ import annotations

from typing import Dict, List

import torch

from .buffer_ops import barrier_for, full_buffers
from .exchange import plan_of
from .timing import max_over_ranks, summarize, time_interleaved

FIELDS = ("payload_sent", "payload_received", "metadata_sent", "metadata_received")


def _mean_over_ranks(value: float) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def scaling(rank: int, world: int, cfg: dict) -> List[Dict]:
    rows = []
    r = cfg["r"]
    for shape_name, dtype_name, buf, _ in full_buffers(world, rank, cfg):
        counts = buf.ledger.eligible_matrix()
        row_bytes = buf.storage.layout.row_bytes
        totals = dict.fromkeys(FIELDS, 0)
        totals["off_rank_sent"] = 0
        n = cfg["repeats"]
        for s in range(n):  # bytes: untimed pass
            buf.draw(r, s)
            stats = buf.last_exchange
            for f in FIELDS:
                totals[f] += getattr(stats, f)
            splits = plan_of(buf, counts, r, s).sends(rank)[0]
            totals["off_rank_sent"] += int(splits.sum() - splits[rank]) * row_bytes
        state = {"step": n}

        def step():
            buf.draw(r, state["step"])
            state["step"] += 1

        samples = time_interleaved({"exchange": step}, cfg["warmup"], cfg["repeats"],
                                   buf.device, before=barrier_for(buf))["exchange"]
        row = {"world": world, "shape": shape_name, "dtype": dtype_name, "r": r,
               "per_rank": buf.local_capacity, "row_bytes": row_bytes,
               "exchange": summarize(max_over_ranks(samples)),
               "oversubscribed": world > (cfg.get("cores") or world), "device": str(buf.device)}
        for f, v in totals.items():
            row[f] = _mean_over_ranks(v / n)
        row["total_received"] = row["payload_received"] + row["metadata_received"]
        row["total_sent"] = row["payload_sent"] + row["metadata_sent"]
        rows.append(row)
    return rows
