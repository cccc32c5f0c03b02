"""The exchange step against its transport limit: a bare ``all_to_all_single`` of the same bytes.

For each case and world size > 1, on full shards, alternately (interleaved, after a
barrier each):

* ``ours``: ``ShardedRehearsalBuffer.draw(r, step)``: all-gather of the class counts,
  the plan, the gather of the rows served, the all-to-all, the reorder;
* ``bare``: ``torch.distributed.all_to_all_single`` on the buffer's own process group,
  with exactly the split sizes (in bytes) that ``draw`` used at the same step, between
  preallocated uint8 tensors: the least any exchange of these bytes can cost;
* ``bare_fresh``: the same, into a newly allocated receive tensor: the least an exchange
  that hands *new* memory to its caller (as ``draw`` does) can cost. On CPU the gap to
  ``bare`` is the first touch of fresh pages (large tensors are ``mmap``-ed anew).

The plan of a step is recomputed here with the buffer's own seeding, and the bytes are
checked against ``buffer.last_exchange``.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from .buffer_ops import barrier_for, full_buffers
from .timing import max_over_ranks, summarize, time_interleaved

def plan_of(buf, counts: torch.Tensor, r: int, step: int):
    """The plan ``buf.draw(r, step)`` follows when the shards hold ``counts``."""
    from avalanche_distributed_rehearsal.core import plan_draws
    from avalanche_distributed_rehearsal.core.seeding import PLAN, generator

    return plan_draws(counts, r, buf.sampling, generator(buf.seed, step, PLAN))


def exchange(rank: int, world: int, cfg: dict) -> List[Dict]:
    import torch.distributed as dist

    if world == 1:
        return []
    rows = []
    for shape_name, dtype_name, buf, _ in full_buffers(world, rank, cfg):
        counts = buf.ledger.eligible_matrix()
        row_bytes = buf.storage.layout.row_bytes
        group = buf.exchange.payload_group
        for r in cfg["r_values"]:
            n = cfg["warmup"] + cfg["repeats"]
            plans = [plan_of(buf, counts, r, s) for s in range(n)]
            splits = [(p.sends(rank)[0] * row_bytes).tolist() for p in plans]
            recv_splits = [(p.receive_splits(rank, world) * row_bytes).tolist() for p in plans]
            send = torch.empty(max(sum(s) for s in splits), dtype=torch.uint8, device=buf.device)
            recv = torch.empty(max(sum(s) for s in recv_splits), dtype=torch.uint8,
                               device=buf.device)
            state = {"ours": 0, "bare": 0, "bare_fresh": 0, "mismatch": 0}

            def ours():
                s = state["ours"]
                buf.draw(r, s)
                if buf.last_exchange.payload_sent != sum(splits[s]):
                    state["mismatch"] += 1
                state["ours"] += 1

            def bare(fresh: bool = False):
                key = "bare_fresh" if fresh else "bare"
                s = state[key]
                size = sum(recv_splits[s])
                out = (torch.empty(size, dtype=torch.uint8, device=buf.device) if fresh
                       else recv[:size])
                dist.all_to_all_single(out, send[: sum(splits[s])],
                                       output_split_sizes=recv_splits[s],
                                       input_split_sizes=splits[s], group=group)
                state[key] += 1

            samples = time_interleaved({"ours": ours, "bare": bare,
                                        "bare_fresh": lambda: bare(fresh=True)},
                                       cfg["warmup"], cfg["repeats"], buf.device,
                                       before=barrier_for(buf))
            summary = {k: summarize(max_over_ranks(v)) for k, v in samples.items()}
            rows.append({"world": world, "shape": shape_name, "dtype": dtype_name, "r": r,
                         "bytes_received": r * row_bytes, **summary,
                         "ratio": summary["ours"]["median"] / summary["bare"]["median"],
                         "ratio_fresh": (summary["ours"]["median"]
                                         / summary["bare_fresh"]["median"]),
                         "splits_match": state["mismatch"] == 0, "device": str(buf.device)})
    return rows
