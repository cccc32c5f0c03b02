"""This rank's slots: which stored sample each candidate replaces, if any.

The per-class *counts* are decided for every rank by the replicated ledger
(:mod:`~.ledger`); this module realises them on the rank's own shard and makes the
choices that do not change any count, with a private generator:

* ``FREE``: the candidate takes the next free slot;
* ``EVICT`` (victim class ``v``): it takes the slot of a uniformly chosen sample of ``v``;
* ``RESERVOIR``: with ``k`` samples of its class ``y`` held and ``n`` candidates of ``y``
  seen here (this one included), it replaces a uniformly chosen one of them with
  probability ``k / n``, else it is dropped (reservoir sampling within the class).

Retention law (per rank and class). While the rank has free slots or the class is below
its quota, every candidate of the class is kept; from its first ``RESERVOIR`` decision
on, each candidate replaces a uniform sample with probability ``k / n`` and evictions
pick uniform samples, so at every moment the stored samples of a class on a rank are a
uniformly random subset of the candidates of that class the rank has seen, provided the
rank's quota for the class does not grow after it first dropped a candidate (quotas only
grow when the structure changes: a budget increase, a new experience re-offering a
class, a rank seeing a class after others; see :mod:`~.deal`).

State is plain Python (picklable): per-class slot lists, each slot's class key, and the
candidates seen per class.
"""

from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple

from .ledger import EVICT, FREE, Decisions


class LocalReservoir:
    """Slot bookkeeping for one shard of ``capacity`` samples (see the module doc)."""

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
        """Stored samples per class key (classes seen with none stored are included)."""
        return {c: len(s) for c, s in self.slots_by_class.items()}

    @property
    def _below(self):
        """``n -> a uniform integer in [0, n)``: ``floor(u * n)`` of a float64 uniform ``u``
        (one C call per draw; its bias is below ``n / 2**53``, as the sampling plans')."""
        rand = self.rng.random
        return lambda n: int(rand() * n)

    def _take_slot(self, owner: int, index: int) -> int:
        """Remove and return the ``index``-th slot of class ``owner`` (swap-remove)."""
        slots = self.slots_by_class[owner]
        slot = slots[index]
        slots[index] = slots[-1]
        slots.pop()
        return slot

    def apply(self, labels: Sequence[int], decisions: Decisions) -> Tuple[List[int], List[int]]:
        """Realise one step's decisions for candidates of class keys ``labels`` (in order).

        Returns ``(positions, slots)``: the candidates to write and where. When a later
        candidate takes the slot of an earlier one of the same call, only the later is
        returned, so slots are distinct and writing them in any order gives the state the
        sequential policy describes.
        """
        writer: Dict[int, int] = {}
        seen, by_class, owner_of = self.seen, self.slots_by_class, self.label_of_slot
        if decisions.reservoir_only:  # the steady state: no count changes, one loop
            rand = self.rng.random
            empty: List[int] = []
            for pos, label in enumerate(labels):
                n = seen[label] = seen.get(label, 0) + 1
                own = by_class.get(label, empty)
                j = int(rand() * n)
                if j < len(own):
                    writer[own[j]] = pos
            if not writer:
                return [], []
            items = sorted(writer.items(), key=lambda kv: kv[1])
            return [p for _, p in items], [s for s, _ in items]
        below = self._below
        for pos, (label, kind, victim) in enumerate(zip(labels, decisions.kinds, decisions.victims)):
            n = seen.get(label, 0) + 1
            seen[label] = n
            own = by_class.get(label)
            if own is None:
                own = by_class[label] = []
            if kind == FREE:
                slot = len(owner_of)
                owner_of.append(label)
            elif kind == EVICT:
                slot = self._take_slot(victim, below(len(by_class[victim])))
                owner_of[slot] = label
            else:
                j = below(n)
                if j >= len(own):
                    continue
                slot = own[j]
                writer[slot] = pos
                continue
            own.append(slot)
            writer[slot] = pos
        items = sorted(writer.items(), key=lambda kv: kv[1])
        return [p for _, p in items], [s for s, _ in items]

    def evict(self, counts: Dict[int, int]) -> List[int]:
        """Evict ``counts[label]`` uniformly chosen samples of each class; return the
        surviving old slots in order (they are renumbered ``0 .. size-1``)."""
        removed = set()
        for label in sorted(counts):
            for _ in range(counts[label]):
                slots = self.slots_by_class[label]
                removed.add(self._take_slot(label, self._below(len(slots))))
        keep = [s for s in range(self.size) if s not in removed]
        renumber = {old: new for new, old in enumerate(keep)}
        self.label_of_slot = [self.label_of_slot[s] for s in keep]
        self.slots_by_class = {c: [renumber[s] for s in slots]
                               for c, slots in self.slots_by_class.items()}
        return keep

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "rng": self.rng.getstate(), "seen": dict(self.seen),
                "slots_by_class": {c: list(s) for c, s in self.slots_by_class.items()},
                "label_of_slot": list(self.label_of_slot)}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.rng.setstate(state["rng"])
        self.seen = {int(c): int(n) for c, n in state["seen"].items()}
        self.slots_by_class = {int(c): [int(s) for s in v]
                               for c, v in state["slots_by_class"].items()}
        self.label_of_slot = [int(c) for c in state["label_of_slot"]]
