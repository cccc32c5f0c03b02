"""The suite's only timing logic: warm-up, repeats, medians, ratios, cross-rank maxima.

Every figure in the suite is a median over repeats taken after a warm-up. Variants that
are compared are timed *interleaved* (round-robin, one repeat of each in turn) so that a
change in machine load hits all of them alike, and a ratio is always formed from medians
of the same run.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def synchronize(device: Optional[torch.device | str]) -> None:
    """Wait for queued GPU work on ``device`` (no-op on CPU), so a timer sees it finish."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def summarize(samples: Sequence[float]) -> Dict[str, float]:
    """``{"median", "p25", "p75", "min", "n"}`` of ``samples`` (seconds)."""
    xs = sorted(float(s) for s in samples)
    if not xs:
        return {"median": float("nan"), "p25": float("nan"), "p75": float("nan"),
                "min": float("nan"), "n": 0}
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "min": xs[0],
            "n": len(xs)}


def ratio(num: Dict[str, float], den: Dict[str, float]) -> float:
    """Ratio of two :func:`summarize` medians."""
    return num["median"] / den["median"] if den["median"] > 0 else float("nan")


def time_call(fn: Callable[[], object], device=None,
              before: Optional[Callable[[], None]] = None) -> float:
    """Seconds one call of ``fn`` takes; ``before`` (e.g. a barrier) runs untimed first."""
    if before is not None:
        before()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_interleaved(variants: Dict[str, Callable[[], object]], warmup: int, repeats: int,
                     device=None, before: Optional[Callable[[], None]] = None
                     ) -> Dict[str, List[float]]:
    """Time each variant ``warmup + repeats`` times, round-robin; return the kept samples.

    Warm-up rounds are run and discarded. With a single variant this is a plain
    repeat loop.
    """
    samples: Dict[str, List[float]] = {name: [] for name in variants}
    for i in range(warmup + repeats):
        for name, fn in variants.items():
            t = time_call(fn, device, before)
            if i >= warmup:
                samples[name].append(t)
    return samples


def max_over_ranks(samples: Sequence[float], group=None) -> List[float]:
    """Per-repeat maximum over all ranks (a collective step is as slow as its slowest rank).

    Every rank must pass the same number of samples. Without a process group, returns
    ``samples`` unchanged.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(samples)
    t = torch.tensor(list(samples), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


class StepClock:
    """Per-step wall time from the start of one training step to the start of the next.

    Call :meth:`tick` at the very start of each step and :meth:`reset` between phases
    whose boundary is not a step (e.g. end of an epoch); intervals across a reset are
    not recorded.
    """

    def __init__(self, device=None):
        self.device = device
        self.last: Optional[float] = None
        self.steps: List[float] = []

    def tick(self) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        if self.last is not None:
            self.steps.append(now - self.last)
        self.last = now

    def reset(self) -> None:
        self.last = None

    def take(self) -> List[float]:
        """Return and clear the recorded intervals."""
        out, self.steps = self.steps, []
        return out
