"""How an experience's training samples are shared among the ranks (``--rank-split``).

* ``iid``: Avalanche's own distributed sampler (a ``DistributedSampler`` per experience):
  every rank gets a random ``1 / N`` of each experience, padded by repetition to equal
  lengths. Nothing here runs: the benchmark is passed to Avalanche unchanged.
* ``skewed``: each rank stands for a site or an instrument that produces mostly some of
  the experience's classes. :func:`skewed_split` deals every sample of an experience to
  one rank, with a per-class share controlled by ``skew`` in [0, 1] (0: every class is
  spread evenly over the ranks, as iid; 1: a class goes to its home ranks only), then
  pads the shorter ranks by repeating their own samples so every rank has the same
  number of samples, hence the same number of steps. :func:`rank_benchmark` gives each
  rank a train stream of its own shares, and :class:`RankLocalLoaders` makes the
  strategy load exactly that share (no distributed sampler re-splits it).

The split is a pure function of (labels, classes, world, skew, seed, experience index):
every rank computes the whole split, so every rank can report every rank's histogram.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Sequence

import torch


def home_ranks(n_classes: int, world: int) -> List[List[int]]:
    """The home ranks of each of an experience's ``n_classes`` classes (by position ``j``
    in the experience's sorted class list): ``{w : w = j (mod min(n_classes, world))}``.

    With at least as many ranks as classes, rank ``w`` is home to class ``w mod n_classes``
    (every class has ``world // n_classes`` or one more home ranks); with fewer ranks,
    class ``j`` has the single home rank ``j mod world``. Every class has a home rank and
    every rank is home to at least one class.
    """
    m = min(n_classes, world)
    return [[w for w in range(world) if w % m == j % m] for j in range(n_classes)]


def _largest_remainder(n: int, weights: Sequence[float]) -> List[int]:
    """``n`` split into integers proportional to ``weights`` (sum exactly ``n``; ties to
    the lower index)."""
    total = float(sum(weights))
    exact = [n * w / total for w in weights]
    floor = [int(x) for x in exact]
    left = n - sum(floor)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - floor[i]), i))
    for i in order[:left]:
        floor[i] += 1
    return floor


def skewed_split(labels: torch.Tensor, world: int, skew: float, seed: int,
                 experience: int = 0) -> List[torch.Tensor]:
    """Deal one experience's samples to ``world`` ranks; return each rank's indices.

    Args:
        labels: ``(n,)`` int64 class labels of the experience's samples.
        world: number of ranks N >= 1.
        skew: s in [0, 1]. Class ``j`` (position in the sorted distinct labels) is split
            over the ranks with shares ``(1 - s) / N + s * [w home to j] / |home(j)|``
            (see :func:`home_ranks`): 0 is an even split of every class, 1 gives each
            class to its home ranks only.
        seed, experience: the samples of each class are shuffled by a generator seeded
            with ``seed * 1000003 + experience`` before being cut into the ranks' shares
            (largest-remainder rounding, so the shares cover every sample exactly once).

    Returns:
        ``world`` int64 tensors of indices into ``labels`` (new tensors, owned by the
        caller), all of the same length ``L``: the longest share. A shorter share is
        padded by repeating its own samples in a seeded random order (a rank with no
        sample at all repeats the experience's); so the union holds every sample, and
        only padded samples appear twice.
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must be in [0, 1], got {skew}")
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    g = torch.Generator().manual_seed(int(seed) * 1000003 + int(experience))
    classes = torch.unique(labels).tolist()
    homes = home_ranks(len(classes), world)
    shares: List[List[torch.Tensor]] = [[] for _ in range(world)]
    for j, c in enumerate(classes):
        idx = torch.nonzero(labels == c).view(-1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        weights = [(1.0 - skew) / world + (skew / len(homes[j]) if w in homes[j] else 0.0)
                   for w in range(world)]
        start = 0
        for w, n in enumerate(_largest_remainder(len(idx), weights)):
            shares[w].append(idx[start:start + n])
            start += n
    parts = [torch.cat(s) if s else torch.empty(0, dtype=torch.int64) for s in shares]
    length = max(len(p) for p in parts)
    out = []
    for p in parts:
        pool = p if len(p) else torch.arange(len(labels), dtype=torch.int64)
        short = length - len(p)
        if short:
            reps = -(-short // len(pool))
            order = torch.cat([pool[torch.randperm(len(pool), generator=g)] for _ in range(reps)])
            p = torch.cat([p, order[:short]])
        out.append(p.clone())
    return out


def histogram(labels: torch.Tensor, indices: torch.Tensor) -> Dict[int, int]:
    """``{class: count}`` of ``labels[indices]`` (ascending classes)."""
    values, counts = torch.unique(torch.as_tensor(labels)[indices], return_counts=True)
    return {int(v): int(n) for v, n in zip(values.tolist(), counts.tolist())}


class RankBenchmark:
    """A benchmark whose train stream is this rank's share of every experience.

    ``train_stream``: a list of copies of the original experiences whose dataset is the
    rank's subset; the copies keep the original experience's metadata
    (``classes_in_this_experience``, ``current_experience``, task labels), which are
    the same on every rank. ``test_stream``: the original one (evaluation is global).
    ``split``: a JSON-ready description (mode, skew, per experience and rank: length,
    padded samples, class histogram).
    """

    def __init__(self, train_stream: list, test_stream, split: dict):
        self.train_stream = train_stream
        self.test_stream = test_stream
        self.split = split


def rank_benchmark(benchmark, rank: int, world: int, skew: float, seed: int) -> RankBenchmark:
    """This rank's :class:`RankBenchmark` of ``benchmark`` under :func:`skewed_split`."""
    stream, table = [], []
    for e, exp in enumerate(benchmark.train_stream):
        labels = torch.as_tensor(list(exp.dataset.targets), dtype=torch.int64)
        parts = skewed_split(labels, world, skew, seed, e)
        row = []
        for p in parts:
            distinct = torch.unique(p)
            row.append({"length": len(p), "padded": len(p) - len(distinct),
                        "classes": {str(k): v for k, v in histogram(labels, p).items()}})
        table.append(row)
        mine = copy.copy(exp)
        mine._dataset = exp.dataset.subset(parts[rank].tolist())
        stream.append(mine)
    split = {"mode": "skewed", "skew": skew, "seed": seed, "world_size": world,
             "experiences": table}
    return RankBenchmark(stream, benchmark.test_stream, split)


class RankLocalLoaders:
    """Strategy mixin: the training data loader is a plain ``DataLoader`` over the
    experience's dataset (shuffled by torch's global generator), never Avalanche's
    distributed sampler, so under torch.distributed each rank trains on exactly its own
    dataset. Put it first in the bases (``class S(RankLocalLoaders, Naive)``)."""

    def make_train_dataloader(self, num_workers=0, shuffle=True, pin_memory=None,
                              persistent_workers=False, drop_last=False, **kwargs):
        from torch.utils.data import DataLoader

        args = self._obtain_common_dataloader_parameters(
            batch_size=self.train_mb_size, num_workers=num_workers, shuffle=shuffle,
            pin_memory=pin_memory, persistent_workers=persistent_workers, drop_last=drop_last)
        args.setdefault("collate_fn", getattr(self.adapted_dataset, "collate_fn", None))
        self.dataloader = DataLoader(self.adapted_dataset, **args)


_LOCAL_CLASSES: dict = {}


def rank_local(cls):
    """``cls`` (an Avalanche strategy class) with :class:`RankLocalLoaders` mixed in."""
    if cls not in _LOCAL_CLASSES:
        _LOCAL_CLASSES[cls] = type(f"RankLocal{cls.__name__}", (RankLocalLoaders, cls), {})
    return _LOCAL_CLASSES[cls]
