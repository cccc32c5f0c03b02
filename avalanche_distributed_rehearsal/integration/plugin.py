"""``DistributedReplayPlugin``: per-step global rehearsal for any SupervisedTemplate strategy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable, Optional, Set

import torch
from avalanche.core import SupervisedPlugin

from ..core import RehearsalPipeline, StepContext
from ..core.records import INPUT
from ..core.validation import check_async_mode, check_int
from .batches import BatchFields
from .storage_policy import DistributedRehearsalBuffer, _world

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate


class DistributedReplayPlugin(SupervisedPlugin, supports_distributed=True):
    """Experience replay from a buffer sharded over data-parallel ranks.

    Every training step, the ``b`` samples of the mini-batch are followed by ``r``
    representatives drawn from the union of all ranks' shards, and ``c`` of the ``b``
    samples are offered to this rank's shard. The buffer work (insert, sample, exchange)
    runs in a background thread (on its own CUDA stream on GPU) while the model computes.

    Candidates are offered during one epoch of each experience only (the first by
    default, ``offer_epoch="last"`` for the last), so every sample of the stream is
    offered at most once (re-offering it in later epochs would let the buffer hold copies
    of the same sample).

    Samples are records of named fields (see
    :mod:`avalanche_distributed_rehearsal.core.records`): by default the mini-batch's
    input, label and task label (``[x, y, ..., t]``: Avalanche reads the task label last),
    or every per-sample tensor of a dictionary mini-batch; ``fields`` chooses. Stored
    entries of the mini-batch become ``[batch ; representatives]``; entries the buffer does
    not store pass through untouched. With ``store_outputs="logits"`` each candidate also
    keeps the model's output for it at insertion time (taken after the forward pass,
    stored in ``output_dtype``), and the replayed rows' stored outputs are in
    :attr:`last_replay` (Dark Experience Replay, see :class:`DistributedDER`).

    Args:
        mem_size: global budget M: samples stored over all ranks together.
        batch_size_mem: r, representatives appended to every mini-batch. Default: a
            quarter of the strategy's ``train_mb_size`` (at least 1).
        num_candidates: c, samples of each mini-batch offered to the shard. Default: the
            whole mini-batch. Larger than the batch is clamped to the batch.
        sampling: ``"uniform"``, ``"class_balanced"``, ``"local"`` or a core ``Sampler``
            (see :class:`DistributedRehearsalBuffer`).
        async_mode: ``"auto"`` (default): the buffer work runs on the background worker
            or inline, measured every 512 steps: the worker only while its training
            steps are measurably (and more than 3 %) shorter, inline otherwise (the
            worker hides the work only where the machine has room for it: a GPU, a core
            the model's threads leave free, a collective to wait on); True: always on the
            worker; False: always inline. All give bit-identical results for the same
            seed.
        seed: the same on every rank.
        device: where shards live; None follows the strategy's device.
        storage_policy: an existing :class:`DistributedRehearsalBuffer` to use (its
            ``max_size`` must equal ``mem_size``); other storage arguments are then ignored.
        timeout: seconds any wait on the worker or a collective may take; default (None)
            the default process group's timeout.
        nonfinite: ``"raise"`` (default) rejects batches with NaN or Inf inputs;
            ``"skip"`` keeps such samples out of the buffer.
        replay_new_classes: False (default): while an experience trains, samples of the
            classes it introduces (classes no earlier experience had) are stored but not
            replayed, so replay spends its ``r`` slots on past classes, as Avalanche's
            ``ReplayPlugin`` does; they are replayed from the next experience on. True:
            replay every stored class, as the reference design does. Needs experiences
            that tell their classes (``classes_in_this_experience`` or
            ``dataset.targets``); otherwise every stored class is replayed.
        fields: ``{record field: mini-batch position or key}`` (see
            :class:`~avalanche_distributed_rehearsal.integration.batches.BatchFields`).
        store_outputs: a field name under which each candidate keeps the model's output
            (``strategy.mb_output``) for it, or None (default).
        output_dtype: storage dtype of the stored outputs (default float16).
        offer_epoch: ``"first"`` (default) or ``"last"``: the epoch of each experience
            whose mini-batches are offered. With stored outputs, ``"last"`` keeps the
            outputs of a model trained on the experience (as Avalanche's DER, which
            computes them at the end of the experience), not of its first epoch.
        dtypes: storage dtypes of other fields, e.g. ``{"input": torch.uint8}`` for
            uint8 images (default: the batch's dtypes, so a uint8 batch is stored, and
            exchanged, as uint8 already). A floating-point batch stored as an integer
            dtype must hold integers in its range (``[0, 255]`` for uint8), else
            ``ValueError`` (casting normalised floats to uint8 would destroy them).
        transform: a callable mapping an input batch ``(n, ...)`` on the training device
            to the model's input (conversion, normalisation, augmentation; e.g. uint8
            images to normalised, randomly cropped floats), or None. The buffer stores
            the rows *before* it (the mini-batch's own ``input`` entry); it runs once per
            step, on ``[x_i ; R_i]`` after the merge, so every draw of a stored sample is
            transformed afresh. It must return a new tensor of ``n`` rows (and not modify
            its argument in place). Random transforms that draw from torch's generator on
            the training thread keep asynchronous and synchronous runs bit-identical (the
            buffer never draws from it).
        eval_transform: a callable applied to the ``input`` entry of every evaluation
            mini-batch (e.g. the conversion and normalisation of ``transform`` without the
            augmentation), or None (default): evaluation mini-batches are then left as
            the evaluation stream gives them.
        merge_replay: True (default): the representatives are appended to the mini-batch
            (``b + d`` rows). False: the mini-batch keeps its ``b`` rows and the
            representatives, transformed with them, are in :attr:`replay_batch` for the
            strategy to use apart (ER-ACE, see :class:`DistributedERACE`).

    Evaluation is left untouched (unless ``eval_transform`` is given). ``train()`` may be called any number of times (online
    continual learning calls it once per mini-batch): the worker starts once, and the job
    it runs at the end of a ``train()`` call (preparing the next step) overlaps whatever
    follows; ``storage_policy.core``, ``storage_policy.buffer``, the metrics and the
    checkpoints wait for it. Call :meth:`close` (or let the plugin be garbage-collected)
    to stop the worker.

    Pickling (``pickle``, ``copy.deepcopy``, Avalanche's ``save_checkpoint``) keeps the
    settings, :meth:`state_dict` without the shard (step counter, excluded and seen
    classes) and the storage policy, which carries the shard (see
    :class:`DistributedRehearsalBuffer`): no worker thread, process group or CUDA stream,
    and no collective, so under torchrun each rank saves its own file (e.g.
    ``f"ckpt-{rank}.pkl"``) and loads it on the same rank of the same number of ranks.
    The unpickled plugin applies that state at its first training step, like
    :meth:`load_state_dict` before the first step; a plugin referenced from several
    places (its ``storage_policy`` too) stays one object within one pickle. A closed
    plugin pickles too. ``transform`` and ``eval_transform`` are settings: pickling needs
    them picklable (module-level functions or objects, not lambdas).
    """

    def __init__(self, mem_size: int = 2000, batch_size_mem: Optional[int] = None,
                 num_candidates: Optional[int] = None, sampling: str = "uniform",
                 async_mode: bool | str = "auto", seed: int = 0,
                 device: Optional[str | torch.device] = None,
                 storage_policy: Optional[DistributedRehearsalBuffer] = None,
                 timeout: Optional[float] = None, nonfinite: str = "raise",
                 replay_new_classes: bool = False, fields: Optional[dict] = None,
                 store_outputs: Optional[str] = None, output_dtype: torch.dtype = torch.float16,
                 dtypes: Optional[dict] = None, offer_epoch: str = "first",
                 transform: Optional[Callable] = None, eval_transform: Optional[Callable] = None,
                 merge_replay: bool = True):
        super().__init__()
        check_int("mem_size", mem_size, 1)
        _check_world("mem_size", mem_size)
        if batch_size_mem is not None:
            check_int("batch_size_mem", batch_size_mem, 0)
        if num_candidates is not None:
            check_int("num_candidates", num_candidates, 0)
        check_async_mode(async_mode, TypeError)
        for name, flag in (("replay_new_classes", replay_new_classes), ("merge_replay", merge_replay)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        for name, f in (("transform", transform), ("eval_transform", eval_transform)):
            if f is not None and not callable(f):
                raise TypeError(f"{name} must be a callable mapping an input batch (n, ...) to "
                                f"the model's input, or None; got {type(f).__name__}")
        if store_outputs is not None and (not isinstance(store_outputs, str) or not store_outputs):
            raise TypeError(f"store_outputs must be a field name or None, got {store_outputs!r}")
        if not isinstance(output_dtype, torch.dtype) or not output_dtype.is_floating_point:
            raise TypeError(f"output_dtype must be a floating-point torch dtype, got {output_dtype!r}")
        if offer_epoch not in ("first", "last"):
            raise ValueError(f"offer_epoch must be 'first' or 'last', got {offer_epoch!r}")
        self.offer_epoch = offer_epoch
        self.batch_fields = BatchFields(fields)
        dtypes = dict(dtypes or {})
        if store_outputs is not None:
            dtypes.setdefault(store_outputs, output_dtype)
        if storage_policy is None:
            storage_policy = DistributedRehearsalBuffer(
                mem_size, sampling=sampling, seed=seed, device=device, nonfinite=nonfinite,
                timeout=timeout, fields=fields, dtypes=dtypes)
        elif not isinstance(storage_policy, DistributedRehearsalBuffer):
            raise TypeError("storage_policy must be a DistributedRehearsalBuffer, got "
                            f"{type(storage_policy).__name__}")
        elif storage_policy.max_size != mem_size:
            raise ValueError(f"storage_policy.max_size ({storage_policy.max_size}) must equal "
                             f"mem_size ({mem_size})")
        self.mem_size = mem_size
        self.batch_size_mem = batch_size_mem
        self.num_candidates = num_candidates
        self.async_mode = async_mode
        self.replay_new_classes = replay_new_classes
        self.storage_policy = storage_policy
        self.store_outputs = store_outputs
        self.transform = transform
        self.eval_transform = eval_transform
        self.merge_replay = merge_replay
        self.seen_classes: Set[int] = set()
        #: Experiences whose training ended (the index of the one in training, in the
        #: buffer's step context: every rank counts the same).
        self.experiences = 0
        self._pending_state: Optional[dict] = None
        self._experience_classes: Optional[Set[int]] = None  # of the experience in training
        #: The representatives of the current step (every stored field, ``(d, ...)``, on
        #: the strategy's device), and the rows of the mini-batch: ``new_rows`` from the
        #: stream, then ``replayed_rows`` representatives.
        self.last_replay: dict = {}
        self.new_rows = 0
        self.replayed_rows = 0
        #: The replayed rows as the model gets them: ``{field: (d, ...)}`` on the training
        #: device, in the mini-batch's dtypes, ``input`` after ``transform``. With
        #: ``merge_replay=True`` views of the last ``d`` rows of the mini-batch.
        self.replay_batch: dict = {}
        self._record: Optional[tuple] = None  # (record or None, context): offered after the forward pass

    @property
    def pipeline(self) -> Optional[RehearsalPipeline]:
        return self.storage_policy.pipeline

    def _ensure_pipeline(self, strategy: "SupervisedTemplate") -> RehearsalPipeline:
        policy = self.storage_policy
        if policy.pipeline is None:
            _check_world("mem_size", self.mem_size)
            b = strategy.train_mb_size
            r = self.batch_size_mem if self.batch_size_mem is not None else max(1, b // 4)
            c = self.num_candidates if self.num_candidates is not None else b
            core = policy.materialize(strategy.device)
            core.config.update(batch_size_mem=r, num_candidates=c)
            policy.pipeline = RehearsalPipeline(core, batch_size_mem=r, num_candidates=c,
                                                async_mode=self.async_mode,
                                                timeout=policy.timeout)
            if self._pending_state is not None:
                state, self._pending_state = self._pending_state, None
                self.load_state_dict(state, strategy)
        return policy.pipeline

    # ------------------------------------------------------------------ hooks
    def before_training(self, strategy: "SupervisedTemplate", **kwargs):
        self._ensure_pipeline(strategy)

    def before_training_exp(self, strategy: "SupervisedTemplate", **kwargs):
        pipeline = self._ensure_pipeline(strategy)
        classes = self._experience_classes = _experience_classes(strategy.experience)
        if self.replay_new_classes or classes is None:
            pipeline.exclude(())
        else:
            pipeline.exclude(classes - self.seen_classes)

    def before_training_iteration(self, strategy: "SupervisedTemplate", **kwargs):
        mbatch = strategy.mbatch
        record = self.batch_fields.to_record(mbatch)
        pipeline = self._ensure_pipeline(strategy)
        missing = () if self.store_outputs is None else (self.store_outputs,)
        buffer = pipeline.buffer
        self.new_rows = buffer.check_record(record, missing)  # before any change
        if self.storage_policy._sample_keys is None:
            self.storage_policy.remember_sample_keys(self.batch_fields.mapping(mbatch))
        # values (NaN, labels, lossy casts into integer storage) are checked by the step
        # itself, on every rank at once: a rank that failed here alone would leave the
        # others waiting in the step's collective
        context = step_context(strategy, self.experiences)
        device = next(iter(record.values())).device
        reps = pipeline.take(device, context, steps_left(strategy, context))
        merged = self.batch_fields.merge(mbatch, reps)
        self.last_replay = reps
        self.replayed_rows = pipeline.last_representatives
        offer = record if self._offering(strategy) else None
        if self.store_outputs is None:
            pipeline.offer(offer, context, checked=True)  # checked above, before take()
        else:
            self._record = (offer, context)
        strategy.mbatch = self._model_batch(mbatch, merged, offer is not None)

    def _model_batch(self, mbatch, merged, offered: bool):
        """``merged`` (``[x_i ; R_i]``) as the model trains on it: ``transform`` applied to
        its input entry (a new tensor: the stored rows are never transformed); with
        ``merge_replay=False`` the representatives' rows moved to :attr:`replay_batch`."""
        b = self.new_rows
        mapping = self.batch_fields.mapping(mbatch)
        if self.transform is not None:
            if INPUT not in mapping:
                raise ValueError(f"transform needs an 'input' field to transform; the mini-batch's "
                                 f"stored fields are {sorted(mapping)} (see fields=)")
            key = mapping[INPUT]
            x = merged[key]
            if x is mbatch[key] and offered and self.store_outputs is not None:
                x = x.clone()  # the raw rows are offered after the forward pass
            out = self.transform(x)
            if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != x.shape[0]:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"transform must return a tensor with one row per input row "
                                 f"({x.shape[0]}, ...), got {got}")
            merged[key] = out
        replayed = {name: key for name, key in mapping.items() if name in self.last_replay}
        self.replay_batch = {name: merged[key][b:] for name, key in replayed.items()}
        if not self.merge_replay and self.replayed_rows:
            for key in replayed.values():
                merged[key] = merged[key][:b]
        return merged

    def before_eval_iteration(self, strategy: "SupervisedTemplate", **kwargs):
        if self.eval_transform is None:
            return
        mbatch = strategy.mbatch
        mapping = self.batch_fields.mapping(mbatch)
        if INPUT not in mapping:
            raise ValueError(f"eval_transform needs an 'input' field to transform; the "
                             f"mini-batch's fields are {sorted(mapping)} (see fields=)")
        out = dict(mbatch) if isinstance(mbatch, Mapping) else list(mbatch)
        out[mapping[INPUT]] = self.eval_transform(mbatch[mapping[INPUT]])
        strategy.mbatch = out

    def _offering(self, strategy) -> bool:
        """Whether this epoch's mini-batches are offered (one epoch per experience)."""
        epoch = strategy.clock.train_exp_epochs
        if self.offer_epoch == "first":
            return epoch == 0
        return epoch == max(getattr(strategy, "train_epochs", 1), 1) - 1

    def after_forward(self, strategy: "SupervisedTemplate", **kwargs):
        if self.store_outputs is None or self._record is None or not strategy.is_training:
            return
        (record, context), self._record = self._record, None
        if record is not None:
            record = dict(record, **{self.store_outputs: strategy.mb_output[: self.new_rows]})
        self.pipeline.offer(record, context)

    def after_training_exp(self, strategy: "SupervisedTemplate", **kwargs):
        # The job in flight (next step's representatives) keeps running past train():
        # online, it overlaps the next call's set-up. Whatever reads the buffer waits.
        if self._experience_classes is not None:
            self.seen_classes |= self._experience_classes
        self.experiences += 1

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, include_buffer: bool = True) -> dict:
        """This rank's plugin state, as plain data and CPU tensors.

        ``buffer``: this rank's shard (rows, class quotas, reservoir counters and RNG; see
        ``ShardedRehearsalBuffer.state_dict``), None before the first training step or
        with ``include_buffer=False``; ``pipeline``: the step counter and excluded
        classes; ``seen_classes``: classes of the experiences trained so far. A state
        loaded (or unpickled) but not applied yet, or kept by :meth:`close`, is reported
        as it will be applied. Loading it needs the same world size and configuration; to
        resume on another number of ranks, use
        :func:`~avalanche_distributed_rehearsal.integration.checkpoint.save_training_checkpoint`.
        """
        state = self._counters()
        buffer = state["buffer"] if include_buffer else None
        if include_buffer and buffer is None and self.storage_policy._has_shard():
            buffer = self.storage_policy.state_dict()
        return {"buffer": buffer, "pipeline": dict(state["pipeline"]),
                "seen_classes": list(state["seen_classes"]),
                "experiences": int(state.get("experiences", 0))}

    def _counters(self) -> dict:
        """The state to resume from, the shard left out unless a pending state holds one."""
        if self.pipeline is None and self._pending_state is not None:
            return self._pending_state
        pipeline = {} if self.pipeline is None else self.pipeline.state_dict()
        return {"buffer": None, "pipeline": pipeline, "seen_classes": sorted(self.seen_classes),
                "experiences": self.experiences}

    def __getstate__(self) -> dict:
        """Settings, the storage policy and :meth:`state_dict` less the shard, pending.

        Waits for the background job in flight (at most ``timeout``; re-raises its error);
        no collective.
        """
        state = self.__dict__.copy()
        if self.pipeline is not None:
            state["_pending_state"] = self._counters()  # applied at the first step
        return state

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict) or "storage_policy" not in state:
            raise ValueError("not a pickled DistributedReplayPlugin state")
        # settings absent from pickles of earlier releases
        self.__dict__.update(transform=None, eval_transform=None, merge_replay=True, replay_batch={})
        self.__dict__.update(state)

    def load_state_dict(self, state: dict, strategy: Optional["SupervisedTemplate"] = None) -> None:
        """Restore :meth:`state_dict`'s output (collective when it holds a shard).

        Without ``strategy`` and before the first training step, the state is kept and
        applied at the first step (the strategy decides the device and ``r``).
        """
        if not isinstance(state, dict) or not {"pipeline", "seen_classes"} <= set(state):
            raise ValueError("state must be a dict from DistributedReplayPlugin.state_dict() "
                             "with 'pipeline' and 'seen_classes'")
        seen = state["seen_classes"]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in seen):
            raise ValueError(f"state['seen_classes'] must hold class labels >= 0, got {seen!r}")
        step = state["pipeline"].get("step", 0) if state["pipeline"] else 0
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"state['pipeline']['step'] must be an int >= 0, got {step!r}")
        if strategy is None and self.pipeline is None:
            self._pending_state = state
            return
        pipeline = self._ensure_pipeline(strategy) if strategy is not None else self.pipeline
        if state.get("buffer") is not None:
            pipeline.invalidate()
            self.storage_policy.load_state_dict(state["buffer"])
        if state["pipeline"]:
            pipeline.load_state_dict(state["pipeline"])
        self.seen_classes = set(seen)
        experiences = state.get("experiences", 0)
        if not isinstance(experiences, int) or isinstance(experiences, bool) or experiences < 0:
            raise ValueError(f"state['experiences'] must be an int >= 0, got {experiences!r}")
        self.experiences = experiences

    def close(self) -> None:
        """Stop the background worker and release the buffer's process group. Idempotent.

        The step counter and the excluded and seen classes are kept: :meth:`state_dict`
        and pickling still report them. If waiting for the job in flight fails, the error
        is raised and nothing is kept.
        """
        pipeline = self.pipeline
        self.storage_policy.close()
        if pipeline is not None and self._pending_state is None:
            self._pending_state = {"buffer": None, "pipeline": pipeline.state_dict(),
                                   "seen_classes": sorted(self.seen_classes),
                                   "experiences": self.experiences}


