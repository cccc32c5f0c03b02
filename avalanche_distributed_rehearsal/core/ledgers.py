"""Which ledger keeps a world's counts: lists for a few ranks, tensors for many.

Both implement the same rule and deals (:mod:`~.ledger`) and share one state format, so a
checkpoint written with one loads into the other.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

from .ledger import ClassLedger
from .small_ledger import SMALL_WORLD, SmallLedger


def make_ledger(budget: int, capacities: Sequence[int], seed: int):
    """The ledger for ``len(capacities)`` ranks: :class:`~.small_ledger.SmallLedger` up to
    :data:`~.small_ledger.SMALL_WORLD` ranks, :class:`~.ledger.ClassLedger` above."""
    cls = SmallLedger if len(capacities) <= SMALL_WORLD else ClassLedger
    return cls(budget, capacities, seed)


def ledger_from_shares(budget: int, capacities: Sequence[int], seed: int,
                       shares: Sequence[Tuple[Dict[int, int], Dict[int, int]]]):
    """A ledger (see :func:`make_ledger`) for shards rebuilt from saved ones (elastic
    resume): ``shares[w]`` is rank ``w``'s ``({label: stored}, {label: seen})``. Every pair
    starts dead; call ``fit()`` to bring ranks within their capacities."""
    ledger = make_ledger(budget, capacities, seed)
    ledger.load_state_dict(ClassLedger.from_shares(budget, capacities, seed, shares).state_dict())
    return ledger
