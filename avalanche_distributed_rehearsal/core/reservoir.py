"""Class-balanced reservoir insertion: which slot, if any, each candidate takes."""

from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple


class ClassBalancedReservoir:
    """Slot bookkeeping for one shard of ``capacity`` samples.

    The policy, for a candidate of class ``y`` (``n_y`` candidates of ``y`` seen so far,
    this one included, ``k_y`` of them stored, ``K`` classes seen, quota
    ``q = max(capacity // K, 1)``):

    1. while the shard has free slots, the candidate is stored;
    2. otherwise, if ``k_y < q`` and some class holds more than ``q`` samples, a uniformly
       chosen sample of the largest class (lowest label on ties) is evicted for it;
    3. otherwise it replaces a uniformly chosen stored sample of its own class with
       probability ``k_y / n_y`` (reservoir sampling within the class).

    Quotas only shrink as classes appear, and step 2 never takes a class below ``q``,
    so a class that ever lost a sample never again falls under its quota. Hence at all
    times the stored samples of each class are a uniformly random subset of the class's
    candidates: every candidate of a class seen so far is retained with equal probability.

    Nothing here touches tensors: the reservoir maps labels to slots, the storage moves
    bytes. State is plain Python (picklable); randomness comes from a private
    ``random.Random`` seeded by ``seed``.
    """

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.rng = random.Random(seed)
        self.seen: Dict[int, int] = {}
        self.slots_by_class: Dict[int, List[int]] = {}
        self.label_of_slot: List[int] = []

    @property
    def size(self) -> int:
        return len(self.label_of_slot)

    def class_counts(self) -> Dict[int, int]:
        """Stored samples per class label (classes with none stored are included)."""
        return {c: len(s) for c, s in self.slots_by_class.items()}

    def _quota(self) -> int:
        return max(self.capacity // max(len(self.seen), 1), 1)

    def _largest_class(self) -> Tuple[int, int]:
        best, best_count = -1, -1
        for c in sorted(self.slots_by_class):
            n = len(self.slots_by_class[c])
            if n > best_count:
                best, best_count = c, n
        return best, best_count

    def _take_slot(self, owner: int, index: int) -> int:
        """Remove and return the ``index``-th slot of class ``owner`` (swap-remove)."""
        slots = self.slots_by_class[owner]
        slot = slots[index]
        slots[index] = slots[-1]
        slots.pop()
        return slot

    def offer(self, label: int) -> int:
        """Offer one candidate of class ``label``; return its slot or -1 if discarded."""
        self.seen[label] = self.seen.get(label, 0) + 1
        own = self.slots_by_class.setdefault(label, [])
        if self.size < self.capacity:
            slot = self.size
            self.label_of_slot.append(label)
            own.append(slot)
            return slot
        if self.capacity == 0:
            return -1
        quota = self._quota()
        if len(own) < quota:
            big, big_count = self._largest_class()
            if big_count > quota:
                slot = self._take_slot(big, self.rng.randrange(big_count))
                self.label_of_slot[slot] = label
                own.append(slot)
                return slot
        j = self.rng.randrange(self.seen[label])
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

    def shrink(self, capacity: int) -> List[int]:
        """Lower the capacity, evicting class-balanced; return the surviving slots.

        Evicts a uniformly chosen sample of the largest class until ``size <= capacity``
        and renumbers survivors ``0 .. size-1`` in the order of the returned old slots.
        """
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        removed = set()
        for _ in range(max(self.size - capacity, 0)):
            big, big_count = self._largest_class()
            removed.add(self._take_slot(big, self.rng.randrange(big_count)))
        keep = [s for s in range(self.size) if s not in removed]
        renumber = {old: new for new, old in enumerate(keep)}
        self.label_of_slot = [self.label_of_slot[s] for s in keep]
        self.slots_by_class = {c: [renumber[s] for s in slots]
                               for c, slots in self.slots_by_class.items()}
        self.capacity = capacity
        return keep

    def grow(self, capacity: int) -> None:
        if capacity < self.size:
            raise ValueError(f"grow() to {capacity} below the current size {self.size}")
        self.capacity = capacity

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "rng": self.rng.getstate(),
            "seen": dict(self.seen),
            "slots_by_class": {c: list(s) for c, s in self.slots_by_class.items()},
            "label_of_slot": list(self.label_of_slot),
        }

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.rng.setstate(state["rng"])
        self.seen = {int(c): int(n) for c, n in state["seen"].items()}
        self.slots_by_class = {int(c): [int(s) for s in v]
                               for c, v in state["slots_by_class"].items()}
        self.label_of_slot = [int(c) for c in state["label_of_slot"]]
