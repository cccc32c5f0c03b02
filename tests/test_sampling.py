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


@pytest.mark.parametrize("mode", ["uniform", "class_balanced", "local"])
def test_python_and_tensor_routes_are_the_same_and_invert_the_receive_order(mode):
    """A plan's routes for each rank, from Python lists and from tensor operations, are
    equal (random worlds, class-to-rank tables, r, empty shards), and consistent: what
    rank w sends to q is what q receives from w, and ``where`` maps each draw to the
    received record from its owner, in draw order within each source."""
    gen = torch.Generator().manual_seed(len(mode))
    for trial in range(30):
        world = 1 + trial % 6
        classes = 1 + int(torch.randint(0, 6, (1,), generator=gen))
        counts = torch.randint(0, 5, (world, classes), generator=gen)
        counts[:, int(torch.randint(0, classes, (1,), generator=gen))] *= trial % 2
        r = int(torch.randint(0, 9, (1,), generator=gen))
        plan = plan_draws(counts, r, mode, generator(trial, trial))
        routes = [plan.routes(rank, world, python=True) for rank in range(world)]
        for rank, got in enumerate(routes):
            want = plan.routes(rank, world, python=False)
            assert got.send_splits == want.send_splits and got.recv_splits == want.recv_splits
            assert torch.equal(got.local, want.local) and torch.equal(got.where, want.where)
            assert (got.label is None) == (want.label is None) == (mode != "class_balanced")
            if got.label is not None:
                assert torch.equal(got.label, want.label)
            for q in range(world):
                assert got.send_splits[q] == routes[q].recv_splits[rank]
            owners = plan.owner[rank, : plan.num_draws(rank)].tolist()
            arrived = sorted(range(len(owners)), key=owners.__getitem__)  # by source rank
            assert [arrived[k] for k in got.where.tolist()] == list(range(len(owners)))


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


# ---------------------------------------------------------------- class_balanced: the exact law
def exact_label_law(class_sizes, d):
    """Probability of every class-label sequence of ``d`` draws under the documented law:
    each draw picks a class uniformly among those not yet exhausted."""
    law, left = {}, list(class_sizes)

    def walk(seq, p):
        if len(seq) == d:
            law[tuple(seq)] = p
            return
        avail = [c for c, n in enumerate(left) if n > 0]
        for c in avail:
            left[c] -= 1
            walk(seq + [c], p / len(avail))
            left[c] += 1

    walk([], 1.0)
    return law


def exact_draw_law(counts, d):
    """Probability of every sequence of ``d`` draws ``(label, owner, local)``: a class
    uniformly among those not exhausted, then one of its samples not yet drawn, uniformly
    (``local`` = index among the owner's samples of that class)."""
    samples = {c: [(c, w, j) for w in range(counts.shape[0]) for j in range(int(counts[w, c]))]
               for c in range(counts.shape[1])}
    law = {}

    def walk(seq, p):
        if len(seq) == d:
            law[tuple(seq)] = p
            return
        avail = [c for c, s in samples.items() if any(x not in seq for x in s)]
        for c in avail:
            left = [x for x in samples[c] if x not in seq]
            for x in left:
                walk(seq + [x], p / (len(avail) * len(left)))

    walk([], 1.0)
    return law


def chisquare_against(observed: Counter, law: dict):
    """Chi-square p-value of ``observed`` against ``law``; fails on impossible outcomes."""
    assert set(observed) <= set(law), f"outcomes outside the law: {set(observed) - set(law)}"
    assert abs(sum(law.values()) - 1) < 1e-12
    n = sum(observed.values())
    keys = sorted(law)
    expected = [law[k] * n for k in keys]
    assert min(expected) >= 5, "too few plans for a chi-square test"
    return chisquare([observed[k] for k in keys], expected).pvalue


def label_sequences(counts, d, seed, steps):
    seqs = Counter()
    for step in range(steps):
        plan = plan_draws(counts, d, "class_balanced", generator(seed, step))
        assert plan.d == d
        for requester in range(counts.shape[0]):
            mine = draws_of(plan, requester)
            assert len(set(mine)) == d, "without replacement"
            seqs[tuple(plan.label[requester].tolist())] += 1
    return seqs


