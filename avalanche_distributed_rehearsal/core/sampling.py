"""The global sampling plan: which rank sends which stored sample to whom, this step.

Every rank calls :func:`plan_draws` with the same all-gathered counts and a generator
seeded by ``(seed, step)``, so every rank computes the same plan for the whole world
without exchanging requests. Cost: ``O(world * r log(world * r))`` per step, independent
of the buffer size, plus, in ``"class_balanced"`` mode, ``O(r + L)`` Python steps for
each requester that exhausts one of the ``L`` classes before its last draw.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import List, Optional

import torch

SAMPLING_MODES = ("uniform", "class_balanced", "local")


@dataclass
class SamplingPlan:
    """The draws of every rank for one step; its tensors are CPU, owned by the plan.

    Requester ``q`` makes ``counts_per_rank[q]`` real draws: entries ``j <
    counts_per_rank[q]`` of its row, in draw order. In ``"uniform"`` and
    ``"class_balanced"`` mode every requester makes ``d`` draws (no padding); in
    ``"local"`` mode requesters may make fewer, and the rest of the row is padding,
    ``owner = local = -1``, never sent nor received.

    Attributes:
        owner: ``(world, d)`` int64, the rank that stores draw ``j`` of requester ``q``
            (always ``q`` itself in ``"local"`` mode), -1 in padding.
        local: ``(world, d)`` int64, the draw's index on its owner: a storage slot in
            ``"uniform"`` and ``"local"`` mode, the index within the owner's samples of
            ``label`` in ``"class_balanced"`` mode; -1 in padding.
        label: ``(world, d)`` int64 class labels (``"class_balanced"`` only) or None.
        d: draws per rank, the width of the rows: ``min(r, total)``, the same for every
            rank, in ``"uniform"`` and ``"class_balanced"`` mode; the largest
            ``counts_per_rank`` in ``"local"`` mode.
        counts_per_rank: ``(world,)`` int64, each requester's number of real draws
            (``min(r, its own total)`` in ``"local"`` mode); filled with ``d`` when not given.
    """

    owner: torch.Tensor
    local: torch.Tensor
    label: Optional[torch.Tensor]
    d: int
    counts_per_rank: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.counts_per_rank is None:
            self.counts_per_rank = torch.full((self.owner.shape[0],), self.d, dtype=torch.int64)

    def num_draws(self, rank: int) -> int:
        """Requester ``rank``'s number of real draws (rows it receives)."""
        return int(self.counts_per_rank[rank])

    def receive_splits(self, rank: int, world_size: int) -> torch.Tensor:
        """``(world,)`` int64: how many of ``rank``'s draws each rank sends it."""
        return torch.bincount(self.owner[rank, : self.num_draws(rank)], minlength=world_size)

    def receive_order(self, rank: int) -> torch.Tensor:
        """``(num_draws(rank),)`` int64 permutation: received row ``k`` is draw
        ``receive_order[k]``."""
        return torch.sort(self.owner[rank, : self.num_draws(rank)], stable=True).indices

    def sends(self, rank: int):
        """What ``rank`` serves: ``(splits (world,), local (n,), label (n,) or None)``.

        Rows are grouped by requester in rank order, each group in its draw order.
        Padding (owner -1) is never served.
        """
        mask = self.owner == rank
        label = None if self.label is None else self.label[mask]
        return mask.sum(dim=1), self.local[mask], label

    def routes(self, rank: int, world_size: int, python: Optional[bool] = None) -> "Routes":
        """What ``rank`` sends and receives for this plan (:meth:`sends`,
        :meth:`receive_splits` and the inverse of :meth:`receive_order` together).

        ``python``: route with Python lists (True) or tensor operations (False); default:
        lists up to :data:`PYTHON_ROUTES_MAX` plan entries, where a few dozen list steps
        cost less than the dozen small tensor operations. The same routes either way.
        """
        if python is None:
            python = self.owner.numel() <= PYTHON_ROUTES_MAX
        if not python:
            splits, local, label = self.sends(rank)
            recv = self.receive_splits(rank, world_size).tolist()
            return Routes(splits.tolist(), local, label, recv,
                          torch.argsort(self.receive_order(rank)))
        owner, local_rows = self.owner.tolist(), self.local.tolist()
        label_rows = None if self.label is None else self.label.tolist()
        splits, local, label = [], [], []
        for q, row in enumerate(owner):
            served = [j for j, o in enumerate(row) if o == rank]
            splits.append(len(served))
            local.extend(local_rows[q][j] for j in served)
            if label_rows is not None:
                label.extend(label_rows[q][j] for j in served)
        own = owner[rank][: self.num_draws(rank)]
        recv = [0] * world_size
        for o in own:
            recv[o] += 1
        where = [0] * len(own)
        for k, j in enumerate(sorted(range(len(own)), key=own.__getitem__)):  # stable
            where[j] = k
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
        return Routes(splits, as_tensor(local), None if label_rows is None else as_tensor(label),
                      recv, as_tensor(where))


