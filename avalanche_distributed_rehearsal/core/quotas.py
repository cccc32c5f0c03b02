"""Global per-class budgets: how many samples of each class the union of shards keeps,
and how many of them each rank stores.

Two steps, both deterministic functions of what every rank knows, so every rank
computes the same answer without exchanging anything beyond the per-step counts:

1. **Class targets** (:meth:`ClassBudget.targets`): the global budget ``M`` is split over
   the ``K`` classes seen so far by any rank. Each class label has a fixed random
   priority (a hash of the seed and the label). With ``M >= K`` every class gets
   ``M // K`` slots and the ``M % K`` classes of highest priority one more; with
   ``M < K`` the ``M`` classes of highest priority get one slot each and the others none.
   Because the priorities are i.i.d. uniform, the kept classes are a uniformly random
   ``M``-subset of the classes seen, and a class's target never grows as classes
   appear (the exactness argument of the reservoir relies on it).

2. **Dealing** (:func:`deal_quotas`): the targets are dealt to the ranks, sticking to
   where the samples already are. Keep pass: a class whose stored samples (summed over
   ranks) fit its target keeps them all where they are; a class above its target is cut
   from its largest holders down (water level), so cuts spread over ranks. Growth pass:
   the slots a class still needs are dealt one at a time, round robin over the ranks
   (a cursor carried from class to class), to ranks that have seen the class and still
   have room. When every rank sees every class (i.i.d. streams), rank ``w`` receives
   exactly its share ``M // N (+1)`` and each class's slots land on consecutive ranks,
   ``T // N`` or ``T // N + 1`` per rank. When ranks see different classes, a class is
   kept only by ranks that saw it, as far as their room allows.

The result, a rank's quota per class, steers its reservoir (see
:class:`~avalanche_distributed_rehearsal.core.reservoir.ClassBalancedReservoir`).
"""

from __future__ import annotations

import bisect
from typing import Dict, Iterable, List, Optional, Sequence

from .seeding import CLASS_PRIORITY, derive_seed


class ClassBudget:
    """Per-class targets of a global budget (step 1 above), for one seed.

    Priorities are cached per label: computing targets over ``K`` classes costs
    ``O(K log K)``.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._priority: Dict[int, int] = {}

    def priority(self, label: int) -> int:
        """The label's fixed priority: smaller is kept first (a 63-bit hash)."""
        p = self._priority.get(label)
        if p is None:
            p = self._priority[label] = derive_seed(self.seed, CLASS_PRIORITY, label)
        return p

    def order(self, labels: Iterable[int]) -> List[int]:
        """``labels`` by priority, highest first (ties, impossible in practice, by label)."""
        return sorted(set(int(c) for c in labels), key=lambda c: (self.priority(c), c))

    def targets(self, labels: Iterable[int], budget: int) -> Dict[int, int]:
        """``{label: slots}`` for the classes ``labels`` sharing ``budget`` slots; the
        values add up to ``min(budget, ...)``: exactly ``budget`` when any class is given."""
        order = self.order(labels)
        k = len(order)
        if k == 0:
            return {}
        if budget >= k:
            base, extra = divmod(budget, k)
            return {c: base + (1 if i < extra else 0) for i, c in enumerate(order)}
        return {c: (1 if i < budget else 0) for i, c in enumerate(order)}


def _water_level(column: Sequence[int], target: int, offset: int) -> List[int]:
    """Cut the holdings ``column`` (per rank) down to ``target`` in total, largest first.

    Returns per-rank kept counts: ``min(column[w], level)`` plus one for some ranks that
    hold more than ``level``, chosen in rank order starting at ``offset`` (so different
    classes leave their odd sample on different ranks).
    """
    lo, hi = 0, max(column)
    while lo < hi:  # the largest level whose capped total fits the target
        mid = (lo + hi + 1) // 2
        if sum(min(v, mid) for v in column) <= target:
            lo = mid
        else:
            hi = mid - 1
    kept = [min(v, lo) for v in column]
    left = target - sum(kept)
    world = len(column)
    for i in range(world):
        if left == 0:
            break
        w = (offset + i) % world
        if column[w] > lo:
            kept[w] += 1
            left -= 1
    return kept


