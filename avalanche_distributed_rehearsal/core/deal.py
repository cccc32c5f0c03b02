"""One deal of the global budget over all ranks: how many samples of each class each rank
keeps (its *quotas*).

The deal is a deterministic function of data every rank holds (the replicated
:class:`~.ledger.ClassLedger`), computed in integer arithmetic, so every rank computes the
same quotas for every rank without exchanging them.

What it solves. Ranks ``w`` have capacities ``cap[w]``; class ``c`` may be kept on rank
``w`` up to ``ub[w, c]`` samples (0 where ``w`` never saw ``c``; the samples ``w`` holds
now for a class it receives no candidates of any more; unbounded otherwise). Among the
allocations ``x[w, c]`` that respect both, the deal looks for the one whose class totals
``T[c] = sum_w x[w, c]`` are *max-min fair*: the smallest total as large as possible, then
the next, and so on: the minimiser of ``sum_c (T[c] - t[c])**2`` with every rank's
capacity used, where ``t[c]`` is the class's target (``M // K``, plus one for the
``M % K`` classes of highest priority; see :mod:`~.quotas`). When every rank can hold its
share of every class the totals are the targets exactly; a class seen on one rank only
gets its whole share there; room a rank cannot fill with the classes it sees goes to the
classes it holds; otherwise the totals are as even as the capacities allow (the
lexicographically optimal allocation of this polymatroid, up to the targets' +1s).

How. Block-coordinate descent: starting from each class's target split over the ranks
in proportion to the candidates each rank offered (``n[w, c]``), each rank in turn re-fills
its capacity by integer water-filling over the other ranks' totals (raising the classes
furthest below their targets first; ties keep the quotas a rank has now), until a sweep
changes nothing. Where the proportional split already meets the targets (i.i.d. streams,
symmetric skews) the first sweep keeps it, so a class's samples stay spread over the
ranks in proportion to the candidates they saw; elsewhere quotas move to where the room
is. A descent in whole samples can stop where no single rank can improve: it is finished
exactly by moving single samples along chains of exchanges between ranks, from a class
at least two samples further below its target than another, until no such chain is left
(the integer lexicographic optimum).

Cost: ``O(sweeps * W * K log K)`` torch operations on CPU int64 tensors, plus ``O(W * K)``
per exchange chain (none in the balanced case). Deals happen only
when the structure changes (a class or a rank-class pair appears, a class receives
candidates again, the budget or the number of ranks changes, a new experience starts),
never in the steady state.
"""

from __future__ import annotations

from typing import Optional

import torch

#: ``ub`` value meaning "no bound" (far above any budget, far below int64 overflow).
UNBOUNDED = 1 << 40

#: Sweeps after which the deal stops even if a sweep still moved a sample.
MAX_SWEEPS = 64


def _tie_order(keys, rank_of_class: torch.Tensor) -> torch.Tensor:
    """A permutation of the classes: by each of ``keys`` in turn (larger first), then by
    ``rank_of_class`` (priority rank, 0 = highest)."""
    # stable sorts, least significant key first
    order = torch.argsort(rank_of_class, stable=True)
    for key in reversed(keys):
        order = order[torch.argsort(-key[order], stable=True)]
    return order


