"""A whole step of the buffer against the transport limit: a bare ``all_to_all_single`` of
the same records.

For each case and world size > 1, on full shards (the steady state: every class at its
quota), alternately (interleaved, after a barrier each), on every rank:

* ``step``: one step of ``RehearsalPipeline.augment`` in synchronous mode: the candidates'
  checks, the plan, the gather of the records served, the one collective (every rank's
  metadata and the records), the agreement, the insertion, the representatives in draw
  order, the batch concatenated;
* ``exchange``: the collective alone, inside that step (the buffer's phase clock: the
  message's assembly, the wait for the slowest rank and the all-to-all);
* ``aligned``: the next step's all-to-all call alone, after a barrier that aligns the
  ranks just before it: the collective without the ranks' skew;
* ``bare``: ``torch.distributed.all_to_all_single`` on the buffer's own payload group
  with exactly the records' split sizes (in bytes) of the step just timed, without the
  metadata, between preallocated uint8 tensors: the least any exchange of these records
  can cost.

Per repeat the slowest rank's time counts (a collective is as slow as its slowest rank).
"""

from __future__ import annotations

import time
from typing import Dict, List

import torch

from .buffer_ops import barrier_for, sample_pool
from .timing import max_over_ranks, summarize


class SplitRecorder:
    """Forwards every call to the buffer's exchange; remembers the last all-to-all's splits
    and, with ``align`` set to a barrier, waits at it before the all-to-all and times the
    all-to-all alone (``seconds``): the collective without the ranks' skew."""

    def __init__(self, inner):
        self._inner = inner
        self.last = None
        self.align = None
        self.seconds = 0.0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def all_to_all(self, send, send_splits, recv_splits, out=None):
        self.last = (list(send_splits), list(recv_splits))
        if self.align is not None:
            self.align()
        start = time.perf_counter()
        out = self._inner.all_to_all(send, send_splits, recv_splits, out=out)
        self.seconds = time.perf_counter() - start
        return out


def exchange(rank: int, world: int, cfg: dict) -> List[Dict]:
    import torch.distributed as dist

    from avalanche_distributed_rehearsal.core import RehearsalPipeline, ShardedRehearsalBuffer
    from avalanche_distributed_rehearsal.core.metadata import HEADER
    from avalanche_distributed_rehearsal.core.phases import PhaseClock

    if world == 1:
        return []
    rows = []
    for shape_name, dtype_name in cfg["cases"]:
        for r in cfg["r_values"]:
            per_rank, c = cfg["per_rank"][shape_name], cfg["c"]
            buf = ShardedRehearsalBuffer(per_rank * world, seed=0)
            recorder = SplitRecorder(buf.exchange)
            buf.exchange = recorder
            pipe = RehearsalPipeline(buf, batch_size_mem=r, num_candidates=c, async_mode=False)
            pool = sample_pool(shape_name, dtype_name, cfg, rank)
            for i in range(2 * per_rank // c + 4):  # full shards, classes at their quotas
                pipe.augment(*pool[i % len(pool)])
            group = buf.exchange.payload_group
            meta = (HEADER + c) * 8
            samples = {"step": [], "exchange": [], "aligned": [], "bare": []}
            barrier = barrier_for(buf)
            clock = PhaseClock()
            for i in range(cfg["warmup"] + cfg["repeats"]):
                batch = pool[i % len(pool)]
                barrier()
                clock.reset()
                buf.phase_clock = clock
                start = time.perf_counter()
                pipe.augment(*batch)
                step = time.perf_counter() - start
                buf.phase_clock = None
                send_splits, recv_splits = recorder.last
                payload_send = [s - meta for s in send_splits]
                payload_recv = [s - meta for s in recv_splits]
                send = torch.empty(max(sum(payload_send), 1), dtype=torch.uint8)
                recv = torch.empty(max(sum(payload_recv), 1), dtype=torch.uint8)
                recorder.align = barrier  # a second step, its collective after a barrier
                barrier()
                pipe.augment(*pool[(i + 1) % len(pool)])
                recorder.align = None
                aligned = recorder.seconds
                barrier()
                start = time.perf_counter()
                dist.all_to_all_single(recv[: sum(payload_recv)], send[: sum(payload_send)],
                                       output_split_sizes=payload_recv,
                                       input_split_sizes=payload_send, group=group)
                bare = time.perf_counter() - start
                if i >= cfg["warmup"]:
                    samples["step"].append(step)
                    samples["exchange"].append(clock.seconds["exchange"])
                    samples["aligned"].append(aligned)
                    samples["bare"].append(bare)
            summary = {k: summarize(max_over_ranks(v)) for k, v in samples.items()}
            row_bytes = buf.bytes_per_sample
            rows.append({"world": world, "shape": shape_name, "dtype": dtype_name, "r": r,
                         "c": c, "row_bytes": row_bytes, "payload_bytes_received": r * row_bytes,
                         "metadata_bytes_per_rank": meta * (world - 1), **summary,
                         "step_over_bare": summary["step"]["median"] / summary["bare"]["median"],
                         "exchange_over_bare": (summary["exchange"]["median"]
                                                / summary["bare"]["median"]),
                         "aligned_over_bare": (summary["aligned"]["median"]
                                               / summary["bare"]["median"])})
            pipe.close()
            buf.close()
    return rows