def test_class_balanced_law_one_and_five_samples_three_draws():
    """Classes of 1 and 5 samples, 3 draws: P(class 0 drawn) = 1 - (1/2)^3 = 0.875."""
    counts = torch.tensor([[1, 2], [0, 3], [0, 0], [0, 0]])  # 4 requesters per plan
    law = exact_label_law([1, 5], 3)
    assert law == {(1, 1, 1): 1 / 8, (0, 1, 1): 1 / 2, (1, 0, 1): 1 / 4, (1, 1, 0): 1 / 8}
    seqs = label_sequences(counts, 3, seed=11, steps=2000)
    with_zero = sum(n for s, n in seqs.items() if 0 in s) / sum(seqs.values())
    assert abs(with_zero - 0.875) < 0.02
    assert chisquare_against(seqs, law) > 1e-3


def test_class_balanced_law_when_several_classes_run_out():
    """Sizes [1, 2, 6], 5 draws: classes 0 and 1 are often exhausted before the end."""
    counts = torch.tensor([[1, 0, 2], [0, 2, 0], [0, 0, 4]] + [[0, 0, 0]] * 5)
    seqs = label_sequences(counts, 5, seed=12, steps=1200)
    assert chisquare_against(seqs, exact_label_law([1, 2, 6], 5)) > 1e-3


def test_class_balanced_law_when_classes_run_out_one_after_another():
    """Sizes [1, 1, 2, 3], 4 draws: classes also run out after the first exhaustion, while
    several others are still available (the sequential part's own bookkeeping)."""
    counts = torch.tensor([[1, 0, 2, 0], [0, 1, 0, 3]] + [[0, 0, 0, 0]] * 6)
    seqs = label_sequences(counts, 4, seed=15, steps=1250)
    assert chisquare_against(seqs, exact_label_law([1, 1, 2, 3], 4)) > 1e-3


def test_class_balanced_law_of_whole_draws_over_uneven_ranks():
    """World 3, classes split unevenly across ranks: the joint law of (class, owner, local)
    sequences, so which stored sample of a class is drawn is checked too."""
    counts = torch.tensor([[1, 0, 2], [0, 2, 1], [0, 0, 1]])
    law = exact_draw_law(counts, 3)
    draws = Counter()
    for step in range(3000):
        plan = plan_draws(counts, 3, "class_balanced", generator(13, step))
        for requester in range(3):
            mine = [(label, owner, local) for owner, local, label in draws_of(plan, requester)]
            draws[tuple(mine)] += 1
    assert chisquare_against(draws, law) > 1e-3


def test_class_balanced_law_when_no_class_can_run_out():
    """Every class holds at least d samples (the vectorised path, one class of exactly d):
    the classes of the draws are i.i.d. uniform."""
    counts = torch.tensor([[3, 0, 5], [0, 4, 0], [0, 0, 0], [0, 0, 0]])
    seqs = label_sequences(counts, 3, seed=14, steps=1500)
    law = exact_label_law([3, 4, 5], 3)
    assert set(law.values()) == {1 / 27}
    assert chisquare_against(seqs, law) > 1e-3


def test_class_balanced_uses_the_generator_as_documented():
    """The contract every rank relies on: one randint (world, d) of i.i.d. picks, kept up to
    each row's first exhaustion, then one float64 rand (m, d) only if m rows go on."""
    from avalanche_distributed_rehearsal.core.sampling import _class_sequence

    sizes = torch.tensor([2, 0, 7, 3])
    classes = torch.tensor([0, 2, 3])
    for seed in range(200):
        gen, ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        label = _class_sequence(sizes, 4, 5, gen)
        iid = classes[torch.randint(3, (5, 4), generator=ref)]
        went_on = 0
        for q in range(5):
            seen = Counter()
            for j in range(4):
                seen[int(iid[q, j])] += 1
                assert int(label[q, j]) == int(iid[q, j])
                if seen[int(iid[q, j])] == int(sizes[iid[q, j]]) and j < 3:
                    went_on += 1
                    break
            assert Counter(label[q].tolist())[0] <= 2 and Counter(label[q].tolist())[3] <= 3
        if went_on:
            torch.rand((went_on, 4), generator=ref, dtype=torch.float64)
        assert torch.equal(gen.get_state(), ref.get_state())
    big = torch.tensor([4, 9, 5])  # no class can run out in 4 draws: the randint only
    gen, ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    label = _class_sequence(big, 4, 6, gen)
    assert torch.equal(label, torch.randint(3, (6, 4), generator=ref))
    assert torch.equal(gen.get_state(), ref.get_state())


