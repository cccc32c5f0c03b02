"""The replicated per-class state of all shards: who holds how many samples of each class.

Every rank keeps the same :class:`ClassLedger` and updates it with the same
deterministic rule from the same inputs (every rank's candidate keys of the step, which
travel with the step's one collective), so every rank knows every shard's per-class
counts without gathering them, and the quotas an insertion uses already know every class
being inserted at that moment, on every rank.

Per step, for every rank ``w`` and each of its candidates in offer order (class ``c``):

1. the candidate is *seen*: ``n[w, c] += 1``; a class or a rank-class pair seen for the
   first time, or one that receives candidates again after a new experience started,
   triggers a new deal of the quotas (:mod:`~.deal`) before anything is inserted;
2. if rank ``w`` has a free slot, the candidate takes it (``FREE``);
3. else, if ``w`` holds fewer samples of ``c`` than its quota ``q[w, c]``, the candidate
   replaces a sample of the class furthest above its quota on ``w`` (``EVICT``; none
   above quota: step 4);
4. else the count does not change (``RESERVOIR``): rank ``w`` alone decides, with its own
   generator, whether the candidate replaces one of its samples of ``c`` (probability
   ``k / n``, ``k`` samples of ``c`` held, ``n`` candidates of ``c`` seen on ``w``), see
   :class:`~.reservoir.LocalReservoir`.

Steps 2-3 depend only on counts and quotas, so every rank computes every rank's counts;
only *which* sample is evicted or replaced is rank-local. In the steady state (shards full,
every class at its quota) no count changes: the update is a few vectorised operations
over the step's ``O(world * c)`` keys, independent of the number of classes held.

A new experience (the experience index of the agreed step context changes) marks every
(rank, class) pair *dead* until it receives a candidate again: a dead pair may keep at
most what it holds (its class cannot grow there without new candidates), so the room it
would be dealt goes to the classes still offered.

State is CPU int64 tensors of shape ``(world, K)`` (columns in order of first appearance)
plus plain Python lists, owned by the ledger; nothing here touches sample data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .deal import UNBOUNDED, deal, victim
from .seeding import CLASS_PRIORITY, derive_seed

FREE, EVICT, RESERVOIR = 0, 1, 2
_MOD = (1 << 61) - 1


def _mix(rank: int, label: int) -> int:
    data = int(rank).to_bytes(8, "little", signed=True) + int(label).to_bytes(8, "little", signed=True)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") % _MOD


@dataclass
class Decisions:
    """One rank's insertion decisions for one step, in candidate order.

    ``kinds[i]`` is ``FREE``, ``EVICT`` or ``RESERVOIR`` for candidate ``i``;
    ``victims[i]`` the class label an ``EVICT`` candidate evicts (else -1);
    ``reservoir_only``: every kind is ``RESERVOIR`` (the steady state)."""

    kinds: List[int]
    victims: List[int]
    reservoir_only: bool = False


@dataclass(frozen=True)
class CountsSnapshot:
    """Stored samples per rank and class at one moment; never modified afterwards.

    ``labels``: the class labels of the columns (in order of first appearance);
    ``stored``: ``(world, >= K)`` int64, columns past ``len(labels)`` are zero."""

    labels: Tuple[int, ...]
    stored: torch.Tensor

    @property
    def world_size(self) -> int:
        return self.stored.shape[0]

    def class_counts(self, rank: Optional[int] = None) -> Dict[int, int]:
        """``{label: stored}`` over all ranks (or on ``rank``), classes with samples only."""
        k = len(self.labels)
        row = self.stored[:, :k].sum(0) if rank is None else self.stored[rank, :k]
        return {c: n for c, n in zip(self.labels, row.tolist()) if n}

    def per_rank(self) -> List[int]:
        return self.stored.sum(1).tolist()

    @property
    def total(self) -> int:
        return int(self.stored.sum())


class RankRule:
    """Steps 2-4 of the module doc and the eviction of a shrinking budget, written once
    for both ledgers over a few accessors: ``_load(w)``, ``_add_load(w, delta)``,
    ``_stored(w, col)``, ``_quota(w, col)``, ``_victim(w, require_excess)``,
    ``_count(w, col, delta, step)``, ``labels``, ``capacities``, ``world``."""

    def _insert_rank(self, w: int, cols: List[int], step: int) -> Decisions:
        """Rank ``w``'s candidate columns, in order: the kind of each and its victim."""
        kinds, victims = [], []
        cap = self.capacities[w]
        for col in cols:
            kind, evicted = RESERVOIR, -1
            if self._load(w) < cap:
                kind = FREE
                self._count(w, col, +1, step)
                self._add_load(w, 1)
            elif self._stored(w, col) < self._quota(w, col):
                v = self._victim(w, True)
                if v is not None:
                    kind, evicted = EVICT, self.labels[v]
                    self._count(w, v, -1, step)
                    self._count(w, col, +1, step)
            kinds.append(kind)
            victims.append(evicted)
        return Decisions(kinds, victims)

    def _reset_for(self, state: dict) -> None:
        """Empty again, with the columns of a :meth:`state_dict` of the same budget and
        world (raises otherwise); the caller fills the counts."""
        if list(state["capacities"]) != self.capacities or int(state["budget"]) != self.budget:
            raise ValueError("ledger state of another budget or world size")
        self.__init__(self.budget, self.capacities, self.seed)
        for label in state["labels"]:
            self._add_class(int(label))

    def unborn_since(self, labels: Sequence[int], step: int) -> bool:
        """Whether none of ``labels`` had a stored sample before ``step``'s insertion
        (``_born(col)``: the step a class was first stored at, -1 never)."""
        for c in labels:
            col = self.col_of.get(int(c))
            if col is not None and 0 <= self._born(col) < step:
                return False
        return True

    def fit(self) -> Dict[int, Dict[int, int]]:
        """Bring every rank within its capacity: ``{rank: {label: samples to evict}}`` for
        the ranks above it (every rank computes the same), one sample at a time from the
        class furthest above its quota. The counts are updated; the shards must follow."""
        evict: Dict[int, Dict[int, int]] = {}
        for w in range(self.world):
            over = self._load(w) - self.capacities[w]
            if over <= 0:
                continue
            cut: Dict[int, int] = {}
            for _ in range(over):
                col = self._victim(w, False)
                self._count(w, col, -1, -1)
                cut[self.labels[col]] = cut.get(self.labels[col], 0) + 1
            self._add_load(w, -over)
            evict[w] = cut
        return evict


