"""Buffer operations, torch only: insert ``c`` candidates, draw ``r`` local samples, one exchange step.

For every sample shape and dtype in ``cfg["cases"]``, on a full shard (steady state) of
``cfg["per_rank"][shape]`` samples per rank (the global budget grows with the world size):

* ``insert``: ``ShardedRehearsalBuffer.insert`` of ``c`` fresh candidates;
* ``plan``: ``plan_draws`` for the whole world (pure compute, the same on every rank);
* ``local_draw``: plan + gather of this rank's rows, field by field: a draw without
  collectives;
* ``exchange``: one full ``draw`` (collective: all-gather of counts, plan, gather,
  all-to-all, reorder), every rank starting together after a barrier.

Times are maxima over ranks, medians over repeats after a warm-up.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from .timing import max_over_ranks, summarize, time_interleaved

DTYPES = {"float32": torch.float32, "uint8": torch.uint8}


def make_batches(n_batches: int, c: int, shape, dtype: torch.dtype, classes: int, seed: int,
                 device) -> List:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        if dtype == torch.uint8:
            x = torch.randint(0, 256, (c, *shape), generator=g, dtype=torch.uint8)
        else:
            x = torch.randn((c, *shape), generator=g).to(dtype)
        out.append((x.to(device), torch.randint(0, classes, (c,), generator=g).to(device)))
    return out


def filled_buffer(world: int, rank: int, per_rank: int, shape, dtype, cfg: dict):
    """A ``ShardedRehearsalBuffer`` whose shard on every rank is full, plus a batch pool."""
    from avalanche_distributed_rehearsal.core import ShardedRehearsalBuffer

    buf = ShardedRehearsalBuffer(per_rank * world, sampling=cfg.get("sampling", "uniform"),
                                 seed=0, device=cfg["device"])
    pool = make_batches(4, cfg["c"], shape, dtype, cfg["classes"], 1000 + rank, cfg["device"])
    i = 0
    # insert() is collective: every rank loops until every shard is full (the replicated
    # ledger tells each rank the same)
    while int(buf.ledger.load.min()) < min(buf.ledger.capacities):
        buf.insert(*pool[i % len(pool)])
        i += 1
    return buf, pool


def sample_pool(shape_name: str, dtype_name: str, cfg: dict, rank: int) -> List:
    """Batches of ``cfg.get("b", cfg["c"])`` samples of the case's shape and dtype, per rank."""
    shape = tuple(int(s) for s in shape_name.split("x"))
    return make_batches(4, cfg.get("b", cfg["c"]), shape, DTYPES[dtype_name], cfg["classes"],
                        1000 + rank, cfg.get("device", "cpu"))


def full_buffers(world: int, rank: int, cfg: dict):
    """For each ``[shape, dtype]`` of ``cfg["cases"]``: ``(shape, dtype, buffer, batch pool)``
    with a full shard on every rank (:func:`filled_buffer`); each buffer is closed after use."""
    for shape_name, dtype_name in cfg["cases"]:
        shape = tuple(int(s) for s in shape_name.split("x"))
        buf, pool = filled_buffer(world, rank, cfg["per_rank"][shape_name], shape,
                                  DTYPES[dtype_name], cfg)
        try:
            yield shape_name, dtype_name, buf, pool
        finally:
            buf.close()


def barrier_for(buf):
    import torch.distributed as dist

    group = getattr(buf.exchange, "group", None)
    if buf.world_size == 1:
        return None
    return lambda: dist.barrier(group=group)


def buffer_ops(rank: int, world: int, cfg: dict) -> List[Dict]:
    from avalanche_distributed_rehearsal.core import plan_draws
    from avalanche_distributed_rehearsal.core.seeding import generator

    rows = []
    for shape_name, dtype_name, buf, pool in full_buffers(world, rank, cfg):
        r, device = cfg["r"], buf.device
        counts = buf.ledger.eligible_matrix()
        state = {"i": 0, "step": 0}

        def insert():
            state["i"] += 1
            buf.insert(*pool[state["i"] % len(pool)])

        def plan():
            state["step"] += 1
            return plan_draws(counts, r, buf.sampling, generator(0, state["step"]))

        def local_draw():
            p = plan()
            _, local, _ = p.sends(rank)
            return buf.storage.gather_fields(local)

        def exchange():
            state["step"] += 1
            buf.draw(r, state["step"])

        kinds = {"insert": insert, "plan": plan, "local_draw": local_draw}
        samples = time_interleaved(kinds, cfg["warmup"], cfg["repeats"], device)
        samples.update(time_interleaved({"exchange": exchange}, cfg["warmup"], cfg["repeats"],
                                        device, before=barrier_for(buf)))
        row = {"world": world, "shape": shape_name, "dtype": dtype_name, "c": cfg["c"], "r": r,
               "per_rank": buf.local_capacity, "row_bytes": buf.storage.layout.row_bytes,
               "device": str(device)}
        for name, s in samples.items():
            row[name] = summarize(max_over_ranks(s))
        rows.append(row)
        pool = buf = None  # free this shape's buffers before the next is built
    return rows
