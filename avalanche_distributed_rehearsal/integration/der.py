"""``DistributedDER``: Dark Experience Replay (DER, DER++) over a buffer sharded across ranks."""

from __future__ import annotations

from typing import Callable, List, Optional, Union

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins.evaluation import EvaluationPlugin, default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch.nn import CrossEntropyLoss, Module
from torch.optim import Optimizer

from ..core.validation import check_int
from .plugin import DistributedReplayPlugin

LOGITS = "logits"


class DistributedDER(SupervisedTemplate):
    """Dark Experience Replay (Buzzega et al., NeurIPS 2020) with a distributed buffer.

    The arguments and losses of Avalanche's ``avalanche.training.DER``; the buffer is a
    :class:`DistributedReplayPlugin` sharded over the data-parallel ranks (global budget
    ``mem_size``, about ``mem_size / world`` per rank), sampled globally, whose records
    keep each sample's logits: the model's output for it when it was offered (during
    the last epoch of its experience, from the training forward pass: the outputs of a
    model trained on the experience, like Avalanche's DER, which computes them after the
    experience; ``offer_epoch="first"`` keeps the first epoch's), stored in
    ``logits_dtype`` (float16 by default) and moved in the same single exchange as the
    inputs. Every step, the ``b`` stream samples are followed by ``d = min(r, eligible)``
    representatives (``r = batch_size_mem``) and the loss is::

        CE(out[:b], y[:b]) + alpha * MSE(out[b:], stored logits) + beta * CE(out[b:], y[b:])

    ``beta = 0`` is DER, ``beta > 0`` DER++ (Avalanche's default, 0.5, is DER++). Without
    representatives (the first steps) the loss is the criterion on the stream batch. As in
    Avalanche's DER, the classes of the experience being trained are not replayed until it
    ends (``replay_new_classes=False``). Runs in one process, in Jupyter and under torchrun
    (like any strategy under DDP: wrap the model, e.g. with Avalanche's
    ``DistributedHelper.wrap_model``).

    Args:
        mem_size: global buffer budget M. batch_size_mem: r (default ``train_mb_size``).
        alpha: weight of the logit-matching (MSE) term. beta: weight of the replayed
            samples' cross-entropy (0: DER).
        criterion: the classification loss (cross-entropy by default).
        sampling, num_candidates, async_mode, seed, buffer_device, timeout, nonfinite,
            replay_new_classes: see :class:`DistributedReplayPlugin` (``buffer_device`` is
            its ``device``).
        logits_dtype: storage dtype of the logits (float16 halves their bytes; float32
            keeps them exactly).
        transform: applied once per step to ``[x_i ; R_i]`` on the training device (see
            :class:`DistributedReplayPlugin`): the buffer stores the inputs before it, so
            each draw of a stored sample is transformed (augmented) afresh. The stored
            logits stay the outputs of the forward pass at insertion, that is of the view
            the model trained on then: the *transformed* (augmented) input, as in Mammoth's
            DER, which stores the un-augmented input beside the logits of its augmented
            view. The MSE term then matches the logits of that past view against the
            outputs of a new view of the same sample.
        eval_transform, dtypes: see :class:`DistributedReplayPlugin` (e.g.
            ``dtypes={"input": torch.uint8}`` with a uint8-to-float ``transform``).
        The rest: the usual ``SupervisedTemplate`` arguments.

    The model's output width must not change while the buffer holds logits (a fixed
    classification head, as in DER).
    """

    def __init__(self, *, model: Module, optimizer: Optimizer,
                 criterion=CrossEntropyLoss(), mem_size: int = 200,
                 batch_size_mem: Optional[int] = None, alpha: float = 0.1, beta: float = 0.5,
                 train_mb_size: int = 1, train_epochs: int = 1,
                 eval_mb_size: Optional[int] = 1, device: Union[str, torch.device] = "cpu",
                 plugins: Optional[List[SupervisedPlugin]] = None,
                 evaluator: Union[EvaluationPlugin, Callable[[], EvaluationPlugin]] = default_evaluator,
                 eval_every: int = -1, peval_mode: str = "epoch", sampling="uniform",
                 num_candidates: Optional[int] = None, async_mode: bool | str = "auto", seed: int = 0,
                 buffer_device=None, logits_dtype: torch.dtype = torch.float16,
                 replay_new_classes: bool = False, timeout: Optional[float] = None,
                 nonfinite: str = "raise", offer_epoch: str = "last",
                 transform: Optional[Callable] = None, eval_transform: Optional[Callable] = None,
                 dtypes: Optional[dict] = None, **kwargs):
        check_int("train_mb_size", train_mb_size, 1)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        batch_size_mem = train_mb_size if batch_size_mem is None else batch_size_mem
        self.replay = DistributedReplayPlugin(
            mem_size=mem_size, batch_size_mem=batch_size_mem, num_candidates=num_candidates,
            sampling=sampling, async_mode=async_mode, seed=seed, device=buffer_device,
            timeout=timeout, nonfinite=nonfinite, replay_new_classes=replay_new_classes,
            store_outputs=LOGITS, output_dtype=logits_dtype, offer_epoch=offer_epoch,
            transform=transform, eval_transform=eval_transform, dtypes=dtypes)
        super().__init__(model=model, optimizer=optimizer, criterion=criterion,
                         train_mb_size=train_mb_size, train_epochs=train_epochs,
                         eval_mb_size=eval_mb_size, device=device,
                         plugins=[self.replay] + list(plugins or []), evaluator=evaluator,
                         eval_every=eval_every, peval_mode=peval_mode, **kwargs)
        self.mem_size = mem_size
        self.batch_size_mem = batch_size_mem
        self.alpha = float(alpha)
        self.beta = float(beta)

    def criterion(self):
        """The DER(++) loss of the current mini-batch (the plain criterion in evaluation
        and while nothing is replayed)."""
        replay = self.replay
        if not self.is_training or replay.replayed_rows == 0:
            return self._criterion(self.mb_output, self.mb_y)
        b = replay.new_rows
        out, y = self.mb_output, self.mb_y
        stored = replay.last_replay[LOGITS].to(out.dtype)
        if stored.shape != out[b:].shape:
            raise ValueError(f"stored logits have shape {tuple(stored.shape[1:])} per sample, the "
                             f"model now outputs {tuple(out.shape[1:])}: DER needs a fixed output width")
        loss = self._criterion(out[:b], y[:b])
        loss = loss + self.alpha * F.mse_loss(out[b:], stored)
        if self.beta:
            loss = loss + self.beta * self._criterion(out[b:], y[b:])
        return loss

    def close(self) -> None:
        """Stop the buffer's worker and release its process group."""
        self.replay.close()


__all__ = ["DistributedDER"]