def water_fill(base: torch.Tensor, ub: torch.Tensor, capacity: int, current: torch.Tensor,
               priority_rank: torch.Tensor, bonus: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One rank's integer water-filling.

    Args:
        base: ``(K,)`` int64, each class's total on the other ranks.
        ub: ``(K,)`` int64 ``>= 0``, the most this rank may keep of each class.
        capacity: this rank's slots.
        current: ``(K,)`` int64, this rank's allocation now (ties keep it).
        priority_rank: ``(K,)`` int64, each class's position in priority order.
        bonus: ``(K,)`` int64 in ``{0, 1}``: 1 for the classes whose target has the extra
            sample of an uneven budget (they win ties of totals).
    Returns:
        A new ``(K,)`` int64 ``x``, ``0 <= x <= ub``, ``sum(x) = min(capacity, sum(ub))``:
        the samples given one at a time to the class of the smallest total ``base + x``
        (ties: a bonus class, then where the other ranks hold the most, so that they can
        shed it, then where the rank holds it now, then by priority), in closed form: all
        samples whose total before them is below a level, then the rest at the level.
    """
    if int(ub.sum()) <= capacity:
        return ub.clone()
    bonus = torch.zeros_like(base) if bonus is None else bonus
    # value of a class's next sample, doubled so that bonus classes win ties: 2 * total - bonus
    start = 2 * base - bonus
    active = ub > 0

    def given(level: int) -> torch.Tensor:  # samples whose value is below `level`
        return torch.div(level - start + 1, 2, rounding_mode="floor").clamp(min=0).minimum(ub)

    lo = int(start[active].min())
    hi = int((start + 2 * ub)[active].max()) + 1
    while lo < hi:  # the largest level at which no more than `capacity` samples are given
        mid = (lo + hi + 1) // 2
        if int(given(mid).sum()) <= capacity:
            lo = mid
        else:
            hi = mid - 1
    x = given(lo)
    left = capacity - int(x.sum())
    if left > 0:
        at_level = active & (start + 2 * x == lo) & (x < ub)
        candidates = torch.nonzero(at_level).flatten()
        keep = (current[candidates] > x[candidates]).to(torch.int64)
        order = _tie_order([base[candidates], keep], priority_rank[candidates])
        x[candidates[order[:left]]] += 1
    return x


def proportional_split(targets: torch.Tensor, weights: torch.Tensor,
                       priority_rank: torch.Tensor) -> torch.Tensor:
    """Split each class's target over the ranks in proportion to ``weights``.

    Args:
        targets: ``(K,)`` int64. weights: ``(W, K)`` int64 ``>= 0`` (classes whose weights
            are all zero get nothing). priority_rank: ``(K,)`` int64.
    Returns:
        ``(W, K)`` int64 whose columns add up to the targets: each rank's floor, then one
        more to the ranks with the largest remainders; equal remainders go round robin,
        a cursor carried from class to class in priority order, so that equal weights give
        every rank its share of the budget.
    """
    world = weights.shape[0]
    total = weights.sum(0)
    safe = total.clamp(min=1)
    exact = targets.unsqueeze(0) * weights
    x = exact // safe
    rest = exact - x * safe  # remainders, in units of 1 / total
    short = (targets - x.sum(0)) * (total > 0)
    if short.numel() and int(short.max()) > 0:
        order = torch.argsort(priority_rank)
        cursor = torch.zeros_like(short)
        cursor[order] = (torch.cumsum(short[order], 0) - short[order]) % world
        rotated = (torch.arange(world).unsqueeze(1) - cursor.unsqueeze(0)) % world
        key = rest * world + (world - 1 - rotated)
        ranked = torch.argsort(torch.argsort(-key, dim=0, stable=True), dim=0)
        x += (ranked < short.unsqueeze(0)).to(torch.int64) * (weights > 0)
    return x


def deal(capacities: torch.Tensor, ub: torch.Tensor, weights: torch.Tensor,
         targets: torch.Tensor, priority_rank: torch.Tensor,
         current: Optional[torch.Tensor] = None, max_sweeps: int = MAX_SWEEPS) -> torch.Tensor:
    """Quotas ``(W, K)`` int64 for ranks of ``capacities`` ``(W,)`` (see the module doc).

    Args:
        ub: ``(W, K)`` int64 upper bounds (0: the rank cannot keep the class).
        weights: ``(W, K)`` int64 candidates each rank offered of each class (the
            proportional starting split).
        targets: ``(K,)`` int64 class targets (``M // K`` or one more by priority; 0 or 1
            when classes outnumber the budget).
        priority_rank: ``(K,)`` int64, 0 for the class of highest priority.
        current: ``(W, K)`` int64 quotas now (ties keep them).
    Every row of the result adds up to ``min(cap[w], sum(ub[w]))``. Inputs are read only.
    """
    world, k = ub.shape
    if k == 0:
        return torch.zeros_like(ub)
    ub = ub.minimum(capacities.unsqueeze(1))  # a rank never holds more than its capacity
    x = proportional_split(targets, weights * (ub > 0), priority_rank).minimum(ub)
    prefer = x if current is None else current
    held = ub.sum(0) > 0
    low = int(targets[held].min()) if bool(held.any()) else 0
    bonus = ((targets > low) & held).to(torch.int64)  # the classes with the extra sample
    totals = x.sum(0)
    caps = capacities.tolist()
    for _ in range(max(1, max_sweeps)):
        moved = False
        for w in range(world):
            row = x[w]
            new = water_fill(totals - row, ub[w], caps[w], prefer[w], priority_rank, bonus)
            if not torch.equal(new, row):
                moved = True
                totals += new - row
                x[w] = new
        if not moved:
            break
    _exchange_paths(x, ub, bonus, priority_rank)
    return x


def _exchange_paths(x: torch.Tensor, ub: torch.Tensor, bonus: torch.Tensor,
                    priority_rank: torch.Tensor) -> None:
    """Finish the descent exactly, in place: while a class ``c`` holds at least two
    samples fewer than a class ``d`` it can reach through a chain of exchanges (``c``
    takes a slot of ``a1`` on a rank where ``c`` may grow, ``a1`` takes one of ``a2`` on
    another rank, ..., ending with a slot of ``d``; one fewer when only ``d`` has the bonus
    sample of its target), move one sample along the chain: ``c`` gains one, ``d`` loses
    one, every rank's total and every other class's total stay. (A block-coordinate
    descent in whole samples can stop where no single rank can improve; no such chain is
    left at the lexicographically optimal allocation.)"""
    active = ub.sum(0) > 0
    for _ in range(int(x.sum()) + 1):
        value = torch.where(active, 2 * x.sum(0) - bonus, torch.zeros_like(bonus))
        span = value[active]
        if span.numel() == 0 or int(span.max() - span.min()) <= 2:
            return
        order = torch.argsort(value * (1 << 32) + priority_rank, stable=True)
        for c in order[active[order]].tolist():
            path = _find_path(x, ub, value, c, active)
            if path is not None:
                for w, gain, lose in path:
                    x[w, gain] += 1
                    x[w, lose] -= 1
                break
        else:
            return


def _find_path(x: torch.Tensor, ub: torch.Tensor, value: torch.Tensor, start: int,
               active: torch.Tensor):
    """A shortest chain of exchanges from class ``start`` to a class whose ``value``
    (doubled total less the bonus) is at least 3 above it (breadth first, vectorised by
    layer), as ``[(rank, class gaining, class losing)]``."""
    world, k = x.shape
    can_gain = x < ub  # (W, K)
    can_lose = x > 0
    visited = torch.zeros(k, dtype=torch.bool)
    visited[start] = True
    frontier = visited.clone()
    parent_rank = torch.full((k,), -1, dtype=torch.int64)
    parent_class = torch.full((k,), -1, dtype=torch.int64)
    goal = active & (value >= int(value[start]) + 3)
    while bool(frontier.any()):
        # ranks where some frontier class may grow, and which frontier class (the first)
        grow = can_gain & frontier.unsqueeze(0)  # (W, K)
        ranks = grow.any(1)
        if not bool(ranks.any()):
            return None
        via = torch.argmax(grow.to(torch.int8), dim=1)  # a frontier class per rank
        reach = can_lose & ranks.unsqueeze(1) & ~visited.unsqueeze(0)  # (W, K)
        new = reach.any(0)
        if not bool(new.any()):
            return None
        first_rank = torch.argmax(reach.to(torch.int8), dim=0)
        cols = torch.nonzero(new).flatten()
        parent_rank[cols] = first_rank[cols]
        parent_class[cols] = via[first_rank[cols]]
        visited |= new
        hits = torch.nonzero(new & goal).flatten()
        if hits.numel():
            d = int(hits[torch.argmax(value[hits])])
            path = []
            node = d
            while node != start:
                w, prev = int(parent_rank[node]), int(parent_class[node])
                path.append((w, prev, node))
                node = prev
            return path
        frontier = new
    return None


def shrink_order(stored: torch.Tensor, quota: torch.Tensor, excess_needed: int,
                 labels: torch.Tensor) -> Optional[list]:
    """The classes one rank evicts from, one sample at a time, to free ``excess_needed``
    slots: each time the class furthest above its quota (then the largest, then the
    lowest label). Returns the list of column indexes (one per evicted sample)."""
    s = stored.clone()
    out = []
    for _ in range(excess_needed):
        col = victim(s, quota, labels, require_excess=False)
        if col is None:
            break
        s[col] -= 1
        out.append(col)
    return out


def victim(stored: torch.Tensor, quota: torch.Tensor, labels: torch.Tensor,
           require_excess: bool = True) -> Optional[int]:
    """The column of the class a full rank evicts from: the one furthest above its quota,
    then the largest, then the lowest label; only classes above their quota unless
    ``require_excess`` is False (then any class holding a sample). None if there is none."""
    excess = stored - quota
    held = stored > 0
    if require_excess:
        held &= excess > 0
    if not bool(held.any()):
        return None
    best = excess.masked_fill(~held, -(1 << 62))
    pick = held & (best == best.max())
    if int(pick.sum()) > 1:
        big = stored.masked_fill(~pick, -1)
        pick &= big == big.max()
        if int(pick.sum()) > 1:
            lab = labels.masked_fill(~pick, 1 << 62)
            pick &= lab == lab.min()
    return int(torch.nonzero(pick)[0])
