"""Insertion policy: fill, class quotas, and equal retention within a class (statistical)."""

import random

import pytest
from scipy.stats import chisquare

from avalanche_distributed_rehearsal.core import ClassBalancedReservoir


def stream(order):
    """[(sample_id, label)] for a label sequence."""
    return list(enumerate(order))


def run_reservoir(capacity, labels, seed):
    res = ClassBalancedReservoir(capacity, seed=seed)
    holder = {}
    for sid, label in stream(labels):
        slot = res.offer(label)
        if slot >= 0:
            holder[slot] = sid
    return res, holder


def test_fills_to_min_capacity_seen_and_never_exceeds():
    res, holder = run_reservoir(50, [i % 3 for i in range(30)], seed=0)
    assert res.size == 30 == len(holder)
    res, holder = run_reservoir(50, [i % 3 for i in range(500)], seed=0)
    assert res.size == 50 == len(set(holder.values()))


def test_quotas_adapt_as_classes_appear():
    labels = [0] * 100 + [1] * 100 + [2] * 100 + [3] * 100
    res, _ = run_reservoir(40, labels, seed=1)
    assert res.class_counts() == {0: 10, 1: 10, 2: 10, 3: 10}
    res, _ = run_reservoir(40, labels[:200], seed=1)
    assert res.class_counts() == {0: 20, 1: 20}


def test_more_classes_than_slots_keeps_every_class_it_can():
    labels = [c for c in range(10) for _ in range(5)]
    res, _ = run_reservoir(4, labels, seed=2)
    assert res.size == 4 and all(n <= 1 or c == 0 for c, n in res.class_counts().items())


def test_bookkeeping_is_consistent():
    rng = random.Random(3)
    res = ClassBalancedReservoir(25, seed=3)
    for _ in range(2000):
        res.offer(rng.randrange(7))
        slots = [s for v in res.slots_by_class.values() for s in v]
        assert sorted(slots) == list(range(res.size))
        for c, v in res.slots_by_class.items():
            assert all(res.label_of_slot[s] == c for s in v)


def retention_counts(policy, capacity, labels, seeds):
    counts = [0] * len(labels)
    for seed in range(seeds):
        _, holder = policy(capacity, labels, seed)
        for sid in holder.values():
            counts[sid] += 1
    return counts


def random_replacement(capacity, labels, seed):
    """The reference C++ policy: a full buffer replaces a random slot. Biased to recent data."""
    rng = random.Random(seed)
    holder = {}
    for sid, _ in stream(labels):
        if len(holder) < capacity:
            holder[len(holder)] = sid
        else:
            holder[rng.randrange(capacity)] = sid
    return None, holder


LABELS = [0] * 40 + [1, 0] * 30 + [2] * 20 + [0, 1, 2] * 10


def test_every_sample_of_a_class_is_retained_with_equal_probability():
    counts = retention_counts(run_reservoir, 12, LABELS, seeds=3000)
    for c in (0, 1, 2):
        observed = [counts[i] for i, y in enumerate(LABELS) if y == c]
        assert chisquare(observed).pvalue > 1e-3, (c, observed)


def test_the_statistical_test_detects_a_biased_policy():
    counts = retention_counts(random_replacement, 12, LABELS, seeds=3000)
    observed = [counts[i] for i, y in enumerate(LABELS) if y == 0]
    assert chisquare(observed).pvalue < 1e-6


def test_offer_many_returns_distinct_slots_and_last_writer_wins():
    res = ClassBalancedReservoir(2, seed=0)
    positions, slots = res.offer_many([0, 0, 0, 0, 0, 0])
    assert len(set(slots)) == len(slots)
    for p, s in zip(positions, slots):
        later = positions[positions.index(p) + 1:]
        assert all(slots[positions.index(q)] != s for q in later)


def test_shrink_is_class_balanced_and_renumbers():
    res, _ = run_reservoir(30, [0] * 50 + [1] * 5, seed=0)
    keep = res.shrink(10)
    assert len(keep) == 10 == res.size
    assert res.class_counts() == {0: 5, 1: 5}
    assert sorted(s for v in res.slots_by_class.values() for s in v) == list(range(10))
    with pytest.raises(ValueError):
        res.grow(5)