#: Plans of up to this many entries (ranks x draws) route in Python (:meth:`SamplingPlan.routes`).
PYTHON_ROUTES_MAX = 4096


@dataclass
class Routes:
    """One rank's traffic for a :class:`SamplingPlan`; tensors CPU int64, owned by the caller.

    Attributes:
        send_splits: records this rank sends to each rank (a list of ``world`` ints).
        local, label: ``(n,)`` the plan's indexes (and class labels, ``"class_balanced"``
            only, else None) of the records it sends, grouped by requester in rank order,
            each group in draw order (:meth:`SamplingPlan.sends`).
        recv_splits: records it receives from each rank (a list of ``world`` ints).
        where: ``(d,)`` its draw ``j`` is received record ``where[j]`` (records arrive by
            source rank, each source's in draw order).
    """

    send_splits: List[int]
    local: torch.Tensor
    label: Optional[torch.Tensor]
    recv_splits: List[int]
    where: torch.Tensor


#: Draws up to this many uniforms (rows x candidates per row) take the Python branch of
#: :func:`sample_distinct`: for the few dozen values of a step's plan, a loop over a list
#: beats the dozen small torch ops of the vectorised branch. Both branches return the
#: same values for the same generator state (tested), so the choice never changes a plan.
PYTHON_BRANCH_MAX = 2048


def sample_distinct(n: torch.Tensor, d: torch.Tensor, gen: torch.Generator,
                    vectorized: Optional[bool] = None) -> torch.Tensor:
    """Row ``i``: ``d[i]`` distinct integers drawn uniformly without replacement from ``[0, n[i])``.

    Args:
        n: ``(R,)`` int64 population sizes. d: ``(R,)`` int64 draw counts, ``d <= n``.
        vectorized: force the torch (True) or the Python (False) branch; default: Python
            while at most :data:`PYTHON_BRANCH_MAX` uniforms are needed. Same result.
    Returns:
        ``(R, max(d))`` int64, row ``i`` holding its draws in draw order, padded with -1.

    The draws are the first ``d[i]`` distinct values of an i.i.d. uniform sequence, which
    is exactly sequential sampling without replacement. Rows that run short (populations
    not much larger than the draw) finish with a random order of the values not yet taken.
    Values come from ``floor(u * n)`` with ``u`` a float64 uniform: the bias is below
    ``n / 2**53``.
    """
    n_list, d_list = n.tolist(), d.tolist()
    rows, width = len(n_list), max(d_list, default=0)
    if rows == 0 or width == 0:
        return torch.full((rows, width), -1, dtype=torch.int64)
    if any(not 0 <= di <= ni for ni, di in zip(n_list, d_list)):
        raise ValueError("sample_distinct needs 0 <= d <= n")
    if vectorized is None:
        vectorized = rows * _uniforms_per_row(width) > PYTHON_BRANCH_MAX
    if not vectorized:
        picked = _distinct_python(n_list, d_list, gen)
        return torch.tensor([p + [-1] * (width - len(p)) for p in picked], dtype=torch.int64)
    u = torch.rand((rows, _uniforms_per_row(width)), generator=gen, dtype=torch.float64)
    out, got = _first_distinct_torch(u, n, d, width)
    for i in torch.nonzero(got < d).flatten().tolist():
        have = out[i, : got[i]]
        rest = torch.ones(int(n[i]), dtype=torch.bool)
        rest[have] = False
        pool = torch.nonzero(rest).flatten()
        pick = pool[torch.randperm(pool.numel(), generator=gen)[: int(d[i] - got[i])]]
        out[i, got[i]: d[i]] = pick
    return out


def _uniforms_per_row(width: int) -> int:
    return 2 * width + 8


#: One rank draws by a random permutation of its eligible samples up to this many of them.
PERMUTATION_MAX = 4096