def _check_world(name: str, budget: int) -> None:
    """``ValueError`` naming ``name`` unless the global budget gives every rank a sample."""
    _, world = _world()
    if budget < world:
        raise ValueError(f"{name} ({budget}) must be at least the world size ({world}): the "
                         "global budget is split over the ranks and every rank stores a sample")


def step_context(strategy, experience: Optional[int] = None) -> StepContext:
    """Where the strategy is in training, for the buffer's cross-rank step checks:
    experience (``experience``, default the strategy clock's count of trained
    experiences), epoch, iteration within the epoch and iterations per epoch."""
    clock = strategy.clock
    try:
        epoch_length = len(strategy.dataloader)
    except TypeError:  # a loader without a length
        epoch_length = -1
    exp = clock.train_exp_counter if experience is None else experience
    return StepContext(exp, clock.train_exp_epochs, clock.train_epoch_iterations, epoch_length)


def steps_left(strategy, context: StepContext) -> Optional[int]:
    """Training iterations left in the current experience after this one (None when the
    loader has no length): lets the pipeline know when the exclusion of new classes ends."""
    if context.epoch_length < 0:
        return None
    epochs = max(int(getattr(strategy, "train_epochs", 1) or 1), 1)
    left_in_epoch = context.epoch_length - context.iteration - 1
    return max(0, (epochs - context.epoch - 1) * context.epoch_length + left_in_epoch)


def _experience_classes(experience) -> Optional[Set[int]]:
    """The class labels of an experience, the same on every rank, or None if unknown."""
    classes = getattr(experience, "classes_in_this_experience", None)
    if classes is None:
        targets = getattr(getattr(experience, "dataset", None), "targets", None)
        classes = getattr(targets, "uniques", None)
    return None if classes is None else {int(c) for c in classes}
