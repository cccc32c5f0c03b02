"""Whether a step's buffer job runs on the background worker or inline, measured.

The worker hides the buffer's work only where the machine has room for it: a GPU the
training thread waits for, a core the model's intra-op threads leave free, a collective
whose wait can overlap compute. Where the model's threads take every core, a job on the
worker competes with them (and for the interpreter lock) and makes steps slower than
running it inline. Both give the same results, bit for bit, so
``RehearsalPipeline(async_mode="auto")`` measures and picks, step by step, with
:class:`OverlapChooser`.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

WORKER, INLINE = "worker", "inline"
_WARMUP, _PROBE, _HOLD = "warmup", "probe", "hold"


def median_error(q1: float, q3: float, n: int) -> float:
    """The standard error of the median of ``n`` samples with quartiles ``q1``, ``q3``,
    as for a normal law (sigma = IQR / 1.349, error = 1.2533 sigma / sqrt(n)), so that a
    few outliers (a step that started an experience) do not inflate it."""
    return 1.2533 * (q3 - q1) / 1.349 / math.sqrt(n)


def median_and_error(samples: Sequence[float]) -> Tuple[float, float]:
    """``(median, standard error of the median)`` of ``samples``, the error from their
    interquartile range (:func:`median_error`); infinite with fewer than two samples."""
    n = len(samples)
    median = statistics.median(samples)
    if n < 2:
        return median, math.inf
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return median, median_error(q1, q3, n)


class OverlapChooser:
    """Chooses the mode of each step's job from the training thread's time per step.

    A cycle: a probe of up to ``2 * probe`` measured steps in blocks of ``block`` steps,
    the modes in the order worker, inline, inline, worker, worker, inline, ... (a drift
    of the machine's speed during the probe, linear in time, falls on both modes alike);
    then a hold of steps in the mode chosen; then again. The worker is chosen only when
    its median time per step is below ``1 - margin`` times the inline median *and* the
    two medians differ by more than ``z`` standard errors of their difference (estimated
    from the probe's own spread, :func:`median_and_error`). The worker costs a thread,
    copies of the candidates and a hand-over per step, so on a near-tie, or where steps
    vary too much for the probe to tell the modes apart, the job runs inline: the
    synchronous pipeline's steps exactly.

    What the probe costs is bounded two ways. The probe ends early, inline chosen, at
    the end of any pair of blocks (both modes measured alike) where the worker's median
    is not below the inline one: it could not win by the margin. And a hold that repeats
    the previous cycle's choice is twice as long as the previous hold, up to ``max_hold``
    steps (default ``8 * hold``); a changed choice starts again from ``hold``.

    With ``agree`` (the pipeline's, under ``torch.distributed``), each rank's choice is
    a vote: ``agree(vote)`` returns the mode every rank must use (the worker only if every
    rank voted for it), since a step is as slow as its slowest rank and ranks that mix
    modes wait for each other at both the buffer's collective and the gradients'. The
    early end is voted alike (the probe goes on only while every rank's worker is ahead).

    A step's time is from the end of one :meth:`tick` to the end of the next: the
    training thread's whole step, its job (inline) or the wait for it (worker) included.
    The first ``warmup`` steps run inline and are not measured; until the first choice
    the held mode is inline.
    """

    def __init__(self, probe: int = 16, hold: int = 480, warmup: int = 4, block: int = 4,
                 margin: float = 0.03, z: float = 2.0, max_hold: Optional[int] = None,
                 agree: Optional[Callable[[bool], bool]] = None):
        if probe < 1 or hold < 0 or warmup < 0:
            raise ValueError("probe must be >= 1, hold and warmup >= 0")
        if block < 1 or probe % block:
            raise ValueError(f"block must be >= 1 and divide probe={probe}, got {block}")
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {margin!r}")
        if not z >= 0.0:
            raise ValueError(f"z must be >= 0, got {z!r}")
        max_hold = 8 * hold if max_hold is None else max_hold
        if max_hold < hold:
            raise ValueError(f"max_hold must be >= hold={hold}, got {max_hold}")
        self.probe, self.hold, self.warmup, self.max_hold = probe, hold, warmup, max_hold
        self.block, self.margin, self.z = block, float(margin), float(z)
        self.agree = agree
        self.samples: Dict[str, List[float]] = {WORKER: [], INLINE: []}
        self.chosen = INLINE
        self.choices = 0  # how many cycles ended
        self.early_ends = 0  # how many of them ended their probe early
        self.held = hold  # the length of the current (or next) hold
        self._phase, self._left = (_WARMUP, warmup) if warmup else (_PROBE, 2 * probe)
        self._last: Optional[float] = None
        self._last_mode: Optional[str] = None

    def mode(self) -> str:
        """The mode of the job offered now (the step :meth:`tick` last counted)."""
        if self._phase == _WARMUP:
            return INLINE
        if self._phase == _HOLD:
            return self.chosen
        done = 2 * self.probe - self._left
        return WORKER if (done // self.block) % 4 in (0, 3) else INLINE

    def tick(self, now: Optional[float] = None) -> None:
        """A step's representatives were taken: the step before it has ended."""
        now = time.perf_counter() if now is None else now
        if self._last is not None and self._last_mode is not None and self._phase == _PROBE:
            self.samples[self._last_mode].append(now - self._last)
        self._last = now

    def offered(self, mode: str) -> None:
        """The job of the current step was run in ``mode``; advance to the next step."""
        self._last_mode = mode if self._phase == _PROBE else None
        self._left -= 1
        if self._phase == _PROBE:
            if self._left == 0:
                self._choose(self._agreed(self.vote()))
            elif (2 * self.probe - self._left) % (2 * self.block) == 0:  # a pair of blocks
                if not self._agreed(self.ahead()):
                    self.early_ends += 1
                    self._choose(False)
        elif self._left <= 0:
            self._phase, self._left = _PROBE, 2 * self.probe

    def _agreed(self, vote: bool) -> bool:
        """``vote``, or with ``agree`` every rank's verdict (a collective: every rank
        reaches it at the same step)."""
        return self.agree(vote) if self.agree is not None else vote

    def ahead(self) -> bool:
        """Whether this rank's worker is still ahead in the probe so far: its median step
        shorter than the inline one (True while a mode has no samples)."""
        worker, inline = self.samples[WORKER], self.samples[INLINE]
        return not (worker and inline) or statistics.median(worker) < statistics.median(inline)

    def vote(self) -> bool:
        """Whether this rank's probe found the worker faster (by the margin and beyond
        the noise); with no samples of a mode, the mode held so far."""
        worker, inline = self.samples[WORKER], self.samples[INLINE]
        if not (worker and inline):
            return self.chosen == WORKER
        (w, w_err), (i, i_err) = median_and_error(worker), median_and_error(inline)
        return w < (1.0 - self.margin) * i and i - w > self.z * math.hypot(w_err, i_err)

    def _choose(self, faster: bool) -> None:
        """End the probe: hold the worker if ``faster`` (as agreed), else inline."""
        chosen = WORKER if faster else INLINE
        if self.choices:
            self.held = min(2 * self.held, self.max_hold) if chosen == self.chosen else self.hold
        self.chosen = chosen
        self.samples = {WORKER: [], INLINE: []}
        self.choices += 1
        self._phase, self._left = (_HOLD, self.held) if self.held else (_PROBE, 2 * self.probe)
