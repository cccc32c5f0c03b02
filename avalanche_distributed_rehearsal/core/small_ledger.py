""":class:`~.ledger.ClassLedger` for a few ranks, in plain Python.

The same rule, the same deals and the same state as the tensor ledger, kept in lists:
for the few dozen keys of a step on a handful of ranks, a few list and dictionary
operations per key cost less than the dozens of small tensor operations the tensor
ledger needs whatever the size. :func:`~.ledger.make_ledger` picks it up to
:data:`SMALL_WORLD` ranks; the suite checks both give the same decisions and the same
counts on random streams.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .deal import UNBOUNDED, deal
from .deal_lists import LIST_DEAL_MAX
from .deal_lists import deal as deal_lists
from .ledger import RESERVOIR, ClassLedger, CountsSnapshot, Decisions, RankRule, _MOD, _mix
from .seeding import CLASS_PRIORITY, derive_seed

#: The tensor ledger serves more ranks than this.
SMALL_WORLD = 16


def _frozen(rows: Sequence[Sequence[int]]) -> Tuple[Tuple[int, ...], ...]:
    """A matrix of lists as tuples (the ledger's lists grow in place with each class)."""
    return tuple(map(tuple, rows))


class SmallLedger(RankRule):
    """Every rank's per-class counts and quotas (see :class:`~.ledger.ClassLedger`), as
    lists indexed ``[rank][column]``."""

    def __init__(self, budget: int, capacities: Sequence[int], seed: int):
        self.budget = int(budget)
        self.capacities = [int(c) for c in capacities]
        self.seed = int(seed)
        self.world = w = len(self.capacities)
        self.labels: List[int] = []
        self.col_of: Dict[int, int] = {}
        self.priority_list: List[int] = []
        self.target_list: List[int] = []
        self.born_list: List[int] = []
        self.class_total: List[int] = []
        self.n: List[List[int]] = [[] for _ in range(w)]
        self.stored_lists: List[List[int]] = [[] for _ in range(w)]
        self.quota_lists: List[List[int]] = [[] for _ in range(w)]
        self.live_lists: List[List[bool]] = [[] for _ in range(w)]
        self.n_dealt: List[List[int]] = [[] for _ in range(w)]
        self.loads = [0] * w
        self.experience = -1
        self.deals = 0
        self.hash = 0
        self._snapshot = None
        self._last_deal: Optional[tuple] = None  # (inputs, quotas) of the last list deal

    # ------------------------------------------------------------------ views
    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def load(self) -> torch.Tensor:
        return torch.tensor(self.loads, dtype=torch.int64)

    @property
    def stored(self) -> torch.Tensor:
        return torch.tensor(self.stored_lists, dtype=torch.int64).view(self.world, -1)

    @property
    def quota(self) -> torch.Tensor:
        return torch.tensor(self.quota_lists, dtype=torch.int64).view(self.world, -1)

    def snapshot(self) -> CountsSnapshot:
        """The stored counts now, frozen (one object while nothing changes)."""
        key = (self.hash, self.num_classes)
        if self._snapshot is None or self._snapshot[0] != key:
            self._snapshot = (key, CountsSnapshot(tuple(self.labels), self.stored))
        return self._snapshot[1]

    def eligible_list(self, excluded: Sequence[int] = ()) -> List[int]:
        """Samples per rank whose class is not in ``excluded`` (a list)."""
        cols = [self.col_of[c] for c in excluded if c in self.col_of]
        if not cols:
            return list(self.loads)
        return [load - sum(row[c] for c in cols) for load, row in zip(self.loads, self.stored_lists)]

    def eligible_total(self, excluded: Sequence[int] = ()) -> int:
        return sum(self.eligible_list(excluded))

    def eligible_per_rank(self, excluded: Sequence[int] = ()) -> torch.Tensor:
        return torch.tensor(self.eligible_list(excluded), dtype=torch.int64)

    def eligible_matrix(self, excluded: Sequence[int] = ()) -> torch.Tensor:
        counts = self.stored
        cols = [self.col_of[c] for c in excluded if c in self.col_of]
        if cols:
            counts[:, cols] = 0
        return counts

    def _born(self, col: int) -> int:
        return self.born_list[col]

    def class_counts(self, rank: Optional[int] = None) -> Dict[int, int]:
        if rank is None:
            return {c: n for c, n in zip(self.labels, self.class_total) if n}
        return {c: n for c, n in zip(self.labels, self.stored_lists[rank]) if n}

    def quotas(self, rank: int = 0) -> Dict[int, int]:
        return {c: q for c, q in zip(self.labels, self.quota_lists[rank]) if q}

    def digest(self) -> int:
        return (self.hash * 31 + self.num_classes) % _MOD or 1

    def check_rank(self, rank: int, counts: Dict[int, int]) -> None:
        ClassLedger.check_rank(self, rank, counts)

    # ------------------------------------------------------------------ classes, deals
    def _add_class(self, label: int) -> int:
        col = len(self.labels)
        self.labels.append(label)
        self.col_of[label] = col
        self.priority_list.append(derive_seed(self.seed, CLASS_PRIORITY, label))
        self.target_list.append(0)
        self.born_list.append(-1)
        self.class_total.append(0)
        for rows in (self.n, self.stored_lists, self.quota_lists, self.n_dealt):
            for row in rows:
                row.append(0)
        for row in self.live_lists:
            row.append(False)
        return col

    def targets(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(targets (K,), priority rank (K,))`` int64, as :meth:`ClassLedger.targets`."""
        targets, rank = self._target_lists()
        return torch.tensor(targets, dtype=torch.int64), torch.tensor(rank, dtype=torch.int64)

    def _target_lists(self) -> Tuple[List[int], List[int]]:
        k = self.num_classes
        order = sorted(range(k), key=lambda c: (self.priority_list[c], self.labels[c]))
        rank = [0] * k
        for i, c in enumerate(order):
            rank[c] = i
        if self.budget >= k:
            base, extra = divmod(self.budget, k) if k else (0, 0)
            return [base + (r < extra) for r in rank], rank
        return [int(r < self.budget) for r in rank], rank

    def redeal(self) -> None:
        """Recompute every rank's quotas (the tensor ledger's deal, from these lists)."""
        k, w = self.num_classes, self.world
        if k == 0:
            return
        targets, rank = self._target_lists()
        self.target_list = targets
        ub, weights = [], []
        for n_row, s_row, live_row in zip(self.n, self.stored_lists, self.live_lists):
            ub.append([0 if n == 0 else (UNBOUNDED if live else s)
                       for n, s, live in zip(n_row, s_row, live_row)])
            weights.append([n if live and self.class_total[c] < targets[c] else s_row[c]
                            for c, (n, live) in enumerate(zip(n_row, live_row))])
        if self.budget < k:
            ub = [[min(u, t) for u, t in zip(row, targets)] for row in ub]
        if w * k <= LIST_DEAL_MAX:
            self.quota_lists = self._deal_lists(ub, weights, targets, rank)
        else:
            as_tensor = lambda rows: torch.tensor(rows, dtype=torch.int64).view(w, k)  # noqa: E731
            self.quota_lists = deal(torch.tensor(self.capacities, dtype=torch.int64),
                                    as_tensor(ub), as_tensor(weights),
                                    torch.tensor(targets, dtype=torch.int64),
                                    torch.tensor(rank, dtype=torch.int64),
                                    current=as_tensor(self.quota_lists)).tolist()
        self.n_dealt = [list(row) for row in self.n]
        self.deals += 1

    def _deal_lists(self, ub: List[List[int]], weights: List[List[int]], targets: List[int],
                    rank: List[int]) -> List[List[int]]:
        """The list deal's quotas (new lists), the last result again when its inputs
        repeat: the deal is a function of its inputs, and online continual learning
        re-deals the same inputs at most experiences (each revives its classes)."""
        inputs = (tuple(self.capacities), _frozen(ub), _frozen(weights), tuple(targets),
                  tuple(rank), _frozen(self.quota_lists))
        last = self._last_deal
        if last is not None and last[0] == inputs:
            return [list(row) for row in last[1]]
        quotas = deal_lists(self.capacities, ub, weights, targets, rank,
                            current=self.quota_lists)
        self._last_deal = (inputs, _frozen(quotas))
        return quotas

    # ------------------------------------------------------------------ a step
    def apply(self, keys: torch.Tensor, counts: torch.Tensor, step: int, rank: int,
              experience: int = -1) -> Decisions:
        """See :meth:`ClassLedger.apply`."""
        rows, lengths = keys.tolist(), counts.tolist()
        return self.apply_lists([row[:m] for row, m in zip(rows, lengths)], step, rank,
                                experience)

    def apply_local(self, labels: List[int], step: int, experience: int = -1) -> Decisions:
        """:meth:`apply` with one rank: its keys as a list of ints."""
        return self.apply_lists([labels], step, 0, experience)

    def apply_lists(self, per_rank: List[List[int]], step: int, rank: int,
                    experience: int = -1) -> Decisions:
        """:meth:`apply` with every rank's keys as lists of ints."""
        if experience >= 0 and experience != self.experience:
            if self.experience >= 0:
                self.live_lists = [[False] * self.num_classes for _ in range(self.world)]
            self.experience = experience
        col_of = self.col_of
        structural = False
        cols_of: List[List[int]] = []
        arriving: List[Dict[int, int]] = []
        for w, labels in enumerate(per_rank):
            cols = [col_of.get(label) for label in labels]
            live, n = self.live_lists[w], self.n[w]
            seen: Dict[int, int] = {}
            for i, col in enumerate(cols):
                if col is None:  # classes first seen now: columns in label order, as
                    if labels[i] not in col_of:  # the tensor ledger adds them
                        for label in sorted({x for xs in per_rank for x in xs} - col_of.keys()):
                            self._add_class(label)
                        live, n = self.live_lists[w], self.n[w]
                    col = cols[i] = col_of[labels[i]]
                if not live[col]:
                    structural = True
                    live[col] = True
                n[col] += 1
                seen[col] = seen.get(col, 0) + 1
            cols_of.append(cols)
            arriving.append(seen)
        total, target = self.class_total, self.target_list
        if not structural:  # a class below its target whose quota is too low for its arrivals
            structural = any(
                total[c] < target[c] and self.stored_lists[w][c] + h > self.quota_lists[w][c]
                and self.n[w][c] >= 2 * self.n_dealt[w][c]
                for w, seen in enumerate(arriving) for c, h in seen.items())
        if structural:
            self.redeal()
        mine = Decisions([RESERVOIR] * len(cols_of[rank]), [-1] * len(cols_of[rank]), True)
        for w, cols in enumerate(cols_of):
            if not cols:
                continue
            stored, quota = self.stored_lists[w], self.quota_lists[w]
            if self.loads[w] >= self.capacities[w] and all(stored[c] >= quota[c] for c in arriving[w]):
                continue  # the steady state: no count changes
            decided = self._insert_rank(w, cols, step)
            if w == rank:
                mine = decided
        return mine

    def _load(self, w: int) -> int:
        return self.loads[w]

    def _add_load(self, w: int, delta: int) -> None:
        self.loads[w] += delta

    def _stored(self, w: int, col: int) -> int:
        return self.stored_lists[w][col]

    def _quota(self, w: int, col: int) -> int:
        return self.quota_lists[w][col]

    def _victim(self, w: int, require_excess: bool = True) -> Optional[int]:
        """The column a full rank ``w`` evicts from (see :func:`~.deal.victim`)."""
        best, best_key = None, None
        quota = self.quota_lists[w]
        for col, s in enumerate(self.stored_lists[w]):
            excess = s - quota[col]
            if s <= 0 or (require_excess and excess <= 0):
                continue
            key = (excess, s, -self.labels[col])
            if best_key is None or key > best_key:
                best, best_key = col, key
        return best

    def _count(self, w: int, col: int, delta: int, step: int) -> None:
        self.stored_lists[w][col] += delta
        self.class_total[col] += delta
        if delta > 0 and self.born_list[col] < 0:
            self.born_list[col] = step
        self.hash = (self.hash + delta * _mix(w, self.labels[col])) % _MOD

    # ------------------------------------------------------------------ budget changes
    def resize(self, budget: int, capacities: Sequence[int]) -> Dict[int, Dict[int, int]]:
        self.budget = int(budget)
        self.capacities = [int(c) for c in capacities]
        self.live_lists = [[False] * self.num_classes for _ in range(self.world)]
        self.redeal()
        return self.fit()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The tensor ledger's state format (either ledger loads the other's)."""
        k, w = self.num_classes, self.world

        def mat(rows, dtype=torch.int64):
            return torch.tensor(rows, dtype=dtype).view(w, k)

        return {"budget": self.budget, "capacities": list(self.capacities),
                "labels": list(self.labels), "n": mat(self.n), "stored": mat(self.stored_lists),
                "quota": mat(self.quota_lists), "live": mat(self.live_lists, torch.bool),
                "born": torch.tensor(self.born_list, dtype=torch.int64),
                "target": torch.tensor(self.target_list, dtype=torch.int64),
                "n_dealt": mat(self.n_dealt), "load": torch.tensor(self.loads, dtype=torch.int64),
                "experience": self.experience, "deals": self.deals, "hash": self.hash}

    def load_state_dict(self, state: dict) -> None:
        self._reset_for(state)
        self.n = state["n"].tolist()
        self.stored_lists = state["stored"].tolist()
        self.quota_lists = state["quota"].tolist()
        self.live_lists = state["live"].tolist()
        self.n_dealt = state["n_dealt"].tolist()
        self.born_list = state["born"].tolist()
        self.target_list = state["target"].tolist()
        self.class_total = state["stored"].sum(0).tolist()
        self.loads = state["load"].tolist()
        self.experience = int(state["experience"])
        self.deals = int(state["deals"])
        self.hash = int(state["hash"])
