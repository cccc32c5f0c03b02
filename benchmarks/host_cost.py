"""Host time of one rehearsal step of the core, against TorchRL's replay buffer and the bare
data movement of the same bytes, with the step's per-stage breakdown.

One rank, CPU. The workload of every variant per step: a batch of ``b`` samples (``D``
float32 values, an int64 class label, an int64 task label), ``c`` of its rows written into
a buffer of ``M`` samples, ``r`` samples drawn from it and appended to the batch:

* ``ours_sync``: ``RehearsalPipeline.augment`` (synchronous: every stage inline);
* ``ours_async``: the same in asynchronous mode: the time the training thread spends in
  ``augment`` (the job runs on the worker thread; it is waited for after the timed call,
  so that it never runs into another variant's timing);
* ``torchrl``: TorchRL's ``ReplayBuffer(LazyTensorStorage(M))``: ``extend`` of the ``c``
  rows as a ``TensorDict`` of the same three fields, ``sample(r)``, and the concatenation
  (optional: skipped when TorchRL is not installed);
* ``floor``: the copies alone: ``c`` rows of each field into preallocated storage at
  random slots, ``r`` rows gathered, concatenated to the batch.

Variants run interleaved, one step each in turn (the order rotating from step to step, so
that every variant follows every other as often), after every buffer is full; figures are
medians. The stage times of ``ours_sync`` come from the buffer's
:class:`~avalanche_distributed_rehearsal.core.phases.PhaseClock` over the same steps.

Then, with ``pause_steps``, the same variants (but ``ours_async``) again, each timed step
after an untimed pause of ``pause_ms`` (a sleep): in training, a step of the buffer
follows the model's compute or a wait in a collective, not another step of the buffer.
``paused / back-to-back`` tells how much slower code runs on this machine when it runs
after a pause (its caches and its core no longer warm), for each variant.
"""

from __future__ import annotations

import time
from typing import Dict

import torch

from .timing import summarize


def _batches(cfg, n: int = 64):
    g = torch.Generator().manual_seed(0)
    b, d, classes = cfg["b"], cfg["dim"], cfg["classes"]
    return [(torch.randn(b, d, generator=g), torch.randint(0, classes, (b,), generator=g),
             torch.zeros(b, dtype=torch.int64)) for _ in range(n)]


def _ours(cfg, async_mode: bool):
    from avalanche_distributed_rehearsal.core import RehearsalPipeline, ShardedRehearsalBuffer
    from avalanche_distributed_rehearsal.core.phases import PhaseClock

    buf = ShardedRehearsalBuffer(cfg["mem_size"], seed=0)
    pipe = RehearsalPipeline(buf, batch_size_mem=cfg["r"], num_candidates=cfg["c"],
                             async_mode=async_mode)
    clock = PhaseClock()

    def step(batch):
        x, y, t = batch
        pipe.augment(x, y, t)

    return step, pipe, buf, clock


def _torchrl(cfg):
    try:
        from tensordict import TensorDict
        from torchrl.data import LazyTensorStorage, ReplayBuffer
    except ImportError:
        return None
    import logging

    logging.getLogger("torchrl").setLevel(logging.WARNING)
    rb = ReplayBuffer(storage=LazyTensorStorage(cfg["mem_size"]), batch_size=cfg["r"])
    g = torch.Generator().manual_seed(1)
    b, c = cfg["b"], cfg["c"]

    def step(batch):
        x, y, t = batch
        rows = torch.randperm(b, generator=g)[:c]
        rb.extend(TensorDict({"x": x[rows], "y": y[rows], "t": t[rows]}, batch_size=[c]))
        s = rb.sample()
        torch.cat([x, s["x"]]), torch.cat([y, s["y"]]), torch.cat([t, s["t"]])

    return step


def _floor(cfg):
    m, d, b, c, r = cfg["mem_size"], cfg["dim"], cfg["b"], cfg["c"], cfg["r"]
    store = (torch.zeros(m, d), torch.zeros(m, dtype=torch.int64), torch.zeros(m, dtype=torch.int64))
    g = torch.Generator().manual_seed(2)

    def step(batch):
        rows = torch.randperm(b, generator=g)[:c]
        slots = torch.randint(0, m, (c,), generator=g)
        for column, value in zip(store, batch):
            column.index_copy_(0, slots, value.index_select(0, rows))
        idx = torch.randint(0, m, (r,), generator=g)
        for column, value in zip(store, batch):
            torch.cat([value, column.index_select(0, idx)])

    return step


def host_cost(rank: int, world: int, cfg: dict) -> Dict:
    """Per-step host time of every variant (see the module doc), and the stage times of
    ``ours_sync``, all medians / means over the same interleaved steps."""
    torch.set_num_threads(cfg.get("threads", 1))
    batches = _batches(cfg)
    sync_step, sync_pipe, sync_buf, clock = _ours(cfg, False)
    async_step, async_pipe, _, _ = _ours(cfg, True)
    variants = {"ours_sync": sync_step, "ours_async": async_step, "floor": _floor(cfg)}
    trl = _torchrl(cfg)
    if trl is not None:
        variants["torchrl"] = trl
    fill = cfg["mem_size"] // cfg["c"] * 2 + 10
    for i in range(fill):  # every buffer full, every class at its quota: the steady state
        for fn in variants.values():
            fn(batches[i % len(batches)])
    async_pipe.drain()
    samples = {name: [] for name in variants}
    steps = cfg["steps"]
    sync_buf.phase_clock = clock
    names = list(variants)
    for i in range(steps):
        batch = batches[i % len(batches)]
        k = i % len(names)  # each variant follows each other one in turn
        for name in names[k:] + names[:k]:
            fn = variants[name]
            start = time.perf_counter()
            fn(batch)
            samples[name].append(time.perf_counter() - start)
            if name == "ours_async":
                async_pipe.drain()  # its job, untimed: it must not run into the next variant
    sync_buf.phase_clock = None
    phases = {k: v / steps for k, v in clock.seconds.items()}
    paused = _paused(variants, batches, cfg)
    sync_pipe.close()
    async_pipe.close()
    out = {name: summarize(s) for name, s in samples.items()}
    return {"step": out, "phases": phases, "torchrl": trl is not None, "paused": paused,
            "workload": {k: cfg[k] for k in ("b", "c", "r", "dim", "mem_size", "classes")}}


def _paused(variants, batches, cfg) -> Dict:
    """Each variant but ``ours_async`` timed after an untimed pause of ``pause_ms`` (see
    the module doc), interleaved as the main loop: ``{"pause_ms", "step": {name:
    summary}}``, or ``{}`` without ``pause_steps``."""
    n = cfg.get("pause_steps", 0)
    if not n:
        return {}
    pause = cfg["pause_ms"] / 1e3
    names = [name for name in variants if name != "ours_async"]
    samples = {name: [] for name in names}
    for i in range(n):
        batch = batches[i % len(batches)]
        k = i % len(names)
        for name in names[k:] + names[:k]:
            time.sleep(pause)
            start = time.perf_counter()
            variants[name](batch)
            samples[name].append(time.perf_counter() - start)
    return {"pause_ms": cfg["pause_ms"], "step": {name: summarize(s) for name, s in samples.items()}}