def test_every_rank_computes_the_same_plan_from_the_same_seed():
    """Each rank calls plan_draws itself: same counts and seed, the same plan and the same
    generator state afterwards, on tables that take the sequential class path."""
    tables = [torch.tensor([[1, 0, 2], [0, 2, 1], [0, 0, 1]]), torch.tensor([[1, 2, 6]]),
              torch.tensor([[5, 0, 1, 0], [0, 1, 0, 0], [3, 0, 0, 9]])]
    for counts in tables:
        for step in range(20):
            plans, states = [], []
            for _rank in range(counts.shape[0]):
                gen = generator(21, step)
                plans.append(plan_draws(counts, 5, "class_balanced", gen))
                states.append(gen.get_state())
            for plan, state in zip(plans[1:], states[1:]):
                assert torch.equal(plan.owner, plans[0].owner)
                assert torch.equal(plan.local, plans[0].local)
                assert torch.equal(plan.label, plans[0].label)
                assert torch.equal(state, states[0])


def test_class_balanced_draws_are_distinct_and_valid_on_random_tables():
    gen = torch.Generator().manual_seed(9)
    for step in range(300):
        world, labels = int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(1, 6, (1,), generator=gen))
        counts = torch.randint(0, 4, (world, labels), generator=gen)
        r = int(torch.randint(0, 12, (1,), generator=gen))
        plan = plan_draws(counts, r, "class_balanced", generator(5, step))
        assert plan.d == min(r, int(counts.sum()))
        for requester in range(world):
            mine = draws_of(plan, requester)
            assert len(set(mine)) == plan.d
            for owner, local, label in mine:
                assert 0 <= local < int(counts[owner, label])


def test_plans_are_unchanged_where_the_law_was_already_followed():
    """Pinned plans computed before the class_balanced fix: uniform plans, and
    class_balanced plans where no class can run out, are bit-identical."""
    uniform = plan_draws(COUNTS, 4, "uniform", generator(7, 0))
    assert uniform.owner.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]]
    assert uniform.local.tolist() == [[23, 38, 2, 7], [47, 40, 34, 46], [8, 2, 57, 25]]
    balanced = plan_draws(COUNTS, 4, "class_balanced", generator(7, 0))
    assert balanced.owner.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]]
    assert balanced.local.tolist() == [[8, 7, 3, 10], [2, 12, 8, 14], [19, 0, 9, 6]]
    assert balanced.label.tolist() == [[1, 1, 2, 0], [2, 1, 1, 1], [1, 1, 1, 2]]


# ---------------------------------------------------------------- local: each rank its own shard
def check_plan_consistency(plan, world):
    """Padding sits at the end of rows and is never sent nor received; what each rank sends
    is exactly what the others expect from it."""
    assert plan.owner.shape == plan.local.shape == (world, plan.d)
    assert plan.counts_per_rank.shape == (world,) and plan.counts_per_rank.dtype == torch.int64
    assert plan.d == max(plan.counts_per_rank.tolist())
    for q in range(world):
        n = plan.num_draws(q)
        assert (plan.owner[q, :n] >= 0).all() and (plan.local[q, :n] >= 0).all()
        assert (plan.owner[q, n:] == -1).all() and (plan.local[q, n:] == -1).all()
        assert sorted(plan.receive_order(q).tolist()) == list(range(n))
        assert int(plan.receive_splits(q, world).sum()) == n
    for rank in range(world):
        splits, local, _ = plan.sends(rank)
        assert int(splits.sum()) == local.numel() and (local >= 0).all()
        for q in range(world):
            assert int(splits[q]) == int(plan.receive_splits(q, world)[rank])
            n = plan.num_draws(q)
            expected = plan.local[q, :n][plan.owner[q, :n] == rank]
            start = int(splits[:q].sum())
            assert torch.equal(local[start: start + int(splits[q])], expected)


def test_local_plan_draws_only_from_the_own_shard():
    for step in range(50):
        plan = plan_draws(COUNTS, 4, "local", generator(30, step))
        assert plan.label is None and plan.d == 4
        assert plan.counts_per_rank.tolist() == [4, 4, 0]
        check_plan_consistency(plan, 3)
        for q, own in enumerate(COUNTS.sum(dim=1).tolist()):
            n = plan.num_draws(q)
            assert (plan.owner[q, :n] == q).all()
            mine = plan.local[q, :n].tolist()
            assert len(set(mine)) == n and all(0 <= v < own for v in mine)
            assert plan.sends(q)[0].tolist() == [n if w == q else 0 for w in range(3)]
            assert plan.receive_splits(q, 3).tolist() == [n if w == q else 0 for w in range(3)]


