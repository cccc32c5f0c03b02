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
* ``aligned_bare``: at that same point of that step, after a barrier of its own, a bare
  all-to-all of the records' split sizes (the order of the two alternates from repeat to
  repeat): the transport limit where the step's collective runs, on a core that has just
  done the step's host work;
* ``bare``: ``torch.distributed.all_to_all_single`` on the buffer's own payload group
  with exactly the records' split sizes (in bytes) of the step just timed, without the
  metadata, after the step and a barrier, between kept uint8 buffers whose pages were
  touched beforehand (:class:`BareBuffers`): the least any exchange of these records
  can cost.

Per repeat the slowest rank's time counts (a collective is as slow as its slowest rank).
"""

from __future__ import annotations

import time
from typing import Dict, List

import torch

from .buffer_ops import barrier_for, sample_pool
from .timing import max_over_ranks, summarize


class BareBuffers:
    """Send and receive buffers of the bare all-to-all, kept and grown as needed, written
    once when allocated: no page is touched for the first time inside a timed collective
    (a fresh multi-megabyte tensor is, and costs its page faults there)."""

    def __init__(self):
        self._send = torch.zeros(1, dtype=torch.uint8)
        self._recv = torch.zeros(1, dtype=torch.uint8)

    def get(self, send_bytes: int, recv_bytes: int):
        if self._send.numel() < send_bytes:
            self._send = torch.zeros(send_bytes, dtype=torch.uint8)
        if self._recv.numel() < recv_bytes:
            self._recv = torch.zeros(recv_bytes, dtype=torch.uint8)
        return self._send[:send_bytes], self._recv[:recv_bytes]


class SplitRecorder:
    """Forwards every call to the buffer's exchange; remembers the last all-to-all's splits.
    Once :meth:`arm` gave it a barrier, the next all-to-all (a step's message: metadata and
    records) waits at the barrier and is timed alone (``seconds``): the collective without
    the ranks' skew. A bare all-to-all of the records' split sizes (each split less
    ``meta`` bytes) is timed at the same point, after a barrier of its own
    (``bare_seconds``), before or after the step's on alternate steps (every rank
    alternates alike). Later calls of that step (a records-only collective) pass through."""

    def __init__(self, inner, meta: int):
        self._inner = inner
        self.meta = meta
        self.buffers = BareBuffers()
        self.last = None
        self.align = None
        self.seconds = 0.0
        self.bare_seconds = 0.0
        self._aligned_calls = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def arm(self, barrier) -> None:
        """Time the next all-to-all (see the class doc), after ``barrier``."""
        self.align = barrier

    def all_to_all(self, send, send_splits, recv_splits, out=None):
        self.last = (list(send_splits), list(recv_splits))
        if self.align is None:
            return self._inner.all_to_all(send, send_splits, recv_splits, out=out)
        bare_first = self._aligned_calls % 2 == 1
        self._aligned_calls += 1
        sizes = self.payload_sizes(send_splits), self.payload_sizes(recv_splits)
        if bare_first:
            self.bare_seconds = self.bare(*sizes, self.align)
        self.align()
        start = time.perf_counter()
        out = self._inner.all_to_all(send, send_splits, recv_splits, out=out)
        self.seconds = time.perf_counter() - start
        if not bare_first:
            self.bare_seconds = self.bare(*sizes, self.align)
        self.align = None
        return out

    def payload_sizes(self, splits):
        """The records' bytes of each split (the step's metadata taken off)."""
        return [s - self.meta for s in splits]

    def bare(self, send_sizes, recv_sizes, barrier) -> float:
        """Seconds of one bare ``all_to_all_single`` of these split sizes (bytes) on the
        payload group, between the kept buffers, after ``barrier``."""
        import torch.distributed as dist

        send, recv = self.buffers.get(sum(send_sizes), sum(recv_sizes))  # grown beforehand
        barrier()
        start = time.perf_counter()
        dist.all_to_all_single(recv, send, output_split_sizes=list(recv_sizes),
                               input_split_sizes=list(send_sizes), group=self._inner.payload_group)
        return time.perf_counter() - start


def exchange(rank: int, world: int, cfg: dict) -> List[Dict]:
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
            meta = (HEADER + c) * 8
            recorder = SplitRecorder(buf.exchange, meta)
            buf.exchange = recorder
            pipe = RehearsalPipeline(buf, batch_size_mem=r, num_candidates=c, async_mode=False)
            pool = sample_pool(shape_name, dtype_name, cfg, rank)
            for i in range(2 * per_rank // c + 4):  # full shards, classes at their quotas
                pipe.augment(*pool[i % len(pool)])
            samples = {"step": [], "exchange": [], "aligned": [], "aligned_bare": [], "bare": []}
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
                payload_send, payload_recv = map(recorder.payload_sizes, recorder.last)
                recorder.arm(barrier)  # a second step, its collective after a barrier
                barrier()
                pipe.augment(*pool[(i + 1) % len(pool)])
                recorder.align = None
                aligned = recorder.seconds
                bare = recorder.bare(payload_send, payload_recv, barrier)
                if i >= cfg["warmup"]:
                    samples["step"].append(step)
                    samples["exchange"].append(clock.seconds["exchange"])
                    samples["aligned"].append(aligned)
                    samples["aligned_bare"].append(recorder.bare_seconds)
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
                                               / summary["aligned_bare"]["median"])})
            pipe.close()
            buf.close()
    return rows
