"""The per-step rehearsal timeline: wait for R_i, train on [x_i ; R_i], hand x_i to the worker."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Dict, Iterable, Optional, Tuple

import torch

from .buffer import INPUT, LABEL, TASK, DrawRecord, ShardedRehearsalBuffer
from .seeding import derive_seed
from .validation import check_int
from .worker import BackgroundWorker

Representatives = Dict[str, torch.Tensor]


class RehearsalPipeline:
    """Drives a :class:`ShardedRehearsalBuffer` once per training step.

    At step ``i`` (``i`` counts steps since construction, the same on every rank),
    :meth:`augment` takes the batch ``x_i``:

    1. gets the representatives ``R_i`` (prepared in the background during step
       ``i - 1``, or now if none are pending);
    2. picks ``c`` candidates of ``x_i`` at random and submits one job to the worker:
       insert the candidates into the local shard, then draw ``R_{i+1}``;
    3. returns ``[x_i ; R_i]`` (``b + d`` rows, ``d = min(r, buffer size)``).

    ``async_mode=False`` runs the job inline instead; for the same seed both modes produce
    the same shards and the same augmented batches, bit for bit.

    Classes in :attr:`excluded` (see :meth:`exclude`) are never drawn. After each
    :meth:`augment`, :attr:`last_draw` describes the draw whose representatives that step
    received (global per-class counts and this rank's traffic), :attr:`wait_seconds` the
    time the calling thread waited for them.

    Args:
        buffer: the shard; the pipeline becomes its only user (call :meth:`drain` before
            touching the buffer from elsewhere).
        batch_size_mem: r, representatives per step. num_candidates: c, candidates
            offered per step (clamped to the batch size when the batch is smaller).
        timeout: seconds any wait on the worker may take.
    """

    def __init__(self, buffer: ShardedRehearsalBuffer, batch_size_mem: int = 8,
                 num_candidates: int = 16, async_mode: bool = True, timeout: float = 300.0,
                 seed: Optional[int] = None):
        check_int("batch_size_mem", batch_size_mem, 0)
        check_int("num_candidates", num_candidates, 0)
        self.buffer = buffer
        self.batch_size_mem = batch_size_mem
        self.num_candidates = num_candidates
        self.async_mode = bool(async_mode)
        self.seed = buffer.seed if seed is None else seed
        self.step = 0
        self.worker = BackgroundWorker(timeout=timeout, device=buffer.device
                                       if buffer.device.type == "cuda" else None)
        self._pending: Optional[Future] = None
        self._ready: Optional[Tuple[Representatives, Optional[DrawRecord]]] = None
        self.excluded: tuple = ()
        self.wait_seconds = 0.0
        self.last_representatives = 0
        self.last_draw: Optional[DrawRecord] = None

    # ------------------------------------------------------------------ the step
    def augment(self, inputs: torch.Tensor, labels: torch.Tensor,
                task_labels: Optional[torch.Tensor] = None, offer: bool = True
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(inputs', labels', task_labels')``: the batch followed by its representatives.

        Every rank must call it once per training step. ``inputs`` is ``(b, ...)``;
        the outputs have ``b + d`` rows, on ``inputs.device``, in the batch's dtypes.
        ``offer=False`` offers no candidate this step (the batch was offered before).
        Candidates are copied before the call returns work to the worker; the caller
        may reuse its tensors freely.
        """
        if self.worker.closed:
            raise RuntimeError("the rehearsal pipeline is closed")
        self.buffer.check_insert(inputs, labels, task_labels)
        if task_labels is None:
            task_labels = torch.zeros_like(labels)
        reps = self._take(inputs.device)
        cand_x, cand_y, cand_t = self._candidates(inputs, labels, task_labels,
                                                  self.num_candidates if offer else 0)
        job_step, excluded = self.step + 1, self.excluded
        if self.async_mode:
            self._pending = self.worker.submit(
                lambda x, y, t: self._insert_and_draw(x, y, t, job_step, inputs.device, excluded),
                cand_x, cand_y, cand_t)
        else:
            self._ready = self._insert_and_draw(cand_x, cand_y, cand_t, job_step, inputs.device,
                                                excluded)
        self.step += 1
        self.last_representatives = len(reps[LABEL]) if reps else 0
        if not reps:
            return inputs, labels, task_labels
        return (torch.cat([inputs, reps[INPUT].to(inputs.dtype)]),
                torch.cat([labels, reps[LABEL].to(labels.dtype)]),
                torch.cat([task_labels, reps[TASK].to(task_labels.dtype)]))

    def _candidates(self, inputs, labels, task_labels, num_candidates: int):
        b = inputs.shape[0]
        c = min(num_candidates, b)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.buffer.rank, self.step, 0xCA))
        index = torch.randperm(b, generator=gen)[:c].to(inputs.device, non_blocking=True)
        return inputs.index_select(0, index), labels.index_select(0, index), task_labels.index_select(0, index)

    def _insert_and_draw(self, x, y, t, step: int, out_device, excluded: tuple):
        if x.shape[0]:
            self.buffer.insert(x, y, t)
        reps = self.buffer.draw(self.batch_size_mem, step, out_device, exclude=excluded)
        return reps, self.buffer.last_draw

    def _take(self, device) -> Representatives:
        start = time.perf_counter()
        if self._pending is not None:
            reps, record = self._wait_pending()
        elif self._ready is not None:
            (reps, record), self._ready = self._ready, None
        else:
            reps = self.buffer.draw(self.batch_size_mem, self.step, device, exclude=self.excluded)
            record = self.buffer.last_draw
        self.wait_seconds = time.perf_counter() - start
        self.last_draw = record
        return reps

    def exclude(self, labels: Iterable[int]) -> None:
        """Never draw samples of these class labels from now on (replaces the previous set).

        Collective in effect: every rank must pass the same labels at the same step. When
        the set changes, representatives prepared under the old set are dropped and the
        next :meth:`augment` draws inline.
        """
        excluded = tuple(sorted({int(c) for c in labels}))
        if any(c < 0 for c in excluded):
            raise ValueError(f"excluded labels must be >= 0, got {list(excluded)}")
        if excluded != self.excluded:
            self.invalidate()
            self.excluded = excluded

    def newest_draw(self) -> Optional[DrawRecord]:
        """The most recent finished draw: the one prepared for the next step (after waiting
        for it), else the one of the last step. Re-raises a worker exception."""
        self.drain()
        return self._ready[1] if self._ready is not None else self.last_draw

    # ------------------------------------------------------------------ lifecycle
    def drain(self) -> None:
        """Wait for the job in flight, keeping its representatives for the next step.

        Re-raises a worker exception. After it returns, the buffer is idle and may be
        read or modified from the calling thread.
        """
        if self._pending is not None:
            self._ready = self._wait_pending()

    def _wait_pending(self):
        """Wait for the job in flight; forget it once it has ended (with a value or an error).

        Interrupted (Ctrl-C) or timed out, the job is still running: it stays pending, so
        the next step, :meth:`drain` or :meth:`state_dict` waits for it again instead of
        using the buffer while the worker does.
        """
        future = self._pending
        try:
            return self.worker.result(future)
        finally:
            if future.done():
                self._pending = None

    def invalidate(self) -> None:
        """Drop prepared representatives (after the buffer changed outside the pipeline).

        Collective in effect: the next :meth:`augment` draws inline on every rank, so
        every rank must invalidate at the same point.
        """
        self.drain()
        self._ready = None

    def state_dict(self) -> dict:
        """The step counter and excluded labels (prepared representatives are re-drawn on
        resume, identically)."""
        self.drain()
        return {"step": self.step, "excluded": list(self.excluded)}

    def load_state_dict(self, state: dict) -> None:
        step = state["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"state['step'] must be an int >= 0, got {step!r}")
        self.invalidate()
        self.exclude(state.get("excluded", ()))
        self.step = step

    def close(self) -> None:
        """Drain and stop the worker thread (the buffer, and its process group, stay open).

        If that wait fails (a worker error, a timeout, Ctrl-C), the thread is told to stop
        after its current job without a second wait, and the error is raised.
        """
        if self.worker.closed:
            return
        try:
            self.drain()
        except BaseException:
            self.worker.close(wait=False)
            raise
        self.worker.close()
