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

import statistics
import time
from typing import Dict, List, Optional

WORKER, INLINE = "worker", "inline"


class OverlapChooser:
    """Chooses the mode of each step's job from the training thread's time per step.

    A cycle: ``probe`` steps with the job on the worker, ``probe`` steps inline, then
    ``hold`` steps in the mode whose median time per step was lower (the worker on a
    tie), then again. A step's time is from the end of one :meth:`tick` to the end of the
    next: the training thread's whole step, its job (inline) or the wait for it (worker)
    included. The first ``warmup`` steps run on the worker and are not measured.
    """

    def __init__(self, probe: int = 16, hold: int = 480, warmup: int = 4):
        if probe < 1 or hold < 0 or warmup < 0:
            raise ValueError("probe must be >= 1, hold and warmup >= 0")
        self.probe, self.hold, self.warmup = probe, hold, warmup
        self.samples: Dict[str, List[float]] = {WORKER: [], INLINE: []}
        self.chosen = WORKER
        self.choices = 0  # how many cycles ended
        self._step = 0
        self._last: Optional[float] = None
        self._last_mode: Optional[str] = None

    def mode(self) -> str:
        """The mode of the job offered now (the step :meth:`tick` last counted)."""
        s = self._step - self.warmup
        if s < 0:
            return WORKER
        cycle = 2 * self.probe + self.hold
        s %= cycle
        if s < self.probe:
            return WORKER
        if s < 2 * self.probe:
            return INLINE
        return self.chosen

    def tick(self, now: Optional[float] = None) -> None:
        """A step's representatives were taken: the step before it has ended."""
        now = time.perf_counter() if now is None else now
        if self._last is not None and self._last_mode is not None and self._probing():
            self.samples[self._last_mode].append(now - self._last)
        self._last = now

    def offered(self, mode: str) -> None:
        """The job of the current step was run in ``mode``; advance to the next step."""
        self._last_mode = mode if self._probing() else None
        self._step += 1
        s = self._step - self.warmup
        if s > 0 and s % (2 * self.probe + self.hold) == 2 * self.probe:
            self._choose()

    def _probing(self) -> bool:
        s = self._step - self.warmup
        return s >= 0 and s % (2 * self.probe + self.hold) < 2 * self.probe

    def _choose(self) -> None:
        worker, inline = self.samples[WORKER], self.samples[INLINE]
        if worker and inline:
            self.chosen = WORKER if statistics.median(worker) <= statistics.median(inline) else INLINE
        self.samples = {WORKER: [], INLINE: []}
        self.choices += 1
