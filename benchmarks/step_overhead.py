"""Training-step overhead of rehearsal, at the Avalanche strategy level.

Two measurements, each comparing the seven :data:`~benchmarks.workloads.VARIANTS` in one run:

* ``step_overhead``: class-incremental training, ``N`` steps per ``train()`` call; per-step
  wall time (start of one iteration to the start of the next, so data loading, the
  plugins' hooks and the model's compute are all inside), on every rank, maximum over
  ranks, median over the steps of all timed rounds after a warm-up round. Also the
  amortised time (a whole ``train()`` call divided by its steps, per-experience work
  included). Variants run round-robin so load changes hit all of them alike.
* ``online`` (one rank): online continual learning as in the reference design, Avalanche's
  ``split_online_stream`` with one ``train()`` call per ``b``-sample experience; the figure
  is the wall time of one ``train()`` call, median over the stream after a warm-up.
"""

from __future__ import annotations

import time
from typing import Dict, List

import torch

from .timing import StepClock, max_over_ranks, summarize, time_call
from .workloads import (VARIANTS, auto_choices, class_incremental, close_strategy, make_model,
                        make_strategy)


def _clock_plugins(clock: StepClock):
    from avalanche.core import SupervisedPlugin

    class StartOfStep(SupervisedPlugin, supports_distributed=True):
        def before_training_iteration(self, strategy, **kwargs):
            clock.tick()

    class EndOfEpoch(SupervisedPlugin, supports_distributed=True):
        def after_training_epoch(self, strategy, **kwargs):
            clock.tick()
            clock.reset()

    return StartOfStep(), EndOfEpoch()


def _per_step_max(steps: List[float]) -> List[float]:
    """Per-step maximum over ranks (ranks take the same number of steps under DDP)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return steps
    lengths = [None] * dist.get_world_size()
    dist.all_gather_object(lengths, len(steps))
    n = min(lengths)
    return max_over_ranks(steps[:n])


def step_overhead(rank: int, world: int, cfg: dict) -> Dict:
    """Per-step time of every variant for every model in ``cfg["models"]`` on this world size."""
    device = torch.device(cfg["device"])
    b, r, c, mem = cfg["b"], cfg["r"], cfg["c"], cfg["mem_size"]
    steps = cfg["steps"]
    shape, classes = tuple(cfg["shape"]), cfg["classes"]
    n_exp = cfg["experiences"]  # must divide the number of classes; rounds cycle over them
    out = {}
    for kind in cfg["models"]:
        rounds = cfg["rounds"][kind] if isinstance(cfg["rounds"], dict) else cfg["rounds"]
        model = make_model(kind, shape, classes)
        streams = {mb: class_incremental(steps * mb * world, n_exp, shape, classes).train_stream
                   for mb in {b, b + r}}
        clock = StepClock(device)
        strategies = {}
        for v in VARIANTS:
            start, end = _clock_plugins(clock)
            strategies[v] = make_strategy(v, model, b, r, c, mem, device, [start], [end],
                                          seed=cfg.get("seed", 0))
        samples = {v: [] for v in VARIANTS}
        amortised = {v: [] for v in VARIANTS}
        for k in range(rounds + 1):  # round 0 is the warm-up (it also fills the buffers)
            order = list(VARIANTS[k % len(VARIANTS):] + VARIANTS[:k % len(VARIANTS)])
            for v in order:
                mb = b + r if v == "incremental_b+r" else b
                exp = streams[mb][k % n_exp]
                seconds = time_call(lambda: strategies[v].train(exp), device)
                taken = clock.take()
                if k > 0:
                    samples[v].extend(taken)
                    amortised[v].append(seconds / max(len(taken), 1))
        auto = auto_choices(strategies["ours_auto"])
        for s in strategies.values():
            close_strategy(s)
        out[kind] = {v: {"step": summarize(_per_step_max(samples[v])),
                         "amortised": summarize(max_over_ranks(amortised[v]))}
                     for v in VARIANTS}
        out[kind]["ours_auto"]["chooser"] = auto
    return out


def online(rank: int, world: int, cfg: dict) -> Dict:
    """Online CL, one rank: wall time of one ``train()`` call per experience, every variant."""
    from avalanche.benchmarks.scenarios.online import split_online_stream

    device = torch.device(cfg["device"])
    b, r, c, mem = cfg["b"], cfg["r"], cfg["c"], cfg["mem_size"]
    shape, classes = tuple(cfg["shape"]), cfg["classes"]
    bench = class_incremental(cfg["samples_per_exp"], cfg["experiences"], shape, classes)
    model = make_model(cfg["model"], shape, classes)
    strategies = {v: make_strategy(v, model, b, r, c, mem, device, seed=cfg.get("seed", 0))
                  for v in VARIANTS}
    streams = {v: list(split_online_stream(bench.train_stream,
                                           experience_size=b + r if v == "incremental_b+r" else b,
                                           shuffle=False, drop_last=True))
               for v in VARIANTS}
    # Blocks of consecutive train() calls per variant, variants round-robin: ours leaves
    # its last job running past train() (it overlaps the next call), so a block ends by
    # waiting for it, inside the timed region, and no variant's work spills into another's.
    block = cfg.get("block", 1)
    rounds = min(len(s) for s in streams.values()) // block
    samples = {v: [] for v in VARIANTS}
    start = time.perf_counter()

    def run_block(v, exps):
        for e in exps:
            strategies[v].train(e)
        for p in strategies[v].plugins:
            if getattr(p, "pipeline", None) is not None:
                p.pipeline.drain()

    for k in range(rounds):
        order = list(VARIANTS[k % len(VARIANTS):] + VARIANTS[:k % len(VARIANTS)])
        for v in order:
            exps = streams[v][k * block:(k + 1) * block]
            t = time_call(lambda: run_block(v, exps), device)
            if k * block >= cfg["warmup"]:
                samples[v].append(t / block)
    k = rounds * block
    auto = auto_choices(strategies["ours_auto"])
    buffered = {}
    for v, s in strategies.items():
        for p in s.plugins:
            if type(p).__name__ == "ReplayPlugin":
                buffered[v] = len(p.storage_policy.buffer)
            elif type(p).__name__ == "DistributedReplayPlugin":
                buffered[v] = p.storage_policy.local_size()
        close_strategy(s)
    return {"experiences": k, "seconds": time.perf_counter() - start,
            "buffer_samples": buffered, "auto_chooser": auto,
            "train_call": {v: summarize(samples[v]) for v in VARIANTS}}
