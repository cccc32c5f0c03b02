"""``DistributedRehearsalBuffer``: an Avalanche ``ExemplarsBuffer`` backed by a sharded core buffer."""

from __future__ import annotations

from typing import Optional

import torch
from avalanche.benchmarks.utils.classification_dataset import (
    _make_taskaware_tensor_classification_dataset,
)
from avalanche.training.storage_policy import ExemplarsBuffer
from torch.utils.data import DataLoader

from ..core import RehearsalPipeline, ShardedRehearsalBuffer, split_budget
from ..core.buffer import INPUT, LABEL, TASK
from ..core.sampling import SAMPLING_MODES
from ..core.validation import NONFINITE_POLICIES, check_choice, check_int


#: Samples per rank inserted between two gathers of per-class counts in ``post_adapt``.
POST_ADAPT_CHUNK = 256


def refuse_dictionary_samples(dataset, where: str) -> None:
    """Raise ValueError when ``dataset``'s samples are dictionaries (not supported yet)."""
    if len(dataset) and isinstance(dataset[0], dict):
        raise ValueError(f"{where}: the dataset's samples are dictionaries; this release "
                         "handles samples of (input, label[, task label]) only")


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
        sampling: how representatives are drawn from the union of shards:
            ``"uniform"`` (every stored sample equally likely) or ``"class_balanced"``
            (uniform over classes, then over the samples of the chosen class).
        seed: the same on every rank; with the same seed runs are reproducible.
        device: where the shard lives: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or None to
            follow the strategy's device (resolved at the first use).
        nonfinite: ``"raise"`` (default) rejects batches whose inputs hold NaN or Inf;
            ``"skip"`` leaves such samples out of the buffer.
        timeout: seconds any collective or wait on the background worker may take;
            default (None) the default process group's timeout (30 minutes without one),
            so a rank that evaluates or checkpoints for long does not end the run.

    Used alone, with Avalanche's stock ``ReplayPlugin(storage_policy=...)``, it is updated
    once per experience (``post_adapt``/``update``) and :attr:`buffer` is this rank's shard
    as an ``AvalancheDataset`` (so each rank replays from its own shard). Used through
    :class:`DistributedReplayPlugin`, it is updated every step and sampled globally.

    Creating the shard is collective under ``torch.distributed`` (it creates a process
    group): it happens on every rank at the first update or training step.
    """

    def __init__(self, max_size: int = 2000, sampling: str = "uniform", seed: int = 0,
                 device: Optional[str | torch.device] = None, nonfinite: str = "raise",
                 timeout: Optional[float] = None):
        check_int("max_size", max_size, 1)
        check_choice("sampling", sampling, SAMPLING_MODES)
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
        """Create the core shard if needed (collective under torch.distributed) and return it."""
        if self._core is None:
            device = self.device if self.device is not None else torch.device(default_device)
            self._core = ShardedRehearsalBuffer(
                self.max_size, sampling=self.sampling, seed=self.seed, device=device,
                nonfinite=self.nonfinite, timeout=self.timeout, config=self.config)
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
        """This rank's shard as an AvalancheDataset of ``(x, y, t)`` (a snapshot copy)."""
        core = self._idle()
        if core is None or len(core) == 0:
            return _make_taskaware_tensor_classification_dataset(
                torch.zeros(0), torch.zeros(0, dtype=torch.long), task_labels=[], targets=[])
        fields = core.local_tensors()
        x = fields[INPUT].to("cpu", copy=True)
        y = fields[LABEL].to("cpu", copy=True)
        t = fields[TASK].to("cpu", copy=True)
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
        :data:`POST_ADAPT_CHUNK` per rank, the same number of chunks on every rank, each
        preceded by a gather of every rank's per-class counts (the quotas stay global),
        and one more gather at the end, whose counts the buffer metrics report.
        """
        dataset = exp.dataset
        if hasattr(dataset, "eval"):
            dataset = dataset.eval()
        refuse_dictionary_samples(dataset, "DistributedRehearsalBuffer.post_adapt")
        core = self.materialize(getattr(agent_state, "device", "cpu"))
        self._idle()
        rank, world = core.rank, core.world_size
        indices = list(range(rank, len(dataset), world))
        chunks = -(-(-(-len(dataset) // world)) // POST_ADAPT_CHUNK)  # same on every rank
        for k in range(chunks):
            core.refresh(step=k)
            part = indices[k * POST_ADAPT_CHUNK:(k + 1) * POST_ADAPT_CHUNK]
            if not part:
                continue
            loader = DataLoader(torch.utils.data.Subset(dataset, part), batch_size=len(part),
                                shuffle=False, num_workers=0)
            for batch in loader:
                x, y = batch[0], batch[1]
                t = batch[2] if len(batch) > 2 else torch.zeros_like(y)
                core.insert(x, y, t)
        core.refresh(step=chunks)
        if self.pipeline is not None:
            self.pipeline.invalidate()

    def resize(self, strategy, new_size: int) -> None:
        """Change the global budget to ``new_size``; shrinking evicts class-balanced."""
        check_int("new_size", new_size, 1)
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
        """This rank's shard state (see ``ShardedRehearsalBuffer.state_dict``)."""
        core = self._idle()
        if core is None:
            raise RuntimeError("the buffer is not created yet (no update or training step ran)")
        return core.state_dict()

    def load_state_dict(self, state: dict, default_device="cpu") -> None:
        """Restore this rank's shard (same world size); see ``load_buffer_checkpoint`` for elastic loads."""
        core = self.materialize(default_device)
        self._idle()
        core.load_state_dict(state)
        if self.pipeline is not None:
            self.pipeline.invalidate()

    # ------------------------------------------------------------------ introspection
    def local_size(self) -> int:
        core = self._idle()
        return 0 if core is None else len(core)

    def local_capacity(self) -> int:
        rank, world = _world() if self._core is None else (self._core.rank, self._core.world_size)
        return split_budget(self.max_size, world, rank)
