"""Per-class targets of the global budget: how many samples of each class the union of
shards keeps.

The global budget ``M`` is split over the ``K`` classes seen so far by any rank. Each class
label has a fixed random priority (a hash of the seed and the label). With ``M >= K`` every
class gets ``M // K`` slots and the ``M % K`` classes of highest priority one more; with
``M < K`` the ``M`` classes of highest priority get one slot each and the others none.
Because the priorities are i.i.d. uniform, the kept classes are a uniformly random
``M``-subset of the classes seen, and a class's target never grows as classes appear.

How the targets are dealt to the ranks (per-rank quotas) is :mod:`~.deal`; the replicated
state that drives it is :mod:`~.ledger`.
"""

from __future__ import annotations

from typing import Dict, Iterable, List

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
