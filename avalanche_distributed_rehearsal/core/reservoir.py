"""Class-balanced reservoir insertion: which slot, if any, each candidate takes."""

from __future__ import annotations

import random
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from .quotas import ClassBudget

QuotaProvider = Callable[[Dict[int, int], Sequence[int]], Dict[int, int]]


class ClassBalancedReservoir:
    """Slot bookkeeping for one shard of ``capacity`` samples, steered by per-class quotas.

    The policy, for a candidate of class ``y`` (``n_y`` candidates of ``y`` seen so far,
    this one included, ``k_y`` of them stored, quota ``q_y``):

    1. while the shard has free slots, the candidate is stored;
    2. otherwise, if ``k_y < q_y``, a uniformly chosen sample of the class furthest above
       its quota (largest ``k - q``, then largest ``k``, then lowest label) is evicted
       for it;
    3. otherwise it replaces a uniformly chosen stored sample of its own class with
       probability ``k_y / n_y`` (reservoir sampling within the class).

    Quotas come from ``quota_provider(stored counts, seen labels)`` whenever a class is
    seen for the first time, or from :meth:`set_quotas`. Without a provider they are
    the class targets of this shard alone (:class:`~.quotas.ClassBudget`, budget =
    capacity, priorities from ``class_seed``): ``capacity // K`` per class for ``K``
    classes seen, the remainder to the classes of highest priority, and, with more
    classes than slots, one slot for each of the ``capacity`` classes of highest priority.

    Exactness (one shard, no provider): targets never grow as classes appear, and step 2
    never takes a class below its quota, so a class that ever lost a sample never again
    falls under its quota and is never again admitted by step 2. Until it first loses
    one, it keeps every candidate; afterwards only step 3 and uniform evictions touch it.
    Hence at all times the stored samples of each class are a uniformly random subset of
    the class's candidates. (A full shard whose class is under quota always has a class
    over quota to evict from, as quotas add up to at most the capacity.) With a global
    provider (several ranks), quotas may grow again when samples move between ranks;
    retention is then uniform per rank for i.i.d. streams, up to that effect.

    Nothing here touches tensors: the reservoir maps labels to slots, the storage moves
    bytes. State is plain Python (picklable); randomness comes from a private
    ``random.Random`` seeded by ``seed``.
    """

    def __init__(self, capacity: int, seed: int = 0, class_seed: Optional[int] = None,
                 quota_provider: Optional[QuotaProvider] = None):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.rng = random.Random(seed)
        self.seen: Dict[int, int] = {}
        self.slots_by_class: Dict[int, List[int]] = {}
        self.label_of_slot: List[int] = []
        self.quotas: Dict[int, int] = {}
        self.budget = ClassBudget(seed if class_seed is None else class_seed)
        self.quota_provider = quota_provider
        self._over: Set[int] = set()  # classes holding more than their quota

    @property
    def size(self) -> int:
        return len(self.label_of_slot)

    def class_counts(self) -> Dict[int, int]:
        """Stored samples per class label (classes seen with none stored are included)."""
        return {c: len(s) for c, s in self.slots_by_class.items()}

    # ------------------------------------------------------------------ quotas
    def quota(self, label: int) -> int:
        return self.quotas.get(label, 0)

    def set_quotas(self, quotas: Dict[int, int]) -> None:
        """Replace every class's quota (classes absent from ``quotas`` get 0)."""
        self.quotas = {int(c): int(q) for c, q in quotas.items()}
        self._over = {c for c, s in self.slots_by_class.items() if len(s) > self.quota(c)}

    def refresh_quotas(self) -> None:
        """Recompute the quotas from the provider (or this shard's own targets)."""
        if self.quota_provider is not None:
            self.set_quotas(self.quota_provider(self.class_counts(), list(self.seen)))
        else:
            self.set_quotas(self.budget.targets(self.seen, self.capacity))

    def _mark(self, label: int) -> None:
        if len(self.slots_by_class.get(label, ())) > self.quota(label):
            self._over.add(label)
        else:
            self._over.discard(label)

    def _victim(self) -> Optional[int]:
        best, best_key = None, None
        for c in self._over:
            k = len(self.slots_by_class[c])
            key = (k - self.quota(c), k, -c)
            if best_key is None or key > best_key:
                best, best_key = c, key
        return best

    # ------------------------------------------------------------------ insertion
    def _take_slot(self, owner: int, index: int) -> int:
        """Remove and return the ``index``-th slot of class ``owner`` (swap-remove)."""
        slots = self.slots_by_class[owner]
        slot = slots[index]
        slots[index] = slots[-1]
        slots.pop()
        return slot

    def _below(self, n: int) -> int:
        """A uniform integer in ``[0, n)``: ``rng.randrange(n)``'s value, without its
        argument checks (this runs for every candidate)."""
        below = getattr(self.rng, "_randbelow", None)
        return below(n) if below is not None else self.rng.randrange(n)

    def offer(self, label: int) -> int:
        """Offer one candidate of class ``label``; return its slot or -1 if discarded."""
        label = int(label)
        seen = self.seen
        n = seen.get(label, 0) + 1
        seen[label] = n
        own = self.slots_by_class.get(label)
        if own is None:  # a class seen for the first time
            own = self.slots_by_class[label] = []
            self.refresh_quotas()
        if len(self.label_of_slot) < self.capacity:
            slot = len(self.label_of_slot)
            self.label_of_slot.append(label)
            own.append(slot)
            self._mark(label)
            return slot
        if self.capacity == 0:
            return -1
        if len(own) < self.quotas.get(label, 0):
            victim = self._victim()
            if victim is not None:
                slot = self._take_slot(victim, self._below(len(self.slots_by_class[victim])))
                self._mark(victim)
                self.label_of_slot[slot] = label
                own.append(slot)
                self._mark(label)
                return slot
        j = self._below(n)
        if j < len(own):
            return own[j]
        return -1

    def offer_many(self, labels: Sequence[int]) -> Tuple[List[int], List[int]]:
        """Offer candidates in order; return ``(positions, slots)`` of the ones to write.

        When a later candidate of the same call takes the slot of an earlier one, only
        the later is returned, so slots are distinct and writing them in any order gives
        the state the sequential policy describes.
        """
        writer: Dict[int, int] = {}
        for pos, label in enumerate(labels):
            slot = self.offer(int(label))
            if slot >= 0:
                writer[slot] = pos
        items = sorted(writer.items(), key=lambda kv: kv[1])
        return [p for _, p in items], [s for s, _ in items]

    # ------------------------------------------------------------------ capacity
    def shrink(self, capacity: int) -> List[int]:
        """Lower the capacity, evicting class-balanced; return the surviving slots.

        Evicts a uniformly chosen sample of the largest class until ``size <= capacity``
        and renumbers survivors ``0 .. size-1`` in the order of the returned old slots.
        Quotas are not recomputed (call :meth:`refresh_quotas`).
        """
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        removed = set()
        for _ in range(max(self.size - capacity, 0)):
            big = max(sorted(self.slots_by_class), key=lambda c: len(self.slots_by_class[c]))
            slots = self.slots_by_class[big]
            removed.add(self._take_slot(big, self.rng.randrange(len(slots))))
        keep = [s for s in range(self.size) if s not in removed]
        renumber = {old: new for new, old in enumerate(keep)}
        self.label_of_slot = [self.label_of_slot[s] for s in keep]
        self.slots_by_class = {c: [renumber[s] for s in slots]
                               for c, slots in self.slots_by_class.items()}
        self.capacity = capacity
        self._over = {c for c, s in self.slots_by_class.items() if len(s) > self.quota(c)}
        return keep

    def grow(self, capacity: int) -> None:
        if capacity < self.size:
            raise ValueError(f"grow() to {capacity} below the current size {self.size}")
        self.capacity = capacity

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "rng": self.rng.getstate(),
            "seen": dict(self.seen),
            "slots_by_class": {c: list(s) for c, s in self.slots_by_class.items()},
            "label_of_slot": list(self.label_of_slot),
            "quotas": dict(self.quotas),
        }

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.rng.setstate(state["rng"])
        self.seen = {int(c): int(n) for c, n in state["seen"].items()}
        self.slots_by_class = {int(c): [int(s) for s in v]
                               for c, v in state["slots_by_class"].items()}
        self.label_of_slot = [int(c) for c in state["label_of_slot"]]
        if "quotas" in state:
            self.set_quotas(state["quotas"])
        else:
            self.refresh_quotas()
