"""Where a step's host time goes: a clock the buffer and the pipeline mark at each stage."""

from __future__ import annotations

import time
from typing import Dict

#: The stages of one step, in order (see :mod:`~.buffer`): ``pick`` the candidate rows,
#: ``check`` their values, ``plan`` every rank's draws, ``serve`` the records this rank
#: sends, ``exchange`` the one collective, ``agree`` check every rank's metadata,
#: ``insert`` into the ledger and the shard, ``assemble`` the representatives and the batch.
PHASES = ("pick", "check", "plan", "serve", "exchange", "agree", "insert", "assemble")


class PhaseClock:
    """Seconds spent in each of :data:`PHASES`, summed over steps.

    ``start()`` begins a stretch; ``mark(phase)`` adds the time since the last mark (or
    start) to ``phase``. Marks cost two ``perf_counter`` calls; without a clock the stages
    only test ``None``. Work done by the background worker is timed on its thread, so in
    asynchronous mode the totals are host time, not wall time of the training thread.
    """

    def __init__(self):
        self.seconds: Dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