def test_local_plan_gives_fewer_draws_to_small_shards_and_none_to_empty_ones():
    counts = torch.tensor([[0, 0], [1, 1], [4, 3], [0, 0]])
    plan = plan_draws(counts, 5, "local", generator(31, 0))
    assert plan.counts_per_rank.tolist() == [0, 2, 5, 0] and plan.d == 5
    assert sorted(plan.local[1, :2].tolist()) == [0, 1]
    check_plan_consistency(plan, 4)
    assert plan.receive_order(0).numel() == 0 and plan.sends(0)[1].numel() == 0
    for r, counts in [(0, torch.tensor([[3], [2]])), (4, torch.zeros((2, 3), dtype=torch.int64)),
                      (4, torch.zeros((2, 0), dtype=torch.int64))]:
        none = plan_draws(counts, r, "local", generator(31, 1))
        assert none.d == 0 and none.owner.shape == (2, 0) and none.counts_per_rank.tolist() == [0, 0]
        check_plan_consistency(none, 2)


def test_local_plan_is_uniform_over_the_own_shard():
    """Ordered pairs on ranks of 5 and 2 samples, and single values on a rank of 60."""
    counts = torch.tensor([[3, 2], [1, 1], [0, 0]])
    pairs = [Counter(), Counter()]
    for step in range(3000):
        plan = plan_draws(counts, 2, "local", generator(32, step))
        for q in range(2):
            pairs[q][tuple(plan.local[q].tolist())] += 1
    assert len(pairs[0]) == 20 and chisquare(list(pairs[0].values())).pvalue > 1e-3
    assert set(pairs[1]) == {(0, 1), (1, 0)} and chisquare(list(pairs[1].values())).pvalue > 1e-3
    values = Counter()
    for step in range(3000):
        plan = plan_draws(COUNTS, 4, "local", generator(33, step))
        values.update(plan.local[0].tolist())
    assert sorted(values) == list(range(60)) and chisquare(list(values.values())).pvalue > 1e-3


def test_local_plan_uses_the_generator_as_documented():
    """One sample_distinct, row q drawing min(r, own total) from rank q's shard: the
    branch taken (Python or vectorised) does not change the plan."""
    gen = torch.Generator().manual_seed(6)
    for step in range(100):
        counts = torch.randint(0, 9, (int(torch.randint(1, 7, (1,), generator=gen)), 3), generator=gen)
        r = int(torch.randint(0, 12, (1,), generator=gen))
        plan = plan_draws(counts, r, "local", generator(34, step))
        own = counts.sum(dim=1)
        for vectorized in (False, True):
            ref = sample_distinct(own, own.clamp(max=r), generator(34, step), vectorized=vectorized)
            assert torch.equal(plan.local, ref)
        check_plan_consistency(plan, counts.shape[0])


def test_uniform_and_class_balanced_plans_have_no_padding():
    for mode in ("uniform", "class_balanced"):
        plan = plan_draws(COUNTS, 5, mode, generator(35, 0))
        assert plan.counts_per_rank.tolist() == [5, 5, 5]
        check_plan_consistency(plan, 3)


@pytest.mark.parametrize("counts, r, mode, name", [
    (torch.tensor([1, 2]), 2, "uniform", "counts"),
    (torch.tensor([[1.0, 2.0]]), 2, "uniform", "counts"),
    (torch.tensor([[1, 2]], dtype=torch.int32), 2, "class_balanced", "counts"),
    (torch.zeros((0, 3), dtype=torch.int64), 2, "uniform", "counts"),
    (torch.tensor([[1, -1]]), 2, "local", "counts"),
    ([[1, 2]], 2, "uniform", "counts"),
    (torch.tensor([[1, 2]]), -1, "class_balanced", "r"),
    (torch.tensor([[1, 2]]), 2.0, "uniform", "r"),
    (torch.tensor([[1, 2]]), True, "local", "r"),
])
def test_plan_draws_rejects_bad_arguments(counts, r, mode, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        plan_draws(counts, r, mode, generator(0))


def test_plan_draws_rejects_a_bad_generator():
    with pytest.raises(ValueError, match="^gen "):
        plan_draws(COUNTS, 2, "uniform", 7)
