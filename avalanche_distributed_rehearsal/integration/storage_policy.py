"""``DistributedRehearsalBuffer``: an Avalanche ``ExemplarsBuffer`` backed by a sharded core buffer."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from avalanche.benchmarks.utils import AvalancheDataset, DataAttribute
from avalanche.benchmarks.utils.classification_dataset import (
    _make_taskaware_tensor_classification_dataset,
)
from avalanche.training.storage_policy import ExemplarsBuffer
from torch.utils.data import DataLoader, Dataset

from ..core import RehearsalPipeline, ShardedRehearsalBuffer, split_budget
from ..core.layout import RecordLayout
from ..core.records import INPUT, INSERTION_POLICIES, LABEL, TASK, check_dtypes, is_class_labels
from ..core.sampling import make_sampler
from ..core.validation import NONFINITE_POLICIES, check_choice, check_int
from .batches import BatchFields


#: Samples per rank inserted between two gathers of per-class counts in ``post_adapt``.
POST_ADAPT_CHUNK = 256


def _world():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class DistributedRehearsalBuffer(ExemplarsBuffer):
    """A rehearsal buffer sharded over the data-parallel ranks, with a global budget.

    Args:
        max_size: the global budget M (samples summed over all ranks); each rank stores
            about ``M / world_size``. Must be at least the world size.
        sampling: how representatives are drawn: ``"uniform"`` (every stored sample of
            the union of shards equally likely), ``"class_balanced"`` (each draw a class
            uniformly among those not exhausted, then one of its samples), ``"local"``
            (uniform over this rank's own shard, no exchange), or a core ``Sampler``.
        seed: the same on every rank; with the same seed runs are reproducible.
        device: where the shard lives: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or None to
            follow the strategy's device (resolved at the first use).
        nonfinite: ``"raise"`` (default) rejects batches whose inputs hold NaN or Inf;
            ``"skip"`` leaves such samples out of the buffer.
        timeout: seconds any collective or wait on the background worker may take;
            default (None) the default process group's timeout (30 minutes without one),
            so a rank that evaluates or checkpoints for long does not end the run.
        fields: which entries of a sample are stored under which field name (see
            :class:`~avalanche_distributed_rehearsal.integration.batches.BatchFields`;
            default ``(x, y[, ..., t])`` or every per-sample entry of a dict sample).
        dtypes: storage dtype per field, e.g. ``{"logits": torch.float16}``.
        insertion: ``"auto"`` (class-balanced for integer class labels, else a plain
            reservoir), ``"class_balanced"`` or ``"reservoir"``.

    Used alone, with Avalanche's stock ``ReplayPlugin(storage_policy=...)``, it is updated
    once per experience (``post_adapt``/``update``) and :attr:`buffer` is this rank's shard
    as an ``AvalancheDataset`` (so each rank replays from its own shard). Used through
    :class:`DistributedReplayPlugin`, it is updated every step and sampled globally.

    Creating the shard is collective under ``torch.distributed`` (it creates a process
    group): it happens on every rank at the first update or training step.

    Pickling (``pickle``, ``copy.deepcopy``, Avalanche's ``save_checkpoint``) keeps the
    settings and this rank's shard as :meth:`state_dict` gives it: CPU tensors and plain
    data, never the core buffer, its storage views, the worker thread, the process group
    or CUDA streams. It waits for the background job in flight but runs no collective, so
    each rank pickles on its own: under torchrun every rank must save to its own file
    (e.g. ``f"ckpt-{rank}.pkl"``) and load it on the same rank of the same number of
    ranks (to change that number, use
    :func:`~avalanche_distributed_rehearsal.integration.checkpoint.save_training_checkpoint`).
    The unpickled buffer holds the shard (:attr:`buffer`, :meth:`local_size` and
    :meth:`state_dict` read it) and loads it when the core shard is created.
    """

    def __init__(self, max_size: int = 2000, sampling="uniform", seed: int = 0,
                 device: Optional[str | torch.device] = None, nonfinite: str = "raise",
                 timeout: Optional[float] = None, fields: Optional[dict] = None,
                 dtypes: Optional[dict] = None, insertion: str = "auto"):
        check_int("max_size", max_size, 1)
        make_sampler(sampling)  # validates a name or a Sampler; the shard makes its own
        check_choice("insertion", insertion, INSERTION_POLICIES)
        self.fields = BatchFields(fields)
        self.dtypes = check_dtypes(dtypes)
        self.insertion = insertion
        check_int("seed", seed, 0)
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        _, world = _world()
        if max_size < world:
            raise ValueError(f"max_size ({max_size}) must be at least the world size ({world})")
        super().__init__(max_size)
        self.sampling = sampling
        self.seed = seed
        self.device = None if device is None else torch.device(device)
        self.nonfinite = nonfinite
        self.timeout = None if timeout is None else float(timeout)
        self.config: dict = {}
        self._core: Optional[ShardedRehearsalBuffer] = None
        self.pipeline: Optional[RehearsalPipeline] = None
        # An unpickled shard state, loaded into the core when it is created.
        self._pending_shard: Optional[dict] = None
        # {record field: sample position or key} of the samples inserted (for `buffer`).
        self._sample_keys: Optional[Dict[str, object]] = None

    @property
    def core(self) -> Optional[ShardedRehearsalBuffer]:
        """The core shard (None before the first update or training step), idle: this
        waits for the background job in flight (the plugin leaves one running between
        ``train()`` calls), so the shard may be read or changed freely afterwards."""
        return self._idle()

    @property
    def rank(self) -> int:
        """This process's rank in the buffer (never waits)."""
        return self._core.rank if self._core is not None else _world()[0]

    # ------------------------------------------------------------------ lifecycle
    def materialize(self, default_device: torch.device | str = "cpu") -> ShardedRehearsalBuffer:
        """Create the core shard if needed (collective under torch.distributed) and return it.

        An unpickled buffer loads the shard it holds into the new core. That shard must
        come from the same rank of the same number of ranks: otherwise ``ValueError``,
        raised before anything is created.
        """
        if self._core is None:
            _, world = _world()
            if self.max_size < world:
                raise ValueError(f"max_size ({self.max_size}) must be at least the world size "
                                 f"({world})")
            pending = self._pending_shard
            if pending is not None:
                _check_same_rank(pending)
            device = self.device if self.device is not None else torch.device(default_device)
            core = ShardedRehearsalBuffer(
                self.max_size, sampling=self.sampling, seed=self.seed, device=device,
                nonfinite=self.nonfinite, timeout=self.timeout, config=self.config,
                dtypes=self.dtypes, insertion=self.insertion)
            if pending is not None:
                try:
                    core.load_state_dict(pending)
                except BaseException:
                    core.close()
                    raise
                self._pending_shard = None
            self._core = core
        return self._core

    def _idle(self) -> Optional[ShardedRehearsalBuffer]:
        """The core, with no background job running on it."""
        if self.pipeline is not None:
            self.pipeline.drain()
        return self._core

    def close(self) -> None:
        """Stop the background worker and release the process group. Idempotent."""
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None
        if self._core is not None:
            self._core.close()

    # ------------------------------------------------------------------ ExemplarsBuffer API
    @property
    def buffer(self):
        """This rank's shard as an AvalancheDataset (a snapshot copy, CPU tensors).

        Samples look like the samples inserted, so that Avalanche's ``ReplayPlugin`` can
        mix them with the stream's: ``(x, y, t)`` for sequence samples (the default
        fields; ``t`` zeros when no task label is stored), a dictionary ``{key: row}``
        under the samples' own keys for dictionary samples (every stored entry; entries
        the buffer does not store are absent). ``targets`` and ``targets_task_labels`` are
        set from the stored labels (class labels) and task labels (zeros when absent)."""
        core = self._idle()
        if core is None and self._pending_shard is not None:
            fields = _shard_fields(self._pending_shard)
        else:
            fields = core.local_tensors() if core is not None and len(core) else {}
        if not fields:
            return _make_taskaware_tensor_classification_dataset(
                torch.zeros(0), torch.zeros(0, dtype=torch.long), task_labels=[], targets=[])
        keys = self._sample_keys or {name: name for name in fields}
        if not {INPUT, LABEL} <= set(fields) or not all(isinstance(k, int) for k in keys.values()):
            return _record_dataset(fields, keys)
        x = fields[INPUT].to("cpu", copy=True)
        y = fields[LABEL].to("cpu", copy=True)
        t = (fields[TASK].to("cpu", copy=True) if TASK in fields
             else torch.zeros(len(y), dtype=torch.int64))
        return _make_taskaware_tensor_classification_dataset(
            x, y, task_labels=t.tolist(), targets=y.tolist())

    @buffer.setter
    def buffer(self, new_buffer):
        raise AttributeError("DistributedRehearsalBuffer.buffer is read-only; "
                             "insert with update()/post_adapt() or the plugin")

    def post_adapt(self, agent_state, exp) -> None:
        """Insert this rank's share of ``exp.dataset`` (samples ``rank, rank + world, ...``).

        Collective: every rank must call it for the same experience (Avalanche's
        ``ReplayPlugin`` does, after each experience); the shards together then see each
        sample of the experience exactly once. The samples go in chunks of
        :data:`POST_ADAPT_CHUNK` per rank, the same number of chunks on every rank; each
        chunk is one collective insertion, so the quotas of every rank know every class
        of the chunk, on every rank, before anything is stored.
        """
        dataset = exp.dataset
        if hasattr(dataset, "eval"):
            dataset = dataset.eval()
        core = self.materialize(getattr(agent_state, "device", "cpu"))
        self._idle()
        rank, world = core.rank, core.world_size
        indices = list(range(rank, len(dataset), world))
        chunks = -(-(-(-len(dataset) // world)) // POST_ADAPT_CHUNK)  # same on every rank
        for k in range(chunks):
            part = indices[k * POST_ADAPT_CHUNK:(k + 1) * POST_ADAPT_CHUNK]
            record = None
            if part:
                loader = DataLoader(torch.utils.data.Subset(dataset, part), batch_size=len(part),
                                    shuffle=False, num_workers=0)
                batch = next(iter(loader))  # (x, y[, ..., t]) samples or a dictionary
                self.remember_sample_keys(self.fields.mapping(batch))
                record = self.fields.to_record(batch)
            core.insert_record(record)
        if self.pipeline is not None:
            self.pipeline.invalidate()

    def resize(self, strategy, new_size: int) -> None:
        """Change the global budget to ``new_size``; shrinking evicts class-balanced."""
        check_int("new_size", new_size, 1)
        if self._core is None and self._pending_shard is not None:
            _, world = _world()
            if new_size < world:
                raise ValueError(f"new_size ({new_size}) must be at least the world size ({world})")
            self.materialize(getattr(strategy, "device", None) or "cpu")  # the shard it holds
        core = self._idle()
        if core is not None:
            core.resize(new_size)
            if self.pipeline is not None:
                self.pipeline.invalidate()
        else:
            _, world = _world()
            if new_size < world:
                raise ValueError(f"new_size ({new_size}) must be at least the world size ({world})")
        self.max_size = new_size

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's shard state (see ``ShardedRehearsalBuffer.state_dict``): CPU tensors
        (``rows``: ``(n, row_bytes)`` uint8, a copy the caller owns) and plain data.

        An unpickled buffer whose core is not created yet returns the shard it holds (the
        dict it will load, not a copy). Raises ``RuntimeError`` when there is no shard.
        """
        core = self._idle()
        if core is None:
            if self._pending_shard is not None:
                return self._pending_shard
            raise RuntimeError("the buffer is not created yet (no update or training step ran)")
        return core.state_dict()

    def remember_sample_keys(self, mapping: Mapping[str, object]) -> None:
        """Note ``{record field: sample position or key}`` of the samples inserted, so
        that :attr:`buffer` gives its samples the same form (never waits)."""
        if self._sample_keys is None:
            self._sample_keys = dict(mapping)

    def _has_shard(self) -> bool:
        """Whether :meth:`state_dict` has a shard to give (never waits)."""
        return self._core is not None or self._pending_shard is not None

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        """Settings plus this rank's shard as plain data (see the class docstring).

        Waits for the background job in flight (at most ``timeout``; re-raises its error);
        no collective.
        """
        state = self.__dict__.copy()
        core = self._idle()
        if core is not None:
            state["_pending_shard"] = core.state_dict()
            state["config"] = dict(core.config)  # what the shard was created with
        state["_core"] = None
        state["pipeline"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict) or "_pending_shard" not in state or "max_size" not in state:
            raise ValueError("not a pickled DistributedRehearsalBuffer state")
        self._sample_keys = None  # absent from pickles of earlier releases
        self.__dict__.update(state)

    def load_state_dict(self, state: dict, default_device="cpu") -> None:
        """Restore this rank's shard (same world size); see ``load_buffer_checkpoint`` for elastic loads."""
        core = self.materialize(default_device)
        self._idle()
        core.load_state_dict(state)
        if self.pipeline is not None:
            self.pipeline.invalidate()

    # ------------------------------------------------------------------ introspection
    def local_size(self) -> int:
        """Samples stored on this rank (held, for an unpickled buffer not created yet)."""
        core = self._idle()
        if core is None:
            return 0 if self._pending_shard is None else int(self._pending_shard["rows"].shape[0])
        return len(core)

    def local_capacity(self) -> int:
        rank, world = _world() if self._core is None else (self._core.rank, self._core.world_size)
        return split_budget(self.max_size, world, rank)


def _check_same_rank(state: dict) -> None:
    """Raise ``ValueError`` unless ``state`` (a shard state) was saved on this rank and world."""
    rank, world = _world()
    saved = (state.get("rank"), state.get("world_size"))
    if saved != (rank, world):
        raise ValueError(
            f"this buffer's shard was pickled on rank {saved[0]} of {saved[1]} and cannot be "
            f"loaded on rank {rank} of {world}: under torchrun every rank must pickle to, and "
            "load from, its own file (e.g. f'ckpt-{rank}.pkl') on the same number of ranks; "
            "use save_training_checkpoint/load_training_checkpoint to change that number")


class _RecordSamples(Dataset):
    """Samples ``{key: fields[name][i]}`` of a record batch, under the samples' own keys
    (a tuple in position order when every key is a position)."""

    def __init__(self, fields: Mapping[str, torch.Tensor], keys: Mapping[str, object]):
        self.columns = {keys.get(name, name): value for name, value in fields.items()}
        self.length = len(next(iter(fields.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if all(isinstance(key, int) for key in self.columns):  # sequence samples, in order
            return tuple(self.columns[key][i] for key in sorted(self.columns))
        return {key: value[i] for key, value in self.columns.items()}


def _record_dataset(fields: Mapping[str, torch.Tensor], keys: Mapping[str, object]):
    """An AvalancheDataset of dictionary samples (copies of ``fields`` on the CPU), with
    ``targets`` (class labels, when stored) and ``targets_task_labels``."""
    fields = {name: value.to("cpu", copy=True) for name, value in fields.items()}
    n = len(next(iter(fields.values())))
    tasks = fields[TASK].tolist() if TASK in fields else [0] * n
    attributes = [DataAttribute(tasks, "targets_task_labels")]
    if LABEL in fields and is_class_labels(fields[LABEL]):
        attributes.append(DataAttribute(fields[LABEL].tolist(), "targets"))
    return AvalancheDataset([_RecordSamples(fields, keys)], data_attributes=attributes)


def _shard_fields(state: dict) -> dict:
    """``input``/``label``/``task`` views of a shard state's ``rows`` ({} when empty)."""
    if not state.get("layout") or not state["rows"].shape[0]:
        return {}
    return RecordLayout.from_description(state["layout"]).unpack(state["rows"])
