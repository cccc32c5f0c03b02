"""The per-step rehearsal timeline: wait for R_i, train on [x_i ; R_i], hand x_i to the worker."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

from .buffer import ShardedRehearsalBuffer, StepState
from .candidates import Candidates
from .draw import DrawRecord, PreparedDraw
from .exchange import process_group_timeout
from .metadata import StepContext
from .overlap import INLINE, WORKER, OverlapChooser
from .records import INPUT, LABEL, TASK, as_record
from .seeding import CANDIDATES, derive_seed
from .validation import check_async_mode, check_int
from .worker import BackgroundWorker

Representatives = Dict[str, torch.Tensor]
#: A job's outcome: the step's state (its records possibly still to exchange: a CUDA
#: shard's payload, which the training thread launches) and its draw record.
Prepared = Tuple[DrawRecord, StepState]


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class RehearsalPipeline:
    """Drives a :class:`ShardedRehearsalBuffer` once per training step.

    Every step ``i`` (``i`` counts steps since construction, the same on every rank) is
    two calls, in this order, on every rank:

    1. :meth:`take` returns the representatives ``R_i`` (prepared in the background during
       step ``i - 1``, or now if none are pending): every stored field, on the batch's
       device; the caller trains on ``[x_i ; R_i]``;
    2. :meth:`offer` picks ``c`` rows of ``x_i`` at random (a record batch: any fields,
       e.g. the model's outputs for them, so it may come after the forward pass) and
       submits one job to the worker: one buffer step (:meth:`~.buffer.ShardedRehearsalBuffer.step`)
       that plans and moves ``R_{i+1}`` and inserts those candidates, with one collective.
       ``offer(None)`` offers nothing but still prepares ``R_{i+1}``.

    :meth:`augment` does both for the ``(inputs, labels, task_labels)`` convention and
    returns the concatenated batch. x_i is trained exactly once, at step i (no lag); its
    candidates can be drawn from step ``i + 2`` on (``R_{i+1}`` is planned before they are
    inserted). ``async_mode=False`` runs the job inline instead; for the same seed both
    modes produce the same shards and the same batches, bit for bit. ``async_mode="auto"``
    measures the training thread's time per step in both and keeps the worker only when
    it is measurably faster (else inline), measuring again every 512 steps
    (:class:`~.overlap.OverlapChooser`): the worker hides the work only where the machine
    has room for it (a GPU, a free core, a collective to wait on).

    **Collectives.** A job is one collective on the buffer's payload group, which carries
    every rank's step metadata (header and candidate keys) and the representatives'
    records. The first step, and the first after the buffer changed outside the pipeline
    (a load, a resize, ``post_adapt``), synchronise instead: a small metadata gather on the
    buffer's metadata group first, then the records. The payload of a CUDA shard travels
    on an NCCL group, and NCCL requires every rank to launch its communicators' kernels in
    the same order: if the worker thread launched it while the training thread launches
    DDP's gradient all-reduce, ranks could interleave them differently and deadlock. So for
    device payloads the job gathers the metadata (gloo, in the background), plans and
    serves, inserts, and stops; the training thread launches the records' all-to-all itself,
    in :meth:`take`: on every rank, step ``i``'s buffer collective is launched before step
    ``i``'s forward pass and after step ``i - 1``'s backward pass (whose DDP all-reduces it
    therefore never overtakes), from one thread, in the same order.

    **Excluded classes** (:meth:`exclude`) are never drawn. Because a job plans the next
    step's draw and announces the exclusion of the one after (so that every exchange's
    sizes follow from state the ranks already agreed on), the pipeline must know the
    exclusion ahead: :meth:`take`'s ``steps_left`` (steps left in the current experience
    after this one) tells it that the exclusion ends with the experience (the plugin
    passes it). Representatives planned under an exclusion that differs in effect from the
    one in force (a class that differs holds samples) are re-drawn at once, synchronously,
    on every rank; with ``steps_left`` given this never happens at experience boundaries.

    After each :meth:`take`, :attr:`last_draw` describes the draw whose representatives
    that step received (global per-class counts and this rank's traffic),
    :attr:`wait_seconds` the time the calling thread waited for them.

    Args:
        buffer: the shard; the pipeline becomes its only user (call :meth:`drain` before
            touching the buffer from elsewhere).
        batch_size_mem: r, representatives per step. num_candidates: c, candidates
            offered per step (clamped to the batch size when the batch is smaller).
        timeout: seconds any wait on the worker may take; default the buffer's
            process-group timeout.
        worker_threads: intra-op threads of the worker thread (default 1, see
            :class:`~.worker.BackgroundWorker`).
    """

    def __init__(self, buffer: ShardedRehearsalBuffer, batch_size_mem: int = 8,
                 num_candidates: int = 16, async_mode: bool = True,
                 timeout: Optional[float] = None, seed: Optional[int] = None,
                 worker_threads: int = 1):
        check_int("batch_size_mem", batch_size_mem, 0)
        check_int("num_candidates", num_candidates, 0)
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        self.buffer = buffer
        self.batch_size_mem = batch_size_mem
        self.num_candidates = num_candidates
        buffer.max_candidates = num_candidates
        buffer.step_r = batch_size_mem
        check_async_mode(async_mode)
        self.async_mode = bool(async_mode)  # a worker thread exists
        #: with async_mode="auto": measures which mode is faster (see :mod:`~.overlap`);
        #: every rank votes, so that all run their jobs in the same mode
        self.chooser: Optional[OverlapChooser] = None
        if async_mode == "auto":
            self.chooser = OverlapChooser(agree=self._agree_on_worker)
        buffer.votes_on_overlap = self.chooser is not None
        self.seed = buffer.seed if seed is None else seed
        self.step = 0
        if timeout is None:
            timeout = getattr(buffer.exchange, "timeout", None) or process_group_timeout()
        self.worker = BackgroundWorker(timeout=timeout, device=buffer.device
                                       if buffer.device.type == "cuda" else None,
                                       threads=worker_threads)
        #: which rows of each batch are offered (every rank its own stream)
        self._generator = torch.Generator().manual_seed(
            derive_seed(self.seed, buffer.rank, CANDIDATES))
        self._pending: Optional[Future] = None
        self._ready: Optional[Prepared] = None
        self._taken = False  # take() ran for the current step; offer() must follow
        self._layout_before_take = None  # buffer.layout when take() began (see offer)
        self._steps_left: Optional[int] = None
        self.excluded: tuple = ()
        self.wait_seconds = 0.0
        self.last_representatives = 0
        self.last_draw: Optional[DrawRecord] = None
        self.redraws = 0  # representatives re-drawn because the exclusion changed in effect

    def _agree_on_worker(self, vote: bool) -> bool:
        """Whether every rank voted for the worker (a collective on the buffer's metadata
        group, called by the chooser from :meth:`offer` at the same step on every rank,
        when no job is in flight)."""
        votes = self.buffer.exchange.all_reduce_sum(torch.tensor([int(vote)], dtype=torch.int64))
        return int(votes) == self.buffer.world_size

    # ------------------------------------------------------------------ exclusion ahead
    def _excluded_at(self, offset: int) -> tuple:
        """The exclusion in force ``offset`` steps after the current one: the current set
        within the experience, none past its end (its new classes are the next
        experience's past classes; the next experience's new classes hold no samples yet)."""
        if self._steps_left is not None and self._steps_left < offset:
            return ()
        return self.excluded

    # ------------------------------------------------------------------ the step
    def take(self, device: torch.device, context: StepContext = StepContext(),
             steps_left: Optional[int] = None) -> Representatives:
        """Step ``i``, part 1: the representatives ``R_i`` (every stored field, ``(d, ...)``,
        on ``device``, in the storage dtypes; empty while nothing is eligible). New tensors:
        the caller's. ``context``: this rank's position in training, checked against every
        other rank's. ``steps_left``: training steps left in the current experience after
        this one (None: unknown), see the class doc."""
        if self.worker.closed:
            raise RuntimeError("the rehearsal pipeline is closed")
        if self._taken:
            raise RuntimeError("take() was called twice for one step; call offer() in between")
        if not isinstance(device, torch.device):
            device = torch.device(device)
        if device.type == "cuda":
            self.worker.use_device(device)  # a side stream, CPU shards included
        self._steps_left = steps_left
        self._layout_before_take = self.buffer.layout
        reps = self._take(device, context)
        if self.chooser is not None:
            self.chooser.tick()
        self._taken = True
        self._device = device
        self._context = context
        self.last_representatives = len(next(iter(reps.values()))) if reps else 0
        return reps

    def offer(self, record: Optional[Mapping[str, torch.Tensor]] = None,
              context: Optional[StepContext] = None, checked: bool = False) -> None:
        """Step ``i``, part 2: offer ``c`` random rows of ``record`` (a record batch, see
        :mod:`~.records`; None offers nothing) and prepare ``R_{i+1}`` in the background.

        The candidate rows are copied before the call returns: the caller may reuse its
        tensors freely. A malformed record raises before anything changes (the step can
        be offered again). ``checked=True``: the caller already ran
        ``buffer.check_record`` on this very record in this step, before :meth:`take`
        (should ``take`` have learnt the layout from another rank since, the record is
        checked again). ``context`` defaults to :meth:`take`'s."""
        if not self._taken:
            raise RuntimeError("offer() must follow take() in every step")
        if record is not None and (not checked or self.buffer.layout is not self._layout_before_take):
            self.buffer.check_record(record)
        if self.worker.closed:
            raise RuntimeError("the rehearsal pipeline is closed")
        context = self._context if context is None else context
        rows = self._pick(record)
        clock = self.buffer.phase_clock if not self.async_mode else None
        if clock:
            clock.mark("pick")
        step = self.step + 1
        excluded, announce, device = self._excluded_at(1), self._excluded_at(2), self._device
        on_worker = self.async_mode and (self.chooser is None or self.chooser.mode() == WORKER)
        if self.chooser is not None:
            self.chooser.offered(WORKER if on_worker else INLINE)
        if on_worker:  # the worker gets copies: the caller may reuse its tensors
            copies = {} if rows is None else {name: value.detach().index_select(
                0, rows.to(value.device, non_blocking=True)) for name, value in record.items()}
            names = list(copies)
            self._pending = self.worker.submit(
                lambda *values: self._job(Candidates(dict(zip(names, values))) if values else None,
                                          step, excluded, announce, context, device),
                *copies.values())
        else:  # used before offer() returns: the batch itself (detached), no copy
            candidates = None if rows is None else Candidates(
                {name: value.detach() if value.requires_grad else value
                 for name, value in record.items()}, rows)
            self._ready = self._job(candidates, step, excluded, announce, context, device)
        self.step += 1
        self._taken = False

    def augment(self, inputs: torch.Tensor, labels: torch.Tensor,
                task_labels: Optional[torch.Tensor] = None, offer: bool = True,
                context: StepContext = StepContext(), steps_left: Optional[int] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One whole step for ``(inputs, labels, task_labels)`` batches: :meth:`take`, then
        :meth:`offer` of the batch (or of nothing, with ``offer=False``: the batch was
        offered before). Returns ``(inputs', labels', task_labels')``, the batch followed
        by its representatives: ``b + d`` rows on ``inputs.device``, in the batch's dtypes.
        """
        clock = self.buffer.phase_clock if not self.async_mode else None
        if clock:
            clock.start()
        record = as_record(inputs, labels, task_labels)
        self.buffer.check_record(record)  # before anything changes
        task_labels = record.get(TASK, task_labels)
        if task_labels is None:  # targets that are not class labels, no task labels
            task_labels = torch.zeros(inputs.shape[0], dtype=torch.int64, device=inputs.device)
        if clock:
            clock.mark("check")
        reps = self.take(inputs.device, context, steps_left)
        self.offer(record if offer else None, context, checked=True)
        if not reps:
            return inputs, labels, task_labels
        rep_tasks = reps.get(TASK)
        if rep_tasks is None:
            rep_tasks = task_labels.new_zeros(reps[INPUT].shape[0])
        out = (torch.cat([inputs, _as(reps[INPUT], inputs.dtype)]),
               torch.cat([labels, _as(reps[LABEL], labels.dtype)]),
               torch.cat([task_labels, _as(rep_tasks, task_labels.dtype)]))
        if clock:
            clock.mark("assemble")
        return out

    def _pick(self, record: Optional[Mapping[str, torch.Tensor]]) -> Optional[torch.Tensor]:
        """The ``(c,)`` rows of ``record`` offered this step, at random (None: no record)."""
        if record is None:
            return None
        b = next(iter(record.values())).shape[0]
        c = min(self.num_candidates, b)
        if c == 0:
            return None
        return torch.randperm(b, generator=self._generator)[:c]

    def _job(self, candidates, step: int, excluded: tuple, announce: tuple,
             context: StepContext, out_device) -> Prepared:
        """One buffer step: insert the candidates and prepare the draw for ``step``."""
        buffer = self.buffer
        state = buffer.prepare_step(
            candidates, self.batch_size_mem, step, excluded, announce, context,
            protocol="fast", checked=True,
            exchange_records_now=not buffer.exchange.device_payload)
        if not state.prepared.moves or state.records is not None:
            state.extra["reps"] = buffer.complete_step(state, out_device)
        return state.prepared.record, state

    def _draw_now(self, device, context: StepContext) -> Prepared:
        """A synchronising draw for the current step, inline (nothing prepared, or what was
        prepared was planned under an exclusion that differs in effect)."""
        state = self.buffer.prepare_step(None, self.batch_size_mem, self.step, self.excluded,
                                         self._excluded_at(1), context, protocol="fast",
                                         exchange_records_now=False)
        return state.prepared.record, state

    def _take(self, device, context: StepContext) -> Representatives:
        start = time.perf_counter()
        if self._pending is not None:
            record, state = self._wait_pending()
        elif self._ready is not None:
            (record, state), self._ready = self._ready, None
        else:
            record, state = self._draw_now(device, context)
        if not self._still_valid(record):
            self.redraws += 1
            record, state = self._draw_now(device, context)
        reps = state.extra.get("reps")
        if reps is None:  # the training thread launches the device collective
            reps = self.buffer.complete_step(state, device)
        elif reps and next(iter(reps.values())).device != device:
            reps = {k: v.to(device) for k, v in reps.items()}
        self.wait_seconds = time.perf_counter() - start
        self.last_draw = record
        return reps

    def _still_valid(self, record: DrawRecord) -> bool:
        """Whether representatives planned under ``record.excluded`` are exactly what the
        current exclusion would draw (no class that differs had samples at that plan)."""
        if record.excluded == self.excluded:
            return True
        return self.buffer.ledger.unborn_since(set(record.excluded) ^ set(self.excluded),
                                               record.step)

    def exclude(self, labels: Iterable[int]) -> None:
        """Never draw samples of these class labels from now on (replaces the previous set).

        Collective in effect: every rank must pass the same labels at the same step.
        Representatives prepared under the old set are kept when the change cannot affect
        them (no class that differs holds samples), else re-drawn at the next :meth:`take`.
        """
        excluded = tuple(sorted({int(c) for c in labels}))
        if any(c < 0 for c in excluded):
            raise ValueError(f"excluded labels must be >= 0, got {list(excluded)}")
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

        Collective in effect: the next :meth:`take` draws inline on every rank, so every
        rank must invalidate at the same point. A draw whose device payload was not
        exchanged yet is dropped before its collective is launched, on every rank.
        """
        self.drain()
        self._ready = None

    def state_dict(self) -> dict:
        """The step counter, excluded labels and the representatives prepared for the next
        step (the next take() returns them: a same-world resume is bit-identical), as CPU
        tensors and plain data. Waits for the job in flight."""
        self.drain()
        state = {"step": self.step, "excluded": list(self.excluded), "ready": None,
                 "candidates_rng": self._generator.get_state()}
        if self._ready is not None:
            record, prepared_state = self._ready
            reps = prepared_state.extra.get("reps")
            ready = {"step": record.step, "excluded": list(record.excluded)}
            if reps is not None:
                ready["reps"] = {k: v.detach().to("cpu", copy=True) for k, v in reps.items()}
            else:  # a device payload not exchanged yet: what this rank sends, and where
                p = prepared_state.prepared
                ready["send"] = p.send.to("cpu", copy=True)
                ready["send_splits"], ready["recv_splits"] = list(p.send_splits), list(p.recv_splits)
                ready["where"] = p.where.to("cpu", copy=True)
            state["ready"] = ready
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (the buffer's own state is loaded apart)."""
        step = state["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"state['step'] must be an int >= 0, got {step!r}")
        self.invalidate()
        self.exclude(state.get("excluded", ()))
        self.step = step
        if state.get("candidates_rng") is not None:
            self._generator.set_state(state["candidates_rng"])
        ready = state.get("ready")
        if ready:
            record = DrawRecord(int(ready["step"]), self.buffer.ledger.snapshot(),
                                tuple(ready["excluded"]), self.buffer.last_exchange,
                                self.buffer.bytes_per_sample)
            if "reps" in ready:
                prepared = PreparedDraw(record=record, fields={})
                restored = StepState(prepared, extra={"reps": dict(ready["reps"])})
            else:
                device = self.buffer.device
                prepared = PreparedDraw(record=record, send=ready["send"].to(device),
                                        send_splits=list(ready["send_splits"]),
                                        recv_splits=list(ready["recv_splits"]),
                                        where=ready["where"].to(device))
                restored = StepState(prepared)
            self._ready = (record, restored)

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