def sample_one_rank(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """``(d,)`` int64: ``d`` distinct integers drawn uniformly without replacement from
    ``[0, n)``, in draw order: the first ``d`` of a random permutation (one operation) while
    ``n <= PERMUTATION_MAX``, else :func:`sample_distinct`. One rank's uniform and local
    plans (the same law as :func:`plan_draws`, another use of the generator)."""
    if d == 0:
        return torch.zeros(0, dtype=torch.int64)
    if n <= PERMUTATION_MAX:
        return torch.randperm(n, generator=gen)[:d]
    return sample_distinct(torch.tensor([n]), torch.tensor([d]), gen)[0]


def _distinct_python(n_list: List[int], d_list: List[int], gen: torch.Generator) -> List[List[int]]:
    """:func:`sample_distinct` in plain Python, unpadded rows; the same values and the same
    generator use as the torch branch (one ``rand``, then a ``randperm`` per short row)."""
    width = max(d_list)
    u = torch.rand((len(n_list), _uniforms_per_row(width)), generator=gen, dtype=torch.float64)
    out = []
    for us, ni, di in zip(u.tolist(), n_list, d_list):
        top, scale = max(ni - 1, 0), float(ni)  # the same float64 product as the torch branch
        picked, seen = [], set()
        for x in us:
            if len(picked) == di:
                break
            v = min(int(x * scale), top)
            if v not in seen:
                seen.add(v)
                picked.append(v)
        out.append(picked)
    for picked, ni, di in zip(out, n_list, d_list):
        if len(picked) < di:  # ran short: a random order of the values not yet taken
            taken = set(picked)
            pool = [v for v in range(ni) if v not in taken]
            order = torch.randperm(len(pool), generator=gen)[: di - len(picked)].tolist()
            picked.extend(pool[j] for j in order)
    return out


def _first_distinct_torch(u: torch.Tensor, n: torch.Tensor, d: torch.Tensor, width: int):
    """The first ``d`` distinct values of ``floor(u * n)`` per row, vectorised: one sort."""
    rows, k = u.shape
    out = torch.full((rows, width), -1, dtype=torch.int64)
    vals = (u * n.to(torch.float64).unsqueeze(1)).to(torch.int64).clamp_(max=(n - 1).clamp(min=0).unsqueeze(1))
    span = int(n.max()) + 1
    key = (torch.arange(rows).unsqueeze(1) * span + vals).reshape(-1)
    sorted_key, order = torch.sort(key, stable=True)
    first = torch.ones_like(sorted_key, dtype=torch.bool)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    is_first = torch.zeros(rows * k, dtype=torch.bool)
    is_first[order[first]] = True
    is_first = is_first.view(rows, k)
    position = torch.cumsum(is_first, dim=1)
    take = is_first & (position <= d.unsqueeze(1))
    r_idx, c_idx = take.nonzero(as_tuple=True)
    out[r_idx, position[r_idx, c_idx] - 1] = vals[r_idx, c_idx]
    return out, take.sum(dim=1)


def plan_draws(counts: torch.Tensor, r: int, mode: str, gen: torch.Generator) -> SamplingPlan:
    """Plan ``r`` draws per rank from the union of all shards (or each rank's own shard).

    Args:
        counts: ``(world, L)`` int64 CPU tensor, ``counts[w, c]`` = samples of class ``c``
            on rank ``w`` (``world >= 1``, entries ``>= 0``). Read only.
        r: representatives per rank per step (an int ``>= 0``).
        mode: one of :data:`SAMPLING_MODES`, the law of each requester's draws:

            * ``"uniform"``: ``d = min(r, total)`` samples drawn uniformly without
              replacement from the union of all shards (every stored sample equally likely).
            * ``"class_balanced"``: ``d = min(r, total)`` draws; each draw picks a class
              uniformly among the classes the requester has not exhausted yet at this step
              (exhausted: all its stored samples, over all ranks, already drawn by this
              requester), then one of that class's samples not drawn yet, uniformly.
            * ``"local"``: requester ``q`` draws ``min(r, counts[q].sum())`` samples
              uniformly without replacement from its own shard only (no cross-rank
              traffic; an ablation baseline). Rows are padded, see :class:`SamplingPlan`.
              Row ``q`` still depends on the whole table (each row's uniforms follow the
              widest row), so every rank must pass the same all-gathered ``counts``.
        gen: CPU ``torch.Generator``; the same state on every rank gives the same plan.
            Its use: ``"uniform"``: one :func:`sample_distinct` draw over the union
            (either branch); ``"class_balanced"``: :func:`_class_sequence` (see there),
            then one :func:`sample_distinct` for the samples within each (requester,
            class) group; ``"local"``: one :func:`sample_distinct` with row ``q`` drawing
            from rank ``q``'s shard. Nothing is drawn when no requester draws.
    Returns:
        A new :class:`SamplingPlan`; the caller owns its tensors.
    Raises:
        ValueError: naming the argument, for a bad ``counts``, ``r``, ``mode`` or ``gen``.

    Each requester's draws are without replacement; different requesters draw
    independently of one another (the same sample may go to several requesters).
    """
    _check_plan_args(counts, r, mode, gen)
    if mode == "class_balanced":
        return _plan_balanced_or_empty(counts, r, gen)
    return plan_from_totals(counts.sum(dim=1), r, mode, gen)


def _empty_plan(world: int, label: bool) -> SamplingPlan:
    empty = torch.zeros((world, 0), dtype=torch.int64)
    return SamplingPlan(empty, empty.clone(), empty.clone() if label else None, 0)


def _plan_balanced_or_empty(counts: torch.Tensor, r: int, gen: torch.Generator) -> SamplingPlan:
    d = min(r, int(counts.sum()))
    if d == 0:
        return _empty_plan(counts.shape[0], True)
    return _plan_class_balanced(counts, d, gen)


def plan_from_totals(per_rank: torch.Tensor, r: int, mode: str, gen: torch.Generator) -> SamplingPlan:
    """:func:`plan_draws` for the modes that need only every rank's number of eligible
    samples, ``per_rank`` ``(world,)`` int64 (``"uniform"`` and ``"local"``): the same plan."""
    if mode == "local":
        return _plan_local(per_rank, r, gen)
    sizes = per_rank.tolist()
    d = min(r, sum(sizes))
    if d == 0:
        return _empty_plan(per_rank.shape[0], False)
    return _plan_uniform(per_rank, sizes, d, gen)


def _check_plan_args(counts, r, mode, gen) -> None:
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling mode must be one of {SAMPLING_MODES}, got {mode!r}")
    if (not isinstance(counts, torch.Tensor) or counts.dim() != 2 or counts.dtype != torch.int64
            or counts.device.type != "cpu"):
        what = (f"a {counts.dtype} {counts.device.type} tensor of shape {tuple(counts.shape)}"
                if isinstance(counts, torch.Tensor) else type(counts).__name__)
        raise ValueError(f"counts must be a (world, L) int64 CPU tensor, got {what}")
    if counts.shape[0] == 0:
        raise ValueError("counts must have a row per rank, got 0 rows")
    if counts.numel() and bool((counts < 0).any()):
        raise ValueError(f"counts must be >= 0, got a minimum of {int(counts.min())}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be an int >= 0, got {type(r).__name__} {r!r}")
    if not isinstance(gen, torch.Generator) or gen.device.type != "cpu":
        raise ValueError(f"gen must be a CPU torch.Generator, got {gen!r}")


def _plan_local(per_rank: torch.Tensor, r: int, gen: torch.Generator) -> SamplingPlan:
    world = per_rank.shape[0]
    n = per_rank.clamp(max=r)
    local = sample_distinct(per_rank, n, gen)  # (world, max n), padded with -1
    owner = torch.where(local >= 0, torch.arange(world).unsqueeze(1), torch.full_like(local, -1))
    return SamplingPlan(owner, local, None, local.shape[1], n)


def _plan_uniform(per_rank: torch.Tensor, sizes: List[int], d: int,
                  gen: torch.Generator) -> SamplingPlan:
    """``sizes``: ``per_rank`` as a list."""
    world = len(sizes)
    total = sum(sizes)
    if world * _uniforms_per_row(d) <= PYTHON_BRANCH_MAX:  # small: plain Python, same plan
        ends = list(itertools.accumulate(sizes))
        draws = _distinct_python([total] * world, [d] * world, gen)
        owner = [[bisect.bisect_right(ends, v) for v in row] for row in draws]
        local = [[v - ends[o] + sizes[o] for v, o in zip(row, orow)]
                 for row, orow in zip(draws, owner)]
        return SamplingPlan(torch.tensor(owner, dtype=torch.int64),
                            torch.tensor(local, dtype=torch.int64), None, d)
    draws = sample_distinct(torch.full((world,), total), torch.full((world,), d), gen,
                            vectorized=True)
    ends = torch.cumsum(per_rank, 0)
    owner = torch.searchsorted(ends, draws, right=True)
    local = draws - (ends - per_rank)[owner]
    return SamplingPlan(owner, local, None, d)


def _class_sequence(class_sizes: torch.Tensor, d: int, world: int, gen: torch.Generator) -> torch.Tensor:
    """The class labels of every requester's draws, following the law of :func:`plan_draws`.

    Args:
        class_sizes: ``(L,)`` int64 samples per class over all ranks, ``sum >= d``.
        d: draws per requester, ``>= 1``. world: number of requesters.
    Returns:
        ``(world, d)`` int64, a new tensor: row ``q`` holds requester ``q``'s classes in
        draw order. Each draw is uniform over the classes requester ``q`` has not exhausted
        yet (a class is exhausted once all its samples have been drawn), independently of
        the other requesters.

    Generator use (the same on every rank, so the same labels):

    1. always one ``torch.randint(K, (world, d))``, ``K`` the number of non-empty classes:
       i.i.d. uniform picks ``X``. Each row keeps them up to and including its first draw
       that exhausts a class, and entirely when that happens at the last draw or never,
       which is certain when every class holds at least ``d`` samples (then nothing else is
       drawn);
    2. then, only if ``m >= 1`` rows exhaust a class before their last draw: one
       ``torch.rand((m, d), dtype=float64)``. Its row ``i`` serves the ``i``-th such
       requester in rank order: entry ``j`` picks draw ``j``'s class after that first
       exhaustion as ``floor(u * A)`` among the ``A`` classes still available (kept in a
       list by ascending label, with swap-remove as classes run out).

    This is the law exactly: up to the first exhaustion every class is still available, so
    an i.i.d. uniform pick is a uniform pick among the available ones; whether a row goes on
    sequentially depends only on its draws so far, and the rest is drawn afresh. (Redrawing
    the rows whose i.i.d. picks over-demand a class, as before, conditions on that event and
    biases the law.) The float64 pick's bias is below ``A / 2**53``. Cost: one sort of
    ``world * d`` keys, plus ``O(d + L)`` Python steps per requester that goes on.
    """
    classes = torch.nonzero(class_sizes > 0).flatten()
    pick = classes[torch.randint(classes.numel(), (world, d), generator=gen)]
    if d <= int(class_sizes[classes].min()):
        return pick
    occurrence = _group_draws(pick, class_sizes.numel())[3]
    exhausts = (occurrence + 1) == class_sizes[pick]
    exhausts[:, d - 1] = False  # exhausting a class at the last draw leaves nothing to fix
    goes_on = torch.nonzero(exhausts.any(dim=1)).flatten().tolist()
    if not goes_on:
        return pick
    first = torch.argmax(exhausts.to(torch.int8), dim=1).tolist()
    u = torch.rand((len(goes_on), d), generator=gen, dtype=torch.float64).tolist()
    sizes, nonempty = class_sizes.tolist(), classes.tolist()
    for us, q in zip(u, goes_on):
        seq = pick[q].tolist()
        left = list(sizes)
        for c in seq[: first[q] + 1]:
            left[c] -= 1
        avail = [c for c in nonempty if left[c] > 0]
        for j in range(first[q] + 1, d):
            k = min(int(us[j] * len(avail)), len(avail) - 1)
            c = seq[j] = avail[k]
            left[c] -= 1
            if left[c] == 0:
                avail[k] = avail[-1]
                avail.pop()
        pick[q] = torch.tensor(seq, dtype=torch.int64)
    return pick


def _group_draws(label: torch.Tensor, num_labels: int):
    """Group each requester's draws by class.

    Args:
        label: ``(world, d)`` int64 classes in ``[0, num_labels)``.
    Returns:
        ``(groups, group_len, group_of_draw, occurrence)``, new int64 tensors: ``groups``
        the distinct keys ``requester * num_labels + class``, ascending, and ``group_len``
        their sizes; ``group_of_draw`` ``(world, d)``: each draw's index in ``groups``;
        ``occurrence`` ``(world, d)``: how many earlier draws of the same requester have
        the same class.
    """
    # No repeat_interleave: on CPU it starts a parallel region even for a few elements,
    # which costs milliseconds per call on a busy host with several intra-op threads.
    world, d = label.shape
    flat_key = (torch.arange(world).unsqueeze(1) * num_labels + label).reshape(-1)
    sorted_key, order = torch.sort(flat_key, stable=True)
    is_start = torch.ones_like(sorted_key, dtype=torch.bool)
    is_start[1:] = sorted_key[1:] != sorted_key[:-1]
    group_sorted = torch.cumsum(is_start, 0) - 1
    starts = torch.nonzero(is_start).flatten()
    group_len = torch.diff(starts, append=torch.tensor([flat_key.numel()]))
    occurrence, group_of_draw = torch.empty_like(order), torch.empty_like(order)
    occurrence[order] = torch.arange(flat_key.numel()) - starts[group_sorted]
    group_of_draw[order] = group_sorted
    return sorted_key[starts], group_len, group_of_draw.view(world, d), occurrence.view(world, d)


def _plan_class_balanced(counts: torch.Tensor, d: int, gen: torch.Generator) -> SamplingPlan:
    world, num_labels = counts.shape
    class_sizes = counts.sum(dim=0)
    label = _class_sequence(class_sizes, d, world, gen)
    groups, group_len, group_of_draw, occurrence = _group_draws(label, num_labels)
    within = sample_distinct(class_sizes[groups % num_labels], group_len, gen)
    j = within[group_of_draw, occurrence]
    # Map the within-class index to (owner rank, index among the owner's samples of the class).
    ends = torch.cumsum(counts, dim=0)  # (world, L)
    ends_per_draw = ends.t()[label]  # (world, d, world)
    owner = (ends_per_draw <= j.unsqueeze(-1)).sum(dim=-1)
    local = j - (ends - counts).t()[label, owner]
    return SamplingPlan(owner, local, label, d)


# ---------------------------------------------------------------------- samplers
class Eligible:
    """What a sampler may read of a step's eligible samples (identical on every rank).

    Attributes:
        per_rank: ``(world,)`` int64, eligible samples on each rank.
        labels: the class labels of the columns of :meth:`matrix`.
    ``matrix()``: ``(world, L)`` int64 eligible samples per rank and class (built on
    first use: ``O(world * L)``; the uniform and local samplers never need it).
    """

    def __init__(self, per_rank: torch.Tensor, matrix, labels=()):
        self.per_rank = per_rank
        self._matrix = matrix
        self.labels = tuple(labels)

    def matrix(self) -> torch.Tensor:
        if callable(self._matrix):
            self._matrix = self._matrix()
        return self._matrix

    @classmethod
    def from_counts(cls, counts: torch.Tensor, labels=()) -> "Eligible":
        return cls(counts.sum(dim=1), counts, labels)


class Sampler:
    """A sampling policy: plans every rank's draws of a step from the eligible samples.

    Subclasses set :attr:`name` and implement :meth:`plan`, a pure function of its
    arguments (every rank calls it with the same ones and must get the same plan).
    :attr:`exchanges` tells whether the plan moves records between ranks (False: every
    rank serves its own draws, no payload). :attr:`by_class` tells whether plans index
    samples within their class (``SamplingPlan.label`` set) rather than within the
    owner's eligible samples in slot order.
    """

    name = "sampler"
    exchanges = True
    by_class = False

    def plan(self, eligible: Eligible, r: int, gen: torch.Generator) -> SamplingPlan:
        """``eligible``: see :class:`Eligible`; ``r``: draws per requester; ``gen``: seeded
        by ``(seed, step)``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class UniformSampler(Sampler):
    """Every stored sample of the union equally likely (see :func:`plan_draws`)."""

    name = "uniform"

    def plan(self, eligible, r, gen):
        return plan_from_totals(eligible.per_rank, r, "uniform", gen)


class ClassBalancedSampler(Sampler):
    """Each draw: a class uniformly among those not exhausted, then one of its samples."""

    name = "class_balanced"
    by_class = True

    def plan(self, eligible, r, gen):
        return _plan_balanced_or_empty(eligible.matrix(), r, gen)


class LocalSampler(Sampler):
    """Each rank draws from its own shard only: no exchange (the ablation baseline)."""

    name = "local"
    exchanges = False

    def plan(self, eligible, r, gen):
        return plan_from_totals(eligible.per_rank, r, "local", gen)


SAMPLERS = {cls.name: cls for cls in (UniformSampler, ClassBalancedSampler, LocalSampler)}


def make_sampler(spec) -> Sampler:
    """A :class:`Sampler` from its name (one of :data:`SAMPLING_MODES`) or itself."""
    if isinstance(spec, Sampler):
        return spec
    if isinstance(spec, str) and spec in SAMPLERS:
        return SAMPLERS[spec]()
    raise ValueError(f"sampling must be one of {SAMPLING_MODES} or a Sampler, got {spec!r}")
