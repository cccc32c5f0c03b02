"""The per-step rehearsal timeline: wait for R_i, train on [x_i ; R_i], hand x_i to the worker."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

from .buffer import ShardedRehearsalBuffer
from .draw import DrawRecord, PreparedDraw
from .exchange import process_group_timeout
from .metadata import StepContext
from .records import INPUT, LABEL, TASK, as_record
from .seeding import CANDIDATES, derive_seed
from .validation import check_int
from .worker import BackgroundWorker

Representatives = Dict[str, torch.Tensor]
#: A job's outcome: the draw's record, and either the draw still to complete (device
#: payload: the training thread launches its all-to-all) or the representatives.
Prepared = Tuple[DrawRecord, Optional[PreparedDraw], Optional[Representatives]]


class RehearsalPipeline:
    """Drives a :class:`ShardedRehearsalBuffer` once per training step.

    Every step ``i`` (``i`` counts steps since construction, the same on every rank) is
    two calls, in this order, on every rank:

    1. :meth:`take` returns the representatives ``R_i`` (prepared in the background during
       step ``i - 1``, or now if none are pending): every stored field, on the batch's
       device; the caller trains on ``[x_i ; R_i]``;
    2. :meth:`offer` picks ``c`` rows of ``x_i`` at random (a record batch: any fields,
       e.g. the model's outputs for them, so it may come after the forward pass) and
       submits one job to the worker: insert those candidates into the local shard, then
       prepare ``R_{i+1}``. ``offer(None)`` offers nothing but still prepares ``R_{i+1}``.

    :meth:`augment` does both for the ``(inputs, labels, task_labels)`` convention and
    returns the concatenated batch. x_i is trained exactly once, at step i (no lag).
    ``async_mode=False`` runs the job inline instead; for the same seed both modes produce
    the same shards and the same batches, bit for bit.

    **Collective order.** Metadata (per-class counts, on a gloo group of the buffer's
    own) is gathered by the job, in the background. The payload of a CPU shard (gloo) is
    exchanged by the job too. The payload of a CUDA shard travels on an NCCL group, and
    NCCL requires every rank to launch its communicators' kernels in the same order: if
    the worker thread launched it while the training thread launches DDP's gradient
    all-reduce, ranks could interleave them differently and deadlock. So for device
    payloads the job stops after planning and gathering the records to send, and the
    training thread launches the all-to-all itself, in :meth:`take`: on every rank, step
    ``i``'s buffer collective is launched before step ``i``'s forward pass and after step
    ``i - 1``'s backward pass (whose DDP all-reduces it therefore never overtakes), from
    one thread, in the same order.

    Classes in :attr:`excluded` (see :meth:`exclude`) are never drawn. After each
    :meth:`take`, :attr:`last_draw` describes the draw whose representatives that step
    received (global per-class counts and this rank's traffic), :attr:`wait_seconds` the
    time the calling thread waited for them.

    Args:
        buffer: the shard; the pipeline becomes its only user (call :meth:`drain` before
            touching the buffer from elsewhere).
        batch_size_mem: r, representatives per step. num_candidates: c, candidates
            offered per step (clamped to the batch size when the batch is smaller).
        timeout: seconds any wait on the worker may take; default the buffer's
            process-group timeout.
    """

    def __init__(self, buffer: ShardedRehearsalBuffer, batch_size_mem: int = 8,
                 num_candidates: int = 16, async_mode: bool = True,
                 timeout: Optional[float] = None, seed: Optional[int] = None):
        check_int("batch_size_mem", batch_size_mem, 0)
        check_int("num_candidates", num_candidates, 0)
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        self.buffer = buffer
        self.batch_size_mem = batch_size_mem
        self.num_candidates = num_candidates
        self.async_mode = bool(async_mode)
        self.seed = buffer.seed if seed is None else seed
        self.step = 0
        if timeout is None:
            timeout = getattr(buffer.exchange, "timeout", None) or process_group_timeout()
        self.worker = BackgroundWorker(timeout=timeout, device=buffer.device
                                       if buffer.device.type == "cuda" else None)
        self._pending: Optional[Future] = None
        self._ready: Optional[Prepared] = None
        self._taken = False  # take() ran for the current step; offer() must follow
        self._layout_before_take = None  # buffer.layout when take() began (see offer)
        self.excluded: tuple = ()
        self.wait_seconds = 0.0
        self.last_representatives = 0
        self.last_draw: Optional[DrawRecord] = None

    # ------------------------------------------------------------------ the step
    def take(self, device: torch.device, context: StepContext = StepContext()) -> Representatives:
        """Step ``i``, part 1: the representatives ``R_i`` (every stored field, ``(d, ...)``,
        on ``device``, in the storage dtypes; empty while nothing is eligible). New tensors:
        the caller's. ``context``: this rank's position in training, checked against every
        other rank's at each gather."""
        if self.worker.closed:
            raise RuntimeError("the rehearsal pipeline is closed")
        if self._taken:
            raise RuntimeError("take() was called twice for one step; call offer() in between")
        device = torch.device(device)
        if device.type == "cuda":
            self.worker.use_device(device)  # a side stream, CPU shards included
        self._layout_before_take = self.buffer.layout
        reps = self._take(device, context)
        self._taken = True
        self._device = device
        self.last_representatives = len(next(iter(reps.values()))) if reps else 0
        return reps

    def offer(self, record: Optional[Mapping[str, torch.Tensor]] = None,
              context: StepContext = StepContext(), checked: bool = False) -> None:
        """Step ``i``, part 2: offer ``c`` random rows of ``record`` (a record batch, see
        :mod:`~.records`; None offers nothing) and prepare ``R_{i+1}`` in the background.

        The candidate rows are copied before the call returns: the caller may reuse its
        tensors freely. A malformed record raises before anything changes (the step can
        be offered again). ``checked=True``: the caller already ran
        ``buffer.check_record`` on this very record in this step, before :meth:`take`
        (should ``take`` have learnt the layout from another rank since, the record is
        checked again at insertion)."""
        if record is not None and not checked:
            self.buffer.check_record(record)
        if self.worker.closed:
            raise RuntimeError("the rehearsal pipeline is closed")
        if not self._taken:
            raise RuntimeError("offer() must follow take() in every step")
        candidates = self._candidates(record)
        names = list(candidates)
        job_step, excluded, device = self.step + 1, self.excluded, self._device
        # the layout the record was checked against
        checked_against = self._layout_before_take if checked else self.buffer.layout
        if self.async_mode:
            self._pending = self.worker.submit(
                lambda *values: self._job(dict(zip(names, values)), job_step, device, excluded,
                                          context, checked_against),
                *candidates.values())
        else:
            self._ready = self._job(candidates, job_step, device, excluded, context,
                                    checked_against)
        self.step += 1
        self._taken = False

    def augment(self, inputs: torch.Tensor, labels: torch.Tensor,
                task_labels: Optional[torch.Tensor] = None, offer: bool = True,
                context: StepContext = StepContext()
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One whole step for ``(inputs, labels, task_labels)`` batches: :meth:`take`, then
        :meth:`offer` of the batch (or of nothing, with ``offer=False``: the batch was
        offered before). Returns ``(inputs', labels', task_labels')``, the batch followed
        by its representatives: ``b + d`` rows on ``inputs.device``, in the batch's dtypes.
        """
        record = as_record(inputs, labels, task_labels)
        self.buffer.check_record(record)  # before anything changes
        task_labels = record.get(TASK, task_labels)
        if task_labels is None:  # targets that are not class labels, no task labels
            task_labels = torch.zeros(inputs.shape[0], dtype=torch.int64, device=inputs.device)
        reps = self.take(inputs.device, context)
        self.offer(record if offer else None, context, checked=True)
        if not reps:
            return inputs, labels, task_labels
        d = reps[INPUT].shape[0]
        rep_tasks = reps.get(TASK, task_labels.new_zeros(d))
        return (torch.cat([inputs, reps[INPUT].to(inputs.dtype)]),
                torch.cat([labels, reps[LABEL].to(labels.dtype)]),
                torch.cat([task_labels, rep_tasks.to(task_labels.dtype)]))

    def _candidates(self, record: Optional[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """``c`` rows of ``record`` picked at random (per rank and step), copied."""
        if record is None:
            return {}
        b = next(iter(record.values())).shape[0]
        c = min(self.num_candidates, b)
        if c == 0:
            return {}
        gen = torch.Generator().manual_seed(
            derive_seed(self.seed, self.buffer.rank, self.step, CANDIDATES))
        order = torch.randperm(b, generator=gen)[:c]
        picked, on_device = {}, {}
        for name, value in record.items():
            index = on_device.get(value.device)
            if index is None:
                index = on_device[value.device] = order.to(value.device, non_blocking=True)
            picked[name] = value.detach().index_select(0, index)
        return picked

    def _job(self, candidates: Dict[str, torch.Tensor], step: int, out_device, excluded: tuple,
             context: StepContext, checked_against) -> Prepared:
        """Insert the candidates, then prepare (and, unless the payload is a device
        collective, complete) the draw for ``step``."""
        if candidates:  # rows of a record offer() checked, unless the layout was set since
            self.buffer.insert_record(candidates,
                                      checked=self.buffer.layout is checked_against is not None)
        return self._prepare(step, out_device, excluded, context)

    def _prepare(self, step: int, out_device, excluded: tuple, context: StepContext) -> Prepared:
        prepared = self.buffer.prepare_draw(self.batch_size_mem, step, excluded, context)
        if self.buffer.exchange.device_payload:
            return prepared.record, prepared, None
        return prepared.record, None, self.buffer.complete_draw(prepared, out_device)

    def _take(self, device, context: StepContext) -> Representatives:
        start = time.perf_counter()
        if self._pending is not None:
            record, prepared, reps = self._wait_pending()
        elif self._ready is not None:
            (record, prepared, reps), self._ready = self._ready, None
        else:
            record, prepared, reps = self._prepare(self.step, device, self.excluded, context)
        if prepared is not None:  # the training thread launches the device collective
            reps = self.buffer.complete_draw(prepared, device)
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
        return self._ready[0] if self._ready is not None else self.last_draw

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
        every rank must invalidate at the same point. A draw whose device payload was
        not exchanged yet is dropped before its collective is launched, on every rank.
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
