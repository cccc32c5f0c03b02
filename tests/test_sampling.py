"""The global sampling plan is exactly what it claims (chi-square over many steps)."""

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from avalanche_distributed_rehearsal.core import plan_draws, sample_distinct
from avalanche_distributed_rehearsal.core.seeding import generator

# rank 0 holds 60 samples, rank 1 holds 6, rank 2 holds 0: very unequal shards.
COUNTS = torch.tensor([[30, 20, 10], [0, 1, 5], [0, 0, 0]])


def draws_of(plan, requester):
    return list(zip(plan.owner[requester].tolist(), plan.local[requester].tolist(),
                    [None] * plan.d if plan.label is None else plan.label[requester].tolist()))


def test_sample_distinct_rows_are_distinct_and_in_range():
    gen = torch.Generator().manual_seed(0)
    n = torch.tensor([5, 1000, 3, 7])
    d = torch.tensor([5, 8, 2, 0])
    out = sample_distinct(n, d, gen)
    assert out.shape == (4, 8)
    for i in range(4):
        row = out[i, : d[i]].tolist()
        assert len(set(row)) == len(row) and all(0 <= v < n[i] for v in row)
        assert (out[i, d[i]:] == -1).all()
    with pytest.raises(ValueError):
        sample_distinct(torch.tensor([2]), torch.tensor([3]), gen)


def test_sample_distinct_is_uniform_over_ordered_pairs():
    gen = torch.Generator().manual_seed(1)
    pairs = Counter()
    for _ in range(4000):
        row = sample_distinct(torch.tensor([6]), torch.tensor([2]), gen)[0].tolist()
        pairs[tuple(row)] += 1
    assert len(pairs) == 30
    assert chisquare(list(pairs.values())).pvalue > 1e-3


def test_uniform_plan_is_uniform_over_the_union_of_unequal_shards():
    hits = Counter()
    for step in range(3000):
        plan = plan_draws(COUNTS, 4, "uniform", generator(7, step))
        assert plan.d == 4
        for requester in range(3):
            mine = draws_of(plan, requester)
            assert len(set(mine)) == 4, "without replacement"
            hits.update((o, l) for o, l, _ in mine)
    assert set(o for o, _ in hits) == {0, 1}
    assert len(hits) == 66
    for (owner, local) in hits:
        assert local < int(COUNTS[owner].sum())
    assert chisquare(list(hits.values())).pvalue > 1e-3


def test_class_balanced_plan_is_uniform_over_classes_then_samples():
    classes, within = Counter(), {c: Counter() for c in range(3)}
    for step in range(3000):
        plan = plan_draws(COUNTS, 3, "class_balanced", generator(8, step))
        for requester in range(3):
            mine = draws_of(plan, requester)
            assert len(set(mine)) == 3
            for owner, local, label in mine:
                assert local < int(COUNTS[owner, label])
                classes[label] += 1
                within[label][(owner, local)] += 1
    assert chisquare(list(classes.values())).pvalue > 1e-3
    for c in range(3):
        assert len(within[c]) == int(COUNTS[:, c].sum())
        assert chisquare(list(within[c].values())).pvalue > 1e-3


def test_class_balanced_never_draws_a_sample_twice_when_a_class_is_small():
    counts = torch.tensor([[1, 9]])
    for step in range(200):
        plan = plan_draws(counts, 6, "class_balanced", generator(1, step))
        mine = draws_of(plan, 0)
        assert len(set(mine)) == 6
        assert sum(1 for _, _, label in mine if label == 0) <= 1


def test_fewer_draws_only_while_the_buffer_holds_fewer_than_r():
    small = torch.tensor([[1, 1], [0, 1]])
    plan = plan_draws(small, 8, "uniform", generator(0, 0))
    assert plan.d == 3 and sorted(draws_of(plan, 1)) == [(0, 0, None), (0, 1, None), (1, 0, None)]
    empty = plan_draws(torch.zeros((2, 0), dtype=torch.int64), 8, "class_balanced", generator(0, 0))
    assert empty.d == 0


def test_plan_is_identical_for_identical_inputs_and_differs_across_steps():
    a = plan_draws(COUNTS, 5, "class_balanced", generator(3, 10))
    b = plan_draws(COUNTS, 5, "class_balanced", generator(3, 10))
    c = plan_draws(COUNTS, 5, "class_balanced", generator(3, 11))
    assert torch.equal(a.owner, b.owner) and torch.equal(a.local, b.local)
    assert not (torch.equal(a.owner, c.owner) and torch.equal(a.local, c.local))


def test_send_and_receive_splits_agree():
    plan = plan_draws(COUNTS, 6, "uniform", generator(5, 5))
    world = 3
    for rank in range(world):
        splits, local, _ = plan.sends(rank)
        assert int(splits.sum()) == local.numel()
        for q in range(world):
            assert int(splits[q]) == int(plan.receive_splits(q, world)[rank])
        order = plan.receive_order(rank)
        assert sorted(order.tolist()) == list(range(plan.d))


def test_rejects_unknown_mode():
    with pytest.raises(ValueError, match="sampling"):
        plan_draws(COUNTS, 2, "stratified", generator(0))


def test_python_and_vectorised_branches_give_identical_draws(monkeypatch):
    """Small draws take a plain-Python branch; it must be the same sampler, value for value,
    so the statistical tests above (which run the Python branch) cover both."""
    from avalanche_distributed_rehearsal.core import sampling

    gen = torch.Generator().manual_seed(4)
    for _ in range(300):
        rows = int(torch.randint(1, 10, (1,), generator=gen))
        n = torch.randint(0, 40, (rows,), generator=gen)
        d = torch.minimum(n, torch.randint(0, 16, (rows,), generator=gen))
        d[0] = n[0]  # a full-population row always runs short of distinct values
        seed = int(torch.randint(0, 2**31, (1,), generator=gen))
        fast = sample_distinct(n, d, torch.Generator().manual_seed(seed), vectorized=False)
        slow = sample_distinct(n, d, torch.Generator().manual_seed(seed), vectorized=True)
        assert torch.equal(fast, slow)
    for step in range(200):  # whole uniform plans, Python branch against torch branch
        counts = torch.randint(0, 30, (int(torch.randint(1, 6, (1,), generator=gen)), 3),
                               generator=gen)
        fast = plan_draws(counts, 6, "uniform", generator(2, step))
        monkeypatch.setattr(sampling, "PYTHON_BRANCH_MAX", 0)
        slow = plan_draws(counts, 6, "uniform", generator(2, step))
        monkeypatch.undo()
        assert torch.equal(fast.owner, slow.owner) and torch.equal(fast.local, slow.local)
