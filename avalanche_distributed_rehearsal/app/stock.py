"""Avalanche's stock ``ReplayPlugin`` as the main job runs it: quiet, and on rank-local data.

Two differences from ``avalanche.training.plugins.ReplayPlugin``, nothing else:

* Avalanche's ``@deprecated`` decorator (on ``ExemplarsBuffer.update``, which the plugin
  calls after every experience) puts ``simplefilter("once", DeprecationWarning)`` in front
  of every filter before it warns, so no filter, set up front or around the call, can
  hold it back. Here the plugin's hooks run inside ``warnings.catch_warnings(record=True)``:
  the warnings they raise are collected instead of printed, the ``DeprecationWarning``\ s
  are dropped, any other warning is shown as usual, and the decorator's filter change is
  undone on the way out.
* ``distributed_sampling=False`` (the ``--rank-split skewed`` path) builds the replay
  data loader without Avalanche's ``DistributedSampler``, which would otherwise take
  ``1 / N`` of a rank's own share of the experience (and of its own buffer).
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from typing import Iterator, Optional

from avalanche.training.plugins import ReplayPlugin


@contextlib.contextmanager
def no_deprecation_warnings() -> Iterator[None]:
    """Run a block; show the warnings it raises except ``DeprecationWarning``."""
    with warnings.catch_warnings(record=True) as caught:
        try:
            yield
        finally:
            kept = [w for w in caught if not issubclass(w.category, DeprecationWarning)]
    for w in kept:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


class StockReplayPlugin(ReplayPlugin, supports_distributed=True):
    """``ReplayPlugin(mem_size, batch_size_mem=..., storage_policy=...)`` with quiet hooks;
    ``distributed_sampling`` as in Avalanche's ``ReplayDataLoader``."""

    def __init__(self, mem_size: int = 200, batch_size: Optional[int] = None,
                 batch_size_mem: Optional[int] = None, task_balanced_dataloader: bool = False,
                 storage_policy=None, distributed_sampling: bool = True):
        super().__init__(mem_size=mem_size, batch_size=batch_size, batch_size_mem=batch_size_mem,
                         task_balanced_dataloader=task_balanced_dataloader,
                         storage_policy=storage_policy)
        self.distributed_sampling = distributed_sampling

    def before_training_exp(self, strategy, num_workers: int = 0, shuffle: bool = True,
                            drop_last: bool = False, **kwargs):
        with no_deprecation_warnings():
            if self.distributed_sampling:
                return super().before_training_exp(strategy, num_workers=num_workers,
                                                   shuffle=shuffle, drop_last=drop_last, **kwargs)
            if len(self.storage_policy.buffer) == 0:
                return None  # first experience: the strategy's own loader
            from avalanche.benchmarks.utils.data_loader import ReplayDataLoader

            strategy.dataloader = ReplayDataLoader(
                strategy.adapted_dataset, self.storage_policy.buffer, oversample_small_tasks=True,
                batch_size=self.batch_size or strategy.train_mb_size,
                batch_size_mem=self.batch_size_mem or strategy.train_mb_size,
                task_balanced_dataloader=self.task_balanced_dataloader,
                distributed_sampling=False, num_workers=num_workers, shuffle=shuffle,
                drop_last=drop_last)
            return None

    def after_training_exp(self, strategy, **kwargs):
        with no_deprecation_warnings():
            return super().after_training_exp(strategy, **kwargs)


_QUIET_CLASSES: dict = {}


def quiet(cls):
    """``cls`` (an Avalanche strategy class whose buffer updates warn, e.g. ``ER_ACE``,
    ``DER``) with its experience hooks run under :func:`no_deprecation_warnings`."""
    if cls not in _QUIET_CLASSES:
        def _before_training_exp(self, **kwargs):
            with no_deprecation_warnings():
                return cls._before_training_exp(self, **kwargs)

        def _after_training_exp(self, **kwargs):
            with no_deprecation_warnings():
                return cls._after_training_exp(self, **kwargs)

        _QUIET_CLASSES[cls] = type(f"Quiet{cls.__name__}", (cls,), {
            "_before_training_exp": _before_training_exp,
            "_after_training_exp": _after_training_exp})
    return _QUIET_CLASSES[cls]


def distinct_samples(buffer, world: int, group=None) -> int:
    """Collective (every rank calls it, on a group that serves CPU objects): the number of
    distinct samples stored over all ranks' buffers, told apart by their input's bytes.

    ``buffer``: this rank's stored samples, any indexable dataset whose items start with
    the input tensor (Avalanche's ``storage_policy.buffer``). Replicated buffers count
    once: the stock plugin under Avalanche's distributed training fills every rank's
    buffer from the whole experience with the same random state, so its N buffers of
    M / N samples hold M / N distinct samples between them.
    """
    import torch

    mine = set()
    for i in range(len(buffer)):
        x = buffer[i][0]
        x = torch.as_tensor(x).detach().cpu().contiguous()
        mine.add(hashlib.blake2b(x.numpy().tobytes(), digest_size=12).hexdigest())
    if world == 1:
        return len(mine)
    import torch.distributed as dist

    everyone = [None] * world
    dist.all_gather_object(everyone, sorted(mine), group=group)
    return len(set().union(*everyone))
