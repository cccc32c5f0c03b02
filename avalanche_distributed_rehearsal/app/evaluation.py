"""Test accuracy per experience, and the continual-learning summaries of an accuracy matrix.

The accuracy matrix ``R`` is ``n x n``: ``R[i][j]`` is the test accuracy (a fraction in
[0, 1]) on experience ``j``'s classes after training on experience ``i``.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


@torch.no_grad()
def evaluate(model: nn.Module, test_stream, device: torch.device, batch_size: int = 512,
             group=None) -> List[float]:
    """Accuracy of ``model`` on every experience of ``test_stream``: a list of floats.

    Under torch.distributed each rank classifies the samples ``rank, rank + world, ...``
    and one ``all_reduce`` of a ``(2 n,)`` int64 tensor of correct/total counts, on
    ``device``, over ``group`` (which must serve that device; default the default group)
    combines them, so every rank must call it and every rank gets the same list.
    """
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    model = getattr(model, "module", model)  # DDP -> the local replica, no collectives
    was_training = model.training
    model.eval()
    counts = [0] * (2 * len(test_stream))
    for j, exp in enumerate(test_stream):
        ds = exp.dataset.eval()
        loader = DataLoader(Subset(ds, range(rank, len(ds), world)), batch_size=batch_size,
                            shuffle=False, num_workers=0)
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            counts[2 * j] += int((model(x).argmax(1) == y).sum())
            counts[2 * j + 1] += len(y)
    totals = torch.tensor(counts, dtype=torch.int64, device=device)
    if dist and world > 1:
        dist.all_reduce(totals, group=group)
    model.train(was_training)
    totals = totals.tolist()
    return [float(c) / max(1, int(t)) for c, t in zip(totals[0::2], totals[1::2])]


def average_accuracy(matrix: Sequence[Sequence[float]]) -> float:
    """Final average accuracy: the mean of the last row (accuracy on every experience
    after training on all of them)."""
    last = matrix[-1]
    return sum(last) / len(last)


def average_forgetting(matrix: Sequence[Sequence[float]]) -> float:
    """Avalanche's forgetting: for every experience ``j`` but the last, the best accuracy
    on ``j`` measured before the final one (``max_{j <= i < n-1} R[i][j]``) minus the
    final accuracy ``R[n-1][j]``, averaged over those experiences (0 for one experience)."""
    n = len(matrix)
    if n < 2:
        return 0.0
    drops = [max(matrix[i][j] for i in range(j, n - 1)) - matrix[n - 1][j] for j in range(n - 1)]
    return sum(drops) / len(drops)


def accuracy_curve(matrix: Sequence[Sequence[float]]) -> List[float]:
    """Average accuracy on the experiences seen so far, after each experience:
    ``mean(R[i][0..i])`` for each ``i``."""
    return [sum(row[: i + 1]) / (i + 1) for i, row in enumerate(matrix)]
