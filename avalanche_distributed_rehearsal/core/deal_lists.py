""":func:`~.deal.deal` in plain Python lists, for the small deals of a few ranks.

A re-deal happens at every structural step (a class or a rank-class pair appears, a new
experience revives a class), which online continual learning meets at every ``train()``
call. For a few ranks and classes, list operations cost a few dozen microseconds where the
tensor deal's small torch operations cost hundreds. Same arguments (as lists), same
algorithm, same tie-breaks, same result: the suite checks both on random inputs.
:class:`~.small_ledger.SmallLedger` uses this one while ``world * classes`` is at most
:data:`LIST_DEAL_MAX`.
"""

from __future__ import annotations

from typing import List, Optional

from .deal import MAX_SWEEPS

#: Deals of at most this many (rank, class) entries run here, larger ones as tensors.
LIST_DEAL_MAX = 4096

Row = List[int]
Matrix = List[List[int]]


def water_fill(base: Row, ub: Row, capacity: int, current: Row, priority_rank: Row,
               bonus: Row) -> Row:
    """See :func:`~.deal.water_fill` (a new list)."""
    if sum(ub) <= capacity:
        return list(ub)
    k = len(base)
    start = [2 * b - e for b, e in zip(base, bonus)]
    active = [i for i in range(k) if ub[i] > 0]

    def given(level: int) -> Row:
        return [min(max((level - s + 1) // 2, 0), u) for s, u in zip(start, ub)]

    lo = min(start[i] for i in active)
    hi = max(start[i] + 2 * ub[i] for i in active) + 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(given(mid)) <= capacity:
            lo = mid
        else:
            hi = mid - 1
    x = given(lo)
    left = capacity - sum(x)
    if left > 0:
        candidates = [i for i in active if start[i] + 2 * x[i] == lo and x[i] < ub[i]]
        candidates.sort(key=lambda i: (-base[i], -(current[i] > x[i]), priority_rank[i]))
        for i in candidates[:left]:
            x[i] += 1
    return x


def proportional_split(targets: Row, weights: Matrix, priority_rank: Row) -> Matrix:
    """See :func:`~.deal.proportional_split` (a new matrix)."""
    world, k = len(weights), len(targets)
    total = [sum(weights[w][c] for w in range(world)) for c in range(k)]
    x = [[0] * k for _ in range(world)]
    rest = [[0] * k for _ in range(world)]
    for w in range(world):
        for c in range(k):
            safe = max(total[c], 1)
            exact = targets[c] * weights[w][c]
            x[w][c], rest[w][c] = divmod(exact, safe)
    short = [(targets[c] - sum(x[w][c] for w in range(world))) * (total[c] > 0)
             for c in range(k)]
    if k and max(short) > 0:
        cursor = [0] * k
        before = 0
        for c in sorted(range(k), key=priority_rank.__getitem__):
            cursor[c] = before % world
            before += short[c]
        for c in range(k):
            if short[c] <= 0:
                continue
            keys = [rest[w][c] * world + (world - 1 - (w - cursor[c]) % world)
                    for w in range(world)]
            ranked = sorted(range(world), key=lambda w: -keys[w])
            for position, w in enumerate(ranked):
                if position < short[c] and weights[w][c] > 0:
                    x[w][c] += 1
    return x


def deal(capacities: Row, ub: Matrix, weights: Matrix, targets: Row, priority_rank: Row,
         current: Optional[Matrix] = None, max_sweeps: int = MAX_SWEEPS) -> Matrix:
    """See :func:`~.deal.deal`: quotas as a new ``[rank][class]`` matrix."""
    world = len(ub)
    k = len(targets)
    if k == 0:
        return [[] for _ in range(world)]
    ub = [[min(u, capacities[w]) for u in ub[w]] for w in range(world)]
    masked = [[wt if u > 0 else 0 for wt, u in zip(weights[w], ub[w])] for w in range(world)]
    x = [[min(a, u) for a, u in zip(row, ub_row)]
         for row, ub_row in zip(proportional_split(targets, masked, priority_rank), ub)]
    prefer = x if current is None else current
    held = [any(ub[w][c] > 0 for w in range(world)) for c in range(k)]
    low = min((targets[c] for c in range(k) if held[c]), default=0)
    bonus = [int(targets[c] > low and held[c]) for c in range(k)]
    totals = [sum(x[w][c] for w in range(world)) for c in range(k)]
    for _ in range(max(1, max_sweeps)):
        moved = False
        for w in range(world):
            row = x[w]
            new = water_fill([t - r for t, r in zip(totals, row)], ub[w], capacities[w],
                             prefer[w], priority_rank, bonus)
            if new != row:
                moved = True
                totals = [t + a - b for t, a, b in zip(totals, new, row)]
                x[w] = new
        if not moved:
            break
    _exchange_paths(x, ub, bonus, priority_rank)
    return x


def _exchange_paths(x: Matrix, ub: Matrix, bonus: Row, priority_rank: Row) -> None:
    """See :func:`~.deal._exchange_paths` (in place)."""
    world, k = len(x), len(bonus)
    active = [any(ub[w][c] > 0 for w in range(world)) for c in range(k)]
    for _ in range(sum(map(sum, x)) + 1):
        value = [2 * sum(x[w][c] for w in range(world)) - bonus[c] if active[c] else 0
                 for c in range(k)]
        span = [value[c] for c in range(k) if active[c]]
        if not span or max(span) - min(span) <= 2:
            return
        order = sorted((c for c in range(k) if active[c]),
                       key=lambda c: (value[c], priority_rank[c]))
        for c in order:
            path = _find_path(x, ub, value, c, active)
            if path is not None:
                for w, gain, lose in path:
                    x[w][gain] += 1
                    x[w][lose] -= 1
                break
        else:
            return


def _find_path(x: Matrix, ub: Matrix, value: Row, start: int, active: List[bool]):
    """See :func:`~.deal._find_path`."""
    world, k = len(x), len(value)
    visited = [False] * k
    visited[start] = True
    frontier = [start]
    parent_rank = [-1] * k
    parent_class = [-1] * k
    floor = value[start] + 3
    while frontier:
        in_frontier = set(frontier)
        via = [next((c for c in range(k) if c in in_frontier and x[w][c] < ub[w][c]), -1)
               for w in range(world)]
        ranks = [w for w in range(world) if via[w] >= 0]
        if not ranks:
            return None
        new = []
        for c in range(k):
            if visited[c]:
                continue
            w = next((w for w in ranks if x[w][c] > 0), -1)
            if w >= 0:
                new.append(c)
                parent_rank[c], parent_class[c] = w, via[w]
        if not new:
            return None
        for c in new:
            visited[c] = True
        hits = [c for c in new if active[c] and value[c] >= floor]
        if hits:
            node = max(hits, key=lambda c: (value[c], -c))
            path = []
            while node != start:
                w, prev = parent_rank[node], parent_class[node]
                path.append((w, prev, node))
                node = prev
            return path
        frontier = new
    return None
