"""``DistributedReplayPlugin``: per-step global rehearsal for any SupervisedTemplate strategy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from avalanche.core import SupervisedPlugin

from ..core import RehearsalPipeline
from ..core.validation import check_int
from .storage_policy import DistributedRehearsalBuffer

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate


class DistributedReplayPlugin(SupervisedPlugin, supports_distributed=True):
    """Experience replay from a buffer sharded over data-parallel ranks.

    Every training step, the ``b`` samples of the mini-batch are followed by ``r``
    representatives drawn from the union of all ranks' shards, and ``c`` of the ``b``
    samples are offered to this rank's shard. The buffer work (insert, sample, exchange)
    runs in a background thread (on its own CUDA stream on GPU) while the model computes.

    Args:
        mem_size: global budget M: samples stored over all ranks together.
        batch_size_mem: r, representatives appended to every mini-batch. Default: a
            quarter of the strategy's ``train_mb_size`` (at least 1).
        num_candidates: c, samples of each mini-batch offered to the shard. Default: the
            whole mini-batch. Larger than the batch is clamped to the batch.
        sampling: ``"uniform"`` or ``"class_balanced"`` (see
            :class:`DistributedRehearsalBuffer`).
        async_mode: run the buffer work in the background (True) or inline (False). Both
            give bit-identical results for the same seed.
        seed: the same on every rank.
        device: where shards live; None follows the strategy's device.
        storage_policy: an existing :class:`DistributedRehearsalBuffer` to use (its
            ``max_size`` must equal ``mem_size``); other storage arguments are then ignored.
        timeout: seconds any wait on the worker or a collective may take.

    Evaluation is left untouched. ``train()`` may be called any number of times (online
    continual learning calls it once per mini-batch): the worker starts once. Call
    :meth:`close` (or let the plugin be garbage-collected) to stop the worker.
    """

    def __init__(self, mem_size: int = 2000, batch_size_mem: Optional[int] = None,
                 num_candidates: Optional[int] = None, sampling: str = "uniform",
                 async_mode: bool = True, seed: int = 0,
                 device: Optional[str | torch.device] = None,
                 storage_policy: Optional[DistributedRehearsalBuffer] = None,
                 timeout: float = 300.0, nonfinite: str = "raise"):
        super().__init__()
        check_int("mem_size", mem_size, 1)
        if batch_size_mem is not None:
            check_int("batch_size_mem", batch_size_mem, 0)
        if num_candidates is not None:
            check_int("num_candidates", num_candidates, 0)
        if not isinstance(async_mode, bool):
            raise TypeError(f"async_mode must be a bool, got {async_mode!r}")
        if storage_policy is None:
            storage_policy = DistributedRehearsalBuffer(
                mem_size, sampling=sampling, seed=seed, device=device, nonfinite=nonfinite,
                timeout=timeout)
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
        self.storage_policy = storage_policy

    @property
    def pipeline(self) -> Optional[RehearsalPipeline]:
        return self.storage_policy.pipeline

    def _ensure_pipeline(self, strategy: "SupervisedTemplate") -> RehearsalPipeline:
        policy = self.storage_policy
        if policy.pipeline is None:
            b = strategy.train_mb_size
            r = self.batch_size_mem if self.batch_size_mem is not None else max(1, b // 4)
            c = self.num_candidates if self.num_candidates is not None else b
            core = policy.materialize(strategy.device)
            core.config.update(batch_size_mem=r, num_candidates=c)
            policy.pipeline = RehearsalPipeline(core, batch_size_mem=r, num_candidates=c,
                                                async_mode=self.async_mode,
                                                timeout=policy.timeout)
        return policy.pipeline

    # ------------------------------------------------------------------ hooks
    def before_training(self, strategy: "SupervisedTemplate", **kwargs):
        self._ensure_pipeline(strategy)

    def before_training_iteration(self, strategy: "SupervisedTemplate", **kwargs):
        mbatch = strategy.mbatch
        if len(mbatch) != 3:
            raise ValueError("DistributedReplayPlugin expects mini-batches of (x, y, task_label); "
                             f"got {len(mbatch)} elements")
        x, y, t = self._ensure_pipeline(strategy).augment(mbatch[0], mbatch[1], mbatch[2])
        strategy.mbatch = [x, y, t]

    def after_training_exp(self, strategy: "SupervisedTemplate", **kwargs):
        if self.pipeline is not None:
            self.pipeline.drain()

    def after_training(self, strategy: "SupervisedTemplate", **kwargs):
        if self.pipeline is not None:
            self.pipeline.drain()

    def close(self) -> None:
        """Stop the background worker and release the buffer's process group."""
        self.storage_policy.close()