def deal_quotas(targets: Sequence[int], stored: Sequence[Sequence[int]],
                seen: Sequence[Sequence[bool]], capacities: Sequence[int],
                order: Sequence[int]) -> List[List[int]]:
    """Deal per-class targets to ranks (step 2 above); return ``quota[w][c]``.

    Args:
        targets: ``(L,)`` slots per class (column ``c``), summing to at most
            ``sum(capacities)``.
        stored: ``(W, L)`` samples of class ``c`` stored on rank ``w`` now.
        seen: ``(W, L)`` whether rank ``w`` has seen class ``c`` (a holder has).
        capacities: ``(W,)`` slots per rank.
        order: the class columns by priority, highest first (a permutation of ``0..L-1``).

    Every rank's quotas add up to at most its capacity; a class's quotas add up to its
    target unless no rank that saw it has room left. Cost ``O(W * L + sum(targets))``,
    plain Python.
    """
    world, width = len(capacities), len(targets)
    quota = [[0] * width for _ in range(world)]
    load = [0] * world
    need = [0] * width
    position = {c: i for i, c in enumerate(order)}
    for c in range(width):
        column = [stored[w][c] for w in range(world)]
        total, target = sum(column), targets[c]
        if total > target:
            column = _water_level(column, target, position[c])
        else:
            need[c] = target - total
        for w in range(world):
            if column[w]:
                quota[w][c] = column[w]
                load[w] += column[w]
    cursor = 0
    for c in order:
        left = need[c]
        if not left:
            continue
        ranks = [w for w in range(world) if seen[w][c] and load[w] < capacities[w]]
        i = bisect.bisect_left(ranks, cursor)
        while left and ranks:
            i %= len(ranks)
            w = ranks[i]
            quota[w][c] += 1
            load[w] += 1
            left -= 1
            cursor = w + 1
            if load[w] >= capacities[w]:
                ranks.pop(i)
            else:
                i += 1
    return quota


class QuotaPlanner:
    """A rank's per-class quotas, from the latest global table.

    Args:
        budget: the global budget M. capacities: ``(W,)`` slots of every rank.
        rank: this rank. seed: the user's seed (the same on every rank).

    :meth:`set_table` takes the per-class counts every rank reported at the last
    all-gather and deals the targets over it, once: every rank computes the same quotas
    for every rank, so a class is never cut twice nor admitted twice by two ranks acting
    on the same table. A class this rank saw after the table gets no quota until the next
    table (one step later; its candidates meanwhile only take free slots), which keeps
    every rank's decisions consistent with everyone else's. Before any table, every
    other rank is assumed to look like this one (each rank then keeps its round-robin
    share of every class: exact for i.i.d. streams). With one rank the quotas are the
    class targets themselves, updated as soon as a class appears.
    """

    def __init__(self, budget: int, capacities: Sequence[int], rank: int, seed: int):
        self.budget = int(budget)
        self.capacities = [int(c) for c in capacities]
        self.rank = int(rank)
        self.classes = ClassBudget(seed)
        self._labels: List[int] = []
        self._stored: List[List[int]] = []
        self._seen: List[List[bool]] = []
        self._dealt: Optional[Dict[int, int]] = None  # this rank's quotas for the table

    @property
    def world_size(self) -> int:
        return len(self.capacities)

    def resize(self, budget: int, capacities: Sequence[int]) -> None:
        self.budget = int(budget)
        self.capacities = [int(c) for c in capacities]
        if self._labels:
            self._dealt = self._deal(self._labels, self._stored, self._seen)

    def set_table(self, labels: Sequence[int], stored: Sequence[Sequence[int]],
                  seen: Sequence[Sequence[bool]]) -> None:
        """The gathered table: ``labels`` ``(L,)``, ``stored`` and ``seen`` ``(W, L)`` lists."""
        self._labels = [int(c) for c in labels]
        self._stored = [list(map(int, row)) for row in stored]
        self._seen = [list(map(bool, row)) for row in seen]
        self._dealt = self._deal(self._labels, self._stored, self._seen) if self._labels else None

    def clear_table(self) -> None:
        self._labels, self._stored, self._seen, self._dealt = [], [], [], None

    def _deal(self, labels: List[int], stored, seen) -> Dict[int, int]:
        world = self.world_size
        known = [c for j, c in enumerate(labels) if any(seen[w][j] for w in range(world))]
        target_of = self.classes.targets(known, self.budget)
        index = {c: j for j, c in enumerate(labels)}
        order = [index[c] for c in self.classes.order(labels)]
        mine = deal_quotas([target_of.get(c, 0) for c in labels], stored, seen,
                           self.capacities, order)[self.rank]
        return {c: mine[j] for j, c in enumerate(labels)}

    def quotas(self, own_stored: Dict[int, int], own_seen: Iterable[int]) -> Dict[int, int]:
        """``{label: slots}`` for this rank (classes absent get 0)."""
        own_seen = sorted(set(int(c) for c in own_seen))
        if self.world_size == 1:
            return self.classes.targets(own_seen, self.budget)
        if self._dealt is not None:
            return dict(self._dealt)
        # No table yet: every rank as this one.
        row_stored = [own_stored.get(c, 0) for c in own_seen]
        world = self.world_size
        return self._deal(own_seen, [list(row_stored) for _ in range(world)],
                          [[True] * len(own_seen) for _ in range(world)])

    def state_dict(self) -> dict:
        return {"labels": list(self._labels), "stored": [list(r) for r in self._stored],
                "seen": [list(r) for r in self._seen]}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not state or not state.get("labels") or len(state["stored"]) != self.world_size:
            self.clear_table()  # none, or saved on another number of ranks: wait for a table
            return
        self.set_table(state["labels"], state["stored"], state["seen"])