class ClassLedger(RankRule):
    """Every rank's per-class counts and quotas, replicated.

    Args:
        budget: the global budget M. capacities: ``(W,)`` slots of every rank.
        seed: the user's seed (class priorities, the same on every rank).

    Attributes (read only outside this class): ``labels`` (list, column order),
    ``n``/``stored``/``quota`` ``(W, capacity)`` int64 (columns ``>= K`` unused),
    ``load`` ``(W,)`` samples held per rank, ``class_total`` ``(capacity,)``, ``deals``
    (how many deals were made).
    """

    def __init__(self, budget: int, capacities: Sequence[int], seed: int):
        self.budget = int(budget)
        self.capacities = [int(c) for c in capacities]
        self.seed = int(seed)
        self.world = len(self.capacities)
        self.labels: List[int] = []
        self._labels_tuple: Tuple[int, ...] = ()
        self.col_of: Dict[int, int] = {}
        self._sorted = torch.zeros(0, dtype=torch.int64)  # labels ascending
        self._sorted_cols = torch.zeros(0, dtype=torch.int64)
        self.priority = torch.zeros(0, dtype=torch.int64)
        self._alloc(8)
        self.load = torch.zeros(self.world, dtype=torch.int64)
        self._caps = torch.tensor(self.capacities, dtype=torch.int64)
        self.experience = -1
        self.deals = 0
        self.hash = 0
        self._shared = False  # a snapshot references self.stored

    # ------------------------------------------------------------------ storage
    def _alloc(self, width: int) -> None:
        w = self.world
        self.n = torch.zeros((w, width), dtype=torch.int64)
        self.stored = torch.zeros((w, width), dtype=torch.int64)
        self.quota = torch.zeros((w, width), dtype=torch.int64)
        self.live = torch.zeros((w, width), dtype=torch.bool)
        self.class_total = torch.zeros(width, dtype=torch.int64)
        self.target = torch.zeros(width, dtype=torch.int64)
        self.born = torch.full((width,), -1, dtype=torch.int64)
        self.n_dealt = torch.zeros((w, width), dtype=torch.int64)  # n at the last deal

    def _grow(self, width: int) -> None:
        old = (self.n, self.stored, self.quota, self.live, self.class_total, self.born,
               self.target, self.n_dealt)
        k = old[0].shape[1]
        self._alloc(width)
        self.n[:, :k] = old[0]
        self.stored[:, :k] = old[1]
        self.quota[:, :k] = old[2]
        self.live[:, :k] = old[3]
        self.class_total[:k] = old[4]
        self.born[:k] = old[5]
        self.target[:k] = old[6]
        self.n_dealt[:, :k] = old[7]
        self._shared = False

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def _writable(self) -> None:
        if self._shared:
            self.stored = self.stored.clone()
            self._shared = False

    # ------------------------------------------------------------------ classes
    def columns(self, keys: torch.Tensor) -> Tuple[torch.Tensor, bool]:
        """Column of each key ``(n,)`` int64, adding columns for keys never seen; returns
        ``(columns, added)``."""
        if keys.numel() == 0:
            return keys.new_zeros(0), False
        if self._sorted.numel():
            pos = torch.searchsorted(self._sorted, keys).clamp(max=self._sorted.numel() - 1)
            found = self._sorted[pos] == keys
        else:
            pos = torch.zeros_like(keys)
            found = torch.zeros_like(keys, dtype=torch.bool)
        added = False
        if not bool(found.all()):
            for label in torch.unique(keys[~found]).tolist():
                self._add_class(int(label))
            added = True
            pos = torch.searchsorted(self._sorted, keys)
        return self._sorted_cols[pos], added

    def _add_class(self, label: int) -> None:
        k = len(self.labels)
        if k >= self.n.shape[1]:
            self._grow(2 * self.n.shape[1])
        self.labels.append(label)
        self._labels_tuple = tuple(self.labels)
        self.col_of[label] = k
        labels = torch.tensor(self.labels, dtype=torch.int64)
        order = torch.argsort(labels)
        self._sorted, self._sorted_cols = labels[order], order
        self.priority = torch.cat([self.priority, torch.tensor(
            [derive_seed(self.seed, CLASS_PRIORITY, label)], dtype=torch.int64)])

    def targets(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(targets (K,), priority rank (K,))``: ``M // K`` each plus one for the ``M % K``
        classes of highest priority; with ``K > M`` one for the ``M`` highest, else 0."""
        k = self.num_classes
        labels = torch.tensor(self.labels, dtype=torch.int64)
        order = torch.argsort(labels, stable=True)  # ties of priority (never in practice) by label
        order = order[torch.argsort(self.priority[order], stable=True)]
        rank = torch.empty(k, dtype=torch.int64)
        rank[order] = torch.arange(k)
        if k == 0:
            return rank, rank
        if self.budget >= k:
            base, extra = divmod(self.budget, k)
            return base + (rank < extra).to(torch.int64), rank
        return (rank < self.budget).to(torch.int64), rank

    # ------------------------------------------------------------------ the deal
    def redeal(self) -> None:
        """Recompute every rank's quotas (see :mod:`~.deal`)."""
        k = self.num_classes
        if k == 0:
            return
        targets, rank = self.targets()
        self.target[:k] = targets
        n, s, live = self.n[:, :k], self.stored[:, :k], self.live[:, :k]
        ub = torch.where(n > 0, torch.where(live, torch.full_like(s, UNBOUNDED), s), 0)
        if self.budget < k:
            ub = ub.minimum(targets.unsqueeze(0))
        # the starting split: where the samples are for classes that hold their target
        # (or cannot grow), in proportion to the candidates for classes still filling up
        full = s.sum(0, keepdim=True) >= targets.unsqueeze(0)
        weights = torch.where(live & ~full, n, s)
        caps = torch.tensor(self.capacities, dtype=torch.int64)
        self.quota[:, :k] = deal(caps, ub, weights, targets, rank, current=self.quota[:, :k])
        self.n_dealt[:, :k] = n
        self.deals += 1

    # ------------------------------------------------------------------ a step
    def apply(self, keys: torch.Tensor, counts: torch.Tensor, step: int, rank: int,
              experience: int = -1) -> Decisions:
        """Apply one step's candidates of every rank; return ``rank``'s decisions.

        Args:
            keys: ``(W, width)`` int64 CPU; row ``w`` holds rank ``w``'s class keys in
                offer order in its first ``counts[w]`` entries (the same on every rank).
            counts: ``(W,)`` int64.
            step: the step (recorded as the birth step of classes first stored now).
            rank: whose decisions to return. experience: the agreed experience index
                (-1: unknown; a change marks every pair dead, see the module doc).
        """
        if experience >= 0 and experience != self.experience:
            if self.experience >= 0:
                self.live.zero_()  # pairs revive (and the quotas are re-dealt) with candidates
            self.experience = experience
        mine = int(counts[rank])
        if int(counts.sum()) == 0:
            return Decisions([], [], True)
        valid = torch.arange(keys.shape[1]).unsqueeze(0) < counts.unsqueeze(1)
        flat = keys[valid]
        ranks = torch.arange(self.world).unsqueeze(1).expand_as(keys)[valid]
        cols, added = self.columns(flat)
        width = self.n.shape[1]
        pair, pair_count = torch.unique(ranks * width + cols, return_counts=True)
        pw, pc = pair // width, pair % width
        # A deal is due when a class or pair appears or revives, and when a class still
        # below its target would be refused on a rank that has seen twice as many of its
        # candidates as at the last deal (its share there may have been estimated too low).
        n_now = self.n[pw, pc] + pair_count
        structural = added or bool(
            ((self.n[pw, pc] == 0) | ~self.live[pw, pc]
             | ((self.class_total[pc] < self.target[pc])
                & (self.stored[pw, pc] + pair_count > self.quota[pw, pc])
                & (n_now >= 2 * self.n_dealt[pw, pc]))).any())
        self.n[pw, pc] = n_now
        self.live[pw, pc] = True
        if structural:
            self.redeal()
        full = (self.load >= self._caps)[ranks]
        moves = ~full | (self.stored[ranks, cols] < self.quota[ranks, cols])
        out = Decisions([RESERVOIR] * mine, [-1] * mine, True)
        if not bool(moves.any()):
            return out
        self._writable()
        slow = torch.unique(ranks[moves]).tolist()
        per_rank = cols.split(counts.tolist())
        for w in slow:
            decided = self._insert_rank(w, per_rank[w].tolist(), step)
            if w == rank:
                out = decided
        return out

    def apply_local(self, labels: List[int], step: int, experience: int = -1) -> Decisions:
        """:meth:`apply` with one rank: its keys as a list of ints."""
        keys = torch.tensor([labels], dtype=torch.int64).view(1, -1)
        return self.apply(keys, torch.tensor([len(labels)]), step, 0, experience)

    def _load(self, w: int) -> int:
        return int(self.load[w])

    def _add_load(self, w: int, delta: int) -> None:
        self.load[w] += delta

    def _stored(self, w: int, col: int) -> int:
        return int(self.stored[w, col])

    def _quota(self, w: int, col: int) -> int:
        return int(self.quota[w, col])

    def _victim(self, w: int, require_excess: bool) -> Optional[int]:
        k = self.num_classes
        return victim(self.stored[w, :k], self.quota[w, :k],
                      torch.tensor(self.labels, dtype=torch.int64), require_excess=require_excess)

    def _count(self, w: int, col: int, delta: int, step: int) -> None:
        self.stored[w, col] += delta
        self.class_total[col] += delta
        if delta > 0 and int(self.born[col]) < 0:
            self.born[col] = step
        self.hash = (self.hash + delta * _mix(w, self.labels[col])) % _MOD

    # ------------------------------------------------------------------ budget changes
    def resize(self, budget: int, capacities: Sequence[int]) -> Dict[int, Dict[int, int]]:
        """Change the budget; returns what :meth:`fit` returns. Every pair is marked dead,
        so the new room goes to the classes that receive candidates from now on, and the
        classes that do not keep what they hold (as far as the budget allows)."""
        self.budget = int(budget)
        self.capacities = [int(c) for c in capacities]
        self._caps = torch.tensor(self.capacities, dtype=torch.int64)
        self.live.zero_()
        self.redeal()
        return self.fit()

    def fit(self) -> Dict[int, Dict[int, int]]:
        """See :meth:`RankRule.fit`."""
        self._writable()
        return super().fit()

    # ------------------------------------------------------------------ views
    def snapshot(self) -> CountsSnapshot:
        """The stored counts now, frozen (shares memory until the next change)."""
        self._shared = True
        return CountsSnapshot(self._labels_tuple, self.stored)

    def eligible_per_rank(self, excluded: Sequence[int] = ()) -> torch.Tensor:
        """``(W,)`` int64: samples per rank whose class is not in ``excluded``."""
        per_rank = self.load.clone()
        cols = [self.col_of[c] for c in excluded if c in self.col_of]
        if cols:
            per_rank -= self.stored[:, cols].sum(1)
        return per_rank

    def eligible_total(self, excluded: Sequence[int] = ()) -> int:
        """Samples over all ranks whose class is not in ``excluded``."""
        return int(self.eligible_per_rank(excluded).sum())

    def eligible_matrix(self, excluded: Sequence[int] = ()) -> torch.Tensor:
        """``(W, K)`` int64 stored counts with the ``excluded`` classes' columns zeroed (a
        new tensor)."""
        counts = self.stored[:, : self.num_classes].clone()
        cols = [self.col_of[c] for c in excluded if c in self.col_of]
        if cols:
            counts[:, cols] = 0
        return counts

    def _born(self, col: int) -> int:
        return int(self.born[col])

    def class_counts(self, rank: Optional[int] = None) -> Dict[int, int]:
        return self.snapshot().class_counts(rank)

    def quotas(self, rank: int) -> Dict[int, int]:
        """``{label: quota}`` of ``rank`` (classes with a quota)."""
        row = self.quota[rank, : self.num_classes].tolist()
        return {c: q for c, q in zip(self.labels, row) if q}

    def digest(self) -> int:
        """A 61-bit digest of every rank's per-class counts (the same on every rank)."""
        return (self.hash * 31 + self.num_classes) % _MOD or 1

    def check_rank(self, rank: int, counts: Dict[int, int]) -> None:
        """Raise if ``counts`` (a shard's own ``{label: stored}``) differ from the ledger's
        row for ``rank`` (an internal consistency check, used by tests)."""
        mine = {c: n for c, n in self.class_counts(rank).items() if n}
        theirs = {c: n for c, n in counts.items() if n}
        if mine != theirs:
            raise AssertionError(f"rank {rank}: ledger {mine} != shard {theirs}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        k = self.num_classes
        return {"budget": self.budget, "capacities": list(self.capacities),
                "labels": list(self.labels), "n": self.n[:, :k].clone(),
                "stored": self.stored[:, :k].clone(), "quota": self.quota[:, :k].clone(),
                "live": self.live[:, :k].clone(), "born": self.born[:k].clone(),
                "target": self.target[:k].clone(), "n_dealt": self.n_dealt[:, :k].clone(),
                "load": self.load.clone(), "experience": self.experience,
                "deals": self.deals, "hash": self.hash}

    def load_state_dict(self, state: dict) -> None:
        self._reset_for(state)
        k = self.num_classes
        self.n[:, :k] = state["n"]
        self.stored[:, :k] = state["stored"]
        self.quota[:, :k] = state["quota"]
        self.live[:, :k] = state["live"]
        self.born[:k] = state["born"]
        self.target[:k] = state["target"]
        self.n_dealt[:, :k] = state["n_dealt"]
        self.class_total[:k] = state["stored"].sum(0)
        self.load = state["load"].clone()
        self.experience = int(state["experience"])
        self.deals = int(state["deals"])
        self.hash = int(state["hash"])

    @classmethod
    def from_shares(cls, budget: int, capacities: Sequence[int], seed: int,
                    shares: Sequence[Tuple[Dict[int, int], Dict[int, int]]]) -> "ClassLedger":
        """A ledger for shards rebuilt from saved ones (elastic resume): ``shares[w]`` is
        rank ``w``'s ``({label: stored}, {label: seen})``. Every pair starts dead."""
        ledger = cls(budget, capacities, seed)
        labels = sorted({c for stored, seen in shares for c in list(stored) + list(seen)})
        for label in labels:
            ledger._add_class(label)
        for w, (stored, seen) in enumerate(shares):
            for c, v in seen.items():
                ledger.n[w, ledger.col_of[c]] = int(v)
            for c, v in stored.items():
                if v:
                    ledger._count(w, ledger.col_of[c], int(v), 0)
            ledger.load[w] = sum(int(v) for v in stored.values())
        ledger.redeal()
        return ledger
