"""``DistributedERACE``: ER-ACE (asymmetric cross-entropy replay) over a buffer sharded across ranks."""

from __future__ import annotations

from typing import Callable, List, Optional, Union

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward
from avalanche.training.plugins.evaluation import EvaluationPlugin, default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch.nn import CrossEntropyLoss, Module
from torch.optim import Optimizer

from ..core.records import INPUT, LABEL, TASK
from ..core.validation import check_int
from .plugin import DistributedReplayPlugin


def ace_loss(out_in: torch.Tensor, target_in: torch.Tensor, out_buffer: torch.Tensor,
             target_buffer: torch.Tensor) -> torch.Tensor:
    """The asymmetric cross-entropy of Avalanche's ``ACECriterion``, a scalar tensor.

    ``out_in`` ``(b, C)`` logits of the stream rows, ``target_in`` ``(b,)`` their class
    labels; ``out_buffer`` ``(d, C)``, ``target_buffer`` ``(d,)`` those of the replayed
    rows. ``(CE(out_buffer, target_buffer) + CE(out_in[:, P], position of target_in in
    P)) / 2`` with ``P`` the classes present in ``target_in`` (ascending): the same value
    as ``ACECriterion``, computed with ``log_softmax`` (``ACECriterion`` takes the log of
    a softmax, which gives NaN once a masked-out logit trails the largest by ~100).
    """
    present = torch.unique(target_in)  # sorted
    loss_buffer = F.cross_entropy(out_buffer, target_buffer)
    loss_current = F.cross_entropy(out_in[:, present], torch.searchsorted(present, target_in))
    return (loss_buffer + loss_current) / 2


class DistributedERACE(SupervisedTemplate):
    """ER-ACE (Caccia et al., "New Insights on Reducing Abrupt Representation Change in
    Online Continual Learning", ICLR 2022) with a distributed buffer.

    The arguments and losses of Avalanche's ``avalanche.training.ER_ACE``; the buffer is
    a :class:`DistributedReplayPlugin` sharded over the data-parallel ranks (global
    budget ``mem_size``, about ``mem_size / world`` per rank), sampled globally. Every
    step, ``d = min(batch_size_mem, eligible)`` representatives are drawn and kept apart
    from the ``b`` stream samples (``merge_replay=False``): the model makes one forward
    pass on the stream batch and one on the replayed rows, as Avalanche's ER_ACE does
    (batch-norm statistics see them separately), and the loss is that of Avalanche's
    ``ACECriterion`` (:func:`ace_loss`)::

        (CE(out_buf, y_buf) + CE(out[:, C], onehot(y)[:, C])) / 2

    where ``C`` holds the classes present in this rank's stream batch (the new rows' loss
    ignores the logits of every other class, so it never pushes down past classes) and
    the replayed rows' cross-entropy runs over all classes. While nothing is replayed
    (the very first step, or ``replay_new_classes=False`` during the first experience)
    the loss is ``criterion`` on the stream batch, as in Avalanche.

    Avalanche's ER_ACE puts an experience into its buffer before training it and replays
    from the second experience on; here candidates enter the buffer during training
    (``num_candidates`` per step, during the first epoch of each experience) and, with
    ``replay_new_classes=True`` (the default), samples of the experience being trained are
    replayed as soon as they are stored, as in the online ER-ACE of the paper. Works
    offline and online (``split_online_stream``: one ``train()`` call per small
    experience), in one process, in Jupyter and under torchrun (wrap the model for DDP,
    e.g. with Avalanche's ``DistributedHelper.wrap_model``; every rank makes the same two
    forward passes per step because ``d`` is the same on every rank).

    Args:
        mem_size: global buffer budget M. batch_size_mem: r, replayed rows per step
            (Avalanche's default, 10).
        criterion: the loss while nothing is replayed (cross-entropy by default).
        transform: applied once per step to ``[x_i ; R_i]`` (see
            :class:`DistributedReplayPlugin`); both forward passes get transformed rows.
        sampling, num_candidates, async_mode, seed, buffer_device, timeout, nonfinite,
            replay_new_classes, eval_transform, dtypes, offer_epoch: see
            :class:`DistributedReplayPlugin` (``buffer_device`` is its ``device``).
        The rest: the usual ``SupervisedTemplate`` arguments.

    After each training forward pass, ``mb_buffer_out`` holds the replayed rows' outputs
    (None when nothing was replayed), as in Avalanche's ER_ACE.
    """

    def __init__(self, *, model: Module, optimizer: Optimizer,
                 criterion=CrossEntropyLoss(), mem_size: int = 200, batch_size_mem: int = 10,
                 train_mb_size: int = 1, train_epochs: int = 1,
                 eval_mb_size: Optional[int] = 1, device: Union[str, torch.device] = "cpu",
                 plugins: Optional[List[SupervisedPlugin]] = None,
                 evaluator: Union[EvaluationPlugin, Callable[[], EvaluationPlugin]] = default_evaluator,
                 eval_every: int = -1, peval_mode: str = "epoch", sampling="uniform",
                 num_candidates: Optional[int] = None, async_mode: bool | str = "auto", seed: int = 0,
                 buffer_device=None, replay_new_classes: bool = True,
                 timeout: Optional[float] = None, nonfinite: str = "raise",
                 transform: Optional[Callable] = None, eval_transform: Optional[Callable] = None,
                 dtypes: Optional[dict] = None, offer_epoch: str = "first", **kwargs):
        check_int("train_mb_size", train_mb_size, 1)
        check_int("batch_size_mem", batch_size_mem, 0)
        self.replay = DistributedReplayPlugin(
            mem_size=mem_size, batch_size_mem=batch_size_mem, num_candidates=num_candidates,
            sampling=sampling, async_mode=async_mode, seed=seed, device=buffer_device,
            timeout=timeout, nonfinite=nonfinite, replay_new_classes=replay_new_classes,
            offer_epoch=offer_epoch, transform=transform, eval_transform=eval_transform,
            dtypes=dtypes, merge_replay=False)
        super().__init__(model=model, optimizer=optimizer, criterion=criterion,
                         train_mb_size=train_mb_size, train_epochs=train_epochs,
                         eval_mb_size=eval_mb_size, device=device,
                         plugins=[self.replay] + list(plugins or []), evaluator=evaluator,
                         eval_every=eval_every, peval_mode=peval_mode, **kwargs)
        self.mem_size = mem_size
        self.batch_size_mem = batch_size_mem
        self.ace_criterion = ace_loss
        self.mb_buffer_out: Optional[torch.Tensor] = None

    def forward(self):
        """The stream batch's output; in training, also the replayed rows' output
        (``mb_buffer_out``, a second forward pass), as Avalanche's ER_ACE computes it."""
        out = super().forward()
        self.mb_buffer_out = None
        if self.is_training and self.replay.replayed_rows:
            rows = self.replay.replay_batch
            x = rows[INPUT]
            tasks = rows.get(TASK)
            if tasks is None:
                tasks = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
            self.mb_buffer_out = avalanche_forward(self.model, x, tasks)
        return out

    def criterion(self):
        """The ACE loss of the current step (the plain criterion in evaluation and while
        nothing is replayed)."""
        if not self.is_training or self.mb_buffer_out is None:
            return self._criterion(self.mb_output, self.mb_y)
        return self.ace_criterion(self.mb_output, self.mb_y, self.mb_buffer_out,
                                  self.replay.replay_batch[LABEL])

    def close(self) -> None:
        """Stop the buffer's worker and release its process group."""
        self.replay.close()


__all__ = ["DistributedERACE", "ace_loss"]
