"""Elastic resume: a rank's share of the union of shards saved by any number of ranks."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

Entry = Tuple[int, int, int]  # (class key, saved rank, saved slot)


def union_shares(states: Sequence[dict], world_size: int
                 ) -> List[Tuple[List[Entry], Dict[int, int]]]:
    """Every new rank's records of the union of the saved shard ``states`` and its "seen"
    counters: ``[(entries, {label: seen}) for each rank]``.

    Records are sorted by (class key, saved rank, saved slot) and dealt round-robin over
    the new ranks, so classes stay balanced across shards and no record is lost or
    duplicated. Each class's "seen" counter (candidates offered so far, over all saved
    ranks) is split in proportion to the records of the class a rank gets (a rank with
    none of them gets an equal share), and every class any saved rank had seen is seen on
    every rank, so it keeps its place in the global per-class budgets. Every rank
    computes every rank's share (the replicated ledger needs them all).
    """
    entries: List[Entry] = []
    seen_total: Dict[int, int] = {}
    for r, state in enumerate(states):
        for slot, key in enumerate(state["reservoir"]["label_of_slot"]):
            entries.append((int(key), r, slot))
        for c, n in state["reservoir"]["seen"].items():
            seen_total[int(c)] = seen_total.get(int(c), 0) + int(n)
    entries.sort()
    stored_total: Dict[int, int] = {}
    for key, _, _ in entries:
        stored_total[key] = stored_total.get(key, 0) + 1
    out = []
    for rank in range(world_size):
        mine = entries[rank::world_size]
        have: Dict[int, int] = {}
        for key, _, _ in mine:
            have[key] = have.get(key, 0) + 1
        seen = {}
        for c, total in seen_total.items():
            n = have.get(c, 0)
            share = (total * n // stored_total[c]) if stored_total.get(c) else total // world_size
            seen[c] = max(n, share)
        out.append((mine, seen))
    return out


def union_share(states: Sequence[dict], rank: int, world_size: int
                ) -> Tuple[List[Entry], Dict[int, int]]:
    """Rank ``rank``'s part of :func:`union_shares`."""
    return union_shares(states, world_size)[rank]
