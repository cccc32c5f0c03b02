"""The union of the shards never loses a class: every rank's quotas know every class being
inserted, on every rank, and one deal of the global budget serves all ranks.

Simulated ranks (threads, the real buffer) on both insertion paths: the per-step pipeline
(what ``DistributedReplayPlugin`` drives) and whole-chunk insertion (what ``post_adapt``,
Avalanche's ``ReplayPlugin`` path, does). The reference is the exact max-min fair
allocation of the ranks' capacities, computed by linear programming independently of the
buffer's own deal: a class may use any rank that was offered it during the experience,
and at most what a rank held of it otherwise; a class then holds its fair share, or every
sample it has when that is fewer (room such a class leaves goes to the classes a rank
holds, not necessarily evenly).
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from scipy.stats import chisquare

from avalanche_distributed_rehearsal.core import (RehearsalPipeline, ShardedRehearsalBuffer,
                                                  StepContext, split_budget)
from sim_world import run_threads

pytestmark = pytest.mark.timeout(600)


# --------------------------------------------------------------------------- the reference
def max_min_fair(caps, avail, targets, rounds=None):
    """Fractional lexicographic max-min fair totals of ``T[c] - targets[c]`` over
    allocations ``x[w][c] <= avail[w][c]`` with ``sum_c x[w][c] <= caps[w]``.

    Progressive filling: maximise the common level of the classes not frozen yet, freeze
    those that cannot go above it, repeat. Returns ``{c: fair total}``."""
    world, classes = len(caps), len(targets)
    pairs = [(w, c) for w in range(world) for c in range(classes) if avail[w][c] > 0]
    index = {p: i for i, p in enumerate(pairs)}
    n = len(pairs)
    frozen = {}
    active = [c for c in range(classes) if any(avail[w][c] > 0 for w in range(world))]
    for c in range(classes):
        if c not in active:
            frozen[c] = -targets[c]  # nothing to hold: total 0

    def constraints(level=None, free=()):
        a_ub, b_ub = [], []
        for w in range(world):  # capacities
            row = np.zeros(n + 1)
            for c in range(classes):
                if (w, c) in index:
                    row[index[(w, c)]] = 1
            a_ub.append(row)
            b_ub.append(caps[w])
        for c in active:  # T_c - t_c >= level (free classes) or >= frozen value
            row = np.zeros(n + 1)
            for w in range(world):
                if (w, c) in index:
                    row[index[(w, c)]] = -1
            if c in frozen:
                a_ub.append(row)
                b_ub.append(-(frozen[c] + targets[c]) + 1e-7)
            elif c in free:
                row[n] = 1
                a_ub.append(row)
                b_ub.append(-targets[c])
            else:
                a_ub.append(row)
                b_ub.append(-(level + targets[c]) + 1e-7)
        bounds = [(0, avail[w][c]) for (w, c) in pairs] + [(None, None)]
        return np.array(a_ub), np.array(b_ub), bounds

    while len(frozen) < classes:
        free = [c for c in active if c not in frozen]
        a, b, bounds = constraints(free=free)
        cost = np.zeros(n + 1)
        cost[n] = -1
        level = -linprog(cost, A_ub=a, b_ub=b, bounds=bounds, method="highs").fun
        for c in free:  # which classes cannot rise above the level?
            others = [d for d in free if d != c]
            a, b, bounds = constraints(level=level, free=[c])
            # the other free classes stay at >= level
            cost = np.zeros(n + 1)
            cost[n] = -1
            for d in others:
                row = np.zeros(n + 1)
                for w in range(world):
                    if (w, d) in index:
                        row[index[(w, d)]] = -1
                a = np.vstack([a, row])
                b = np.append(b, -(level + targets[d]) + 1e-7)
            best = -linprog(cost, A_ub=a, b_ub=b, bounds=bounds, method="highs").fun
            if best <= level + 1e-6:
                frozen[c] = level
        if not any(c in frozen for c in free):  # numerical safety: freeze the lowest
            frozen[free[0]] = level
    return {c: frozen[c] + targets[c] for c in range(classes)}


def class_targets(budget, labels, seed):
    from avalanche_distributed_rehearsal.core import ClassBudget

    return ClassBudget(seed).targets(labels, budget)


# --------------------------------------------------------------------------- the streams
def make_case(seed):
    """A random class-incremental stream: world size 1-8, budget above or below the number
    of classes, random class-to-rank assignments and shares, random experience and step
    sizes."""
    rng = random.Random(seed)
    world = rng.randint(1, 8)
    n_exp = rng.randint(2, 4)
    per_exp = [rng.randint(1, 5) for _ in range(n_exp)]
    classes = sum(per_exp)
    if rng.random() < 0.7:
        budget = rng.randint(max(world, classes), 6 * classes + world)
    else:
        budget = rng.randint(world, max(world, classes - 1))
    experiences, label = [], 0
    for k in per_exp:
        labels = list(range(label * 10 + 3, (label + k) * 10 + 3, 10))  # sparse labels
        label += k
        steps = rng.randint(1, 8)
        homes = {c: rng.sample(range(world), rng.randint(1, world)) for c in labels}
        # per step and rank: a list of labels (sizes vary, some ranks offer nothing)
        plan = []
        for _ in range(steps):
            per_rank = []
            for w in range(world):
                mine = [c for c in labels if w in homes[c]]
                size = rng.randint(0, 12) if mine else 0
                per_rank.append([rng.choice(mine) for _ in range(size)])
            plan.append(per_rank)
        experiences.append((labels, plan))
    return {"seed": seed, "world": world, "budget": budget, "experiences": experiences,
            "num_candidates": 12}


def run_case(rank, world, sim, case, path):
    """Run the case on this rank; after every experience, record the shard's per-class
    counts, what the rank was offered, and what the ledger says."""
    buf = ShardedRehearsalBuffer(case["budget"], seed=case["seed"], exchange=sim.exchange(rank))
    pipe = None
    if path == "pipeline":
        pipe = RehearsalPipeline(buf, batch_size_mem=3, num_candidates=case["num_candidates"],
                                 async_mode=bool(case["seed"] % 2))
    next_id = rank * 1_000_000
    offered = Counter()
    snapshots = []
    step = 0
    for e, (labels, plan) in enumerate(case["experiences"]):
        for i, per_rank in enumerate(plan):
            mine = per_rank[rank]
            ctx = StepContext(e, 0, i, len(plan))
            record = None
            if mine:
                x = torch.arange(next_id, next_id + len(mine), dtype=torch.float64).view(-1, 1)
                next_id += len(mine)
                record = {"input": x, "label": torch.tensor(mine)}
                offered.update(mine)
            if pipe is not None:
                pipe.take("cpu", ctx, steps_left=len(plan) - i - 1)
                pipe.offer(record, ctx)  # c = the whole batch: every row is a candidate
            else:
                buf.insert_record(record, context=ctx)
            step += 1
        if pipe is not None:
            pipe.drain()
        buf.ledger.check_rank(rank, buf.class_counts())
        snapshots.append({"counts": dict(buf.class_counts()), "offered": dict(offered),
                          "global": buf.global_counts(), "capacity": buf.local_capacity})
    if pipe is not None:
        pipe.close()
    return snapshots


def check_case(case, results):
    world, budget, seed = case["world"], case["budget"], case["seed"]
    caps = [split_budget(budget, world, w) for w in range(world)]
    seen = []
    held = [Counter() for _ in range(world)]  # samples each rank holds at the experience start
    for e, (labels, plan) in enumerate(case["experiences"]):
        offered_labels = {c for per_rank in plan for mine in per_rank for c in mine}
        seen += [c for c in labels if c in offered_labels]  # the classes some rank saw
        counts = [Counter(results[w][e]["counts"]) for w in range(world)]
        union = Counter()
        for c in counts:
            union.update(c)
        assert results[0][e]["global"] == {c: n for c, n in union.items() if n}, "ledger == shards"
        # where each class can be: any rank that was offered it during the experience (as
        # much as the rank's capacity allows), else at most what a rank held at its start
        offered_now = [Counter() for _ in range(world)]
        for per_rank in plan:
            for w in range(world):
                offered_now[w].update(per_rank[w])
        avail = [[caps[w] if offered_now[w][c] else held[w][c] for c in seen]
                 for w in range(world)]
        t = class_targets(budget, seen, seed)
        targets = [t[c] for c in seen]
        fair = max_min_fair(caps, avail, targets)
        # a class cannot hold more samples than exist
        possible = [sum(held[w][c] + offered_now[w][c] for w in range(world)) for c in seen]
        balanced = all(fair[i] >= targets[i] - 1e-6 for i in range(len(seen)))
        rich = all(possible[i] >= targets[i] + world for i in range(len(seen)))
        for j, c in enumerate(seen):
            total = union[c]
            if balanced and rich:  # the capacities and the samples allow M / K for every class
                assert abs(total - targets[j]) <= world, (seed, e, c, total, targets[j], dict(union))
            assert total >= min(fair[j], possible[j]) - world, (
                seed, e, c, total, fair[j], dict(union))
            if budget >= len(seen) and fair[j] >= 1:
                assert total >= 1, (seed, e, c, "a class that reached the buffer is in it")
        # no slot left empty while the rank could hold more of a class: a rank that is not
        # full kept every candidate it was offered (and never evicted)
        for w in range(world):
            stored = sum(counts[w].values())
            assert stored <= caps[w]
            if stored < caps[w]:
                total_offered = Counter(results[w][e]["offered"])
                assert all(counts[w][c] == total_offered[c] for c in total_offered), (seed, e, w)
        held = counts


@pytest.mark.parametrize("path", ["pipeline", "chunks"])
def test_randomized_streams_keep_every_class_balanced_or_max_min_fair(path):
    for seed in range(24):
        case = make_case(seed)
        results = run_threads(run_case, case["world"], case, path, timeout=120)
        check_case(case, results)


# --------------------------------------------------------------------------- retention
def retention_run(rank, world, sim, seed, steps, per_step, mem):
    """One experience of classes 0 and 1; returns {(step, label): (offered, kept)}."""
    buf = ShardedRehearsalBuffer(mem, seed=seed, exchange=sim.exchange(rank))
    pipe = RehearsalPipeline(buf, batch_size_mem=2, num_candidates=per_step, async_mode=False)
    rng = random.Random(seed * 100 + rank)
    arrival = {}
    for i in range(steps):
        labels = [rng.randrange(2) for _ in range(per_step)]
        ids = [(rank * 10_000 + i * per_step + j) for j in range(per_step)]
        for sid, y in zip(ids, labels):
            arrival[sid] = (i, y)
        ctx = StepContext(0, 0, i, steps)
        pipe.take("cpu", ctx, steps_left=steps - i - 1)
        pipe.offer({"input": torch.tensor(ids, dtype=torch.float64).view(-1, 1),
                    "label": torch.tensor(labels)}, ctx)
    pipe.close()
    kept = set(buf.local_tensors()["input"].flatten().long().tolist())
    out = {}
    for sid, key in arrival.items():
        offered, k = out.get(key, (0, 0))
        out[key] = (offered + 1, k + (sid in kept))
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_retention_is_uniform_over_arrival_steps_within_a_class(world):
    steps, per_step, mem = 8, 16, 20 * world
    totals = Counter()
    offered = Counter()
    for seed in range(40):
        for per_rank in run_threads(retention_run, world, seed, steps, per_step, mem):
            for key, (o, k) in per_rank.items():
                offered[key] += o
                totals[key] += k
    for y in (0, 1):
        kept = [totals[(i, y)] for i in range(steps)]
        expected_rate = sum(kept) / sum(offered[(i, y)] for i in range(steps))
        expected = [offered[(i, y)] * expected_rate for i in range(steps)]
        assert kept[0] > 0, "the first step of an experience is not dropped"
        assert chisquare(kept, expected).pvalue > 1e-3, (y, kept, expected)


def rare_class(rank, world, sim, seed):
    buf = ShardedRehearsalBuffer(40, seed=seed, exchange=sim.exchange(rank))
    pipe = RehearsalPipeline(buf, batch_size_mem=2, num_candidates=8, async_mode=False)
    for i in range(6):
        labels = [i % 2] * 8
        if rank == 1 and i == 3:
            labels[:2] = [9, 9]  # a rare class: two candidates, one step, one rank
        ctx = StepContext(0, 0, i, 6)
        pipe.take("cpu", ctx, steps_left=5 - i)
        pipe.offer({"input": torch.randn(8, 2), "label": torch.tensor(labels)}, ctx)
    pipe.close()
    return buf.global_counts()


def test_a_rare_class_offered_in_one_step_on_one_rank_is_stored():
    for seed in range(20):
        counts = run_threads(rare_class, 2, seed)[0]
        assert counts.get(9, 0) >= 1, (seed, counts)


# --------------------------------------------------------------------------- skewed ranks
def skewed(rank, world, sim, seed):
    """Skew 1: rank 0 sees classes 3e and 3e+2, rank 1 sees 3e+1; M = 100."""
    buf = ShardedRehearsalBuffer(100, seed=seed, exchange=sim.exchange(rank))
    pipe = RehearsalPipeline(buf, batch_size_mem=8, num_candidates=16, async_mode=True)
    rng = random.Random(seed + rank)
    out = []
    for e in range(2):
        mine = [3 * e, 3 * e + 2] if rank == 0 else [3 * e + 1]
        for i in range(25):
            ctx = StepContext(e, 0, i, 25)
            pipe.take("cpu", ctx, steps_left=24 - i)
            labels = [rng.choice(mine) for _ in range(16)]
            pipe.offer({"input": torch.randn(16, 2), "label": torch.tensor(labels)}, ctx)
        pipe.drain()
        out.append((buf.global_counts(), buf.ledger.quotas(rank), buf.local_capacity))
    pipe.close()
    return out


def test_ranks_that_see_different_classes_lose_no_class():
    results = run_threads(skewed, 2, 0)
    union, _, _ = results[0][1]
    assert set(union) == set(range(6)), union
    for rank, per_rank in enumerate(results):
        _, quotas, capacity = per_rank[1]
        assert sum(quotas.values()) == capacity, (rank, quotas)
    # rank 0 holds four classes in 50 slots, rank 1 two: max-min fair is 12-13 and 25
    assert all(12 <= union[c] <= 13 for c in (0, 2, 3, 5)) and all(union[c] == 25 for c in (1, 4))


def skew_retention(rank, world, sim, seed, skew):
    """Two classes; class j's home is rank j; shares (1 - s) / 2 + s for the home."""
    buf = ShardedRehearsalBuffer(200, seed=seed, exchange=sim.exchange(rank))
    pipe = RehearsalPipeline(buf, batch_size_mem=4, num_candidates=20, async_mode=False)
    rng = random.Random(seed * 7 + rank)
    home = (1 - skew) / 2 + skew
    offered = Counter()
    for i in range(40):
        labels = [rank if rng.random() < home else 1 - rank for _ in range(20)]
        offered.update(labels)
        ctx = StepContext(0, 0, i, 40)
        pipe.take("cpu", ctx, steps_left=39 - i)
        pipe.offer({"input": torch.randn(20, 2), "label": torch.tensor(labels)}, ctx)
    pipe.close()
    return offered, buf.class_counts()


def test_retention_within_a_class_does_not_depend_on_the_rank_under_a_skewed_split():
    home_rate, away_rate = [], []
    for seed in range(10):
        results = run_threads(skew_retention, 2, seed, 0.8)
        for rank, (offered, kept) in enumerate(results):
            home_rate.append(kept.get(rank, 0) / offered[rank])
            away_rate.append(kept.get(1 - rank, 0) / offered[1 - rank])
    ratio = np.mean(away_rate) / np.mean(home_rate)
    assert 0.8 <= ratio <= 1.25, (ratio, np.mean(away_rate), np.mean(home_rate))


def plain_reservoir(rank, world, sim, seed):
    buf = ShardedRehearsalBuffer(5, seed=seed, exchange=sim.exchange(rank))
    ids = []
    for i in range(16):
        x = torch.arange(rank * 1000 + 10 * i, rank * 1000 + 10 * i + 10, dtype=torch.float64)
        ids += x.long().tolist()
        buf.insert_record({"input": x.view(-1, 1), "label": torch.rand(10)})
    return ids, buf.local_tensors()["input"].flatten().long().tolist(), buf.local_capacity


def test_plain_reservoir_keeps_each_rank_a_uniform_sample_of_its_capacity():
    """The law of targets that are not class labels: rank w keeps a uniform sample of
    cap_w of its own candidates (cap_w / n_w each): 3 of 160 and 2 of 160 for M = 5."""
    hits = [Counter(), Counter()]
    for seed in range(300):
        for rank, (ids, kept, capacity) in enumerate(run_threads(plain_reservoir, 2, seed)):
            assert len(kept) == capacity == split_budget(5, 2, rank)
            hits[rank].update(kept)
    for rank, counts in enumerate(hits):
        ids = range(rank * 1000, rank * 1000 + 160)
        observed = [counts[i] for i in ids]
        assert abs(sum(observed) / (300 * 160) - split_budget(5, 2, rank) / 160) < 1e-9
        assert chisquare(observed).pvalue > 1e-3


# --------------------------------------------------------------------------- budget changes
def grow(rank, world, sim):
    buf = ShardedRehearsalBuffer(100, seed=1, exchange=sim.exchange(rank))
    rng = random.Random(rank)
    for e, classes in enumerate(([0, 1, 2, 3], [4, 5])):
        if e == 1:
            buf.resize(200)
        for i in range(30):
            labels = [rng.choice(classes) for _ in range(16)]
            buf.insert_record({"input": torch.randn(16, 2), "label": torch.tensor(labels)},
                              context=StepContext(experience=e))
    return buf.global_counts()


def test_growing_the_budget_gives_the_new_room_to_the_classes_still_offered():
    union = run_threads(grow, 2)[0]
    assert [union[c] for c in range(4)] == [25, 25, 25, 25], union  # they cannot grow
    assert union[4] + union[5] == 100 and abs(union[4] - union[5]) <= 2, union


def test_class_balanced_sampling_refuses_targets_that_are_not_class_labels():
    buf = ShardedRehearsalBuffer(10, sampling="class_balanced")
    with pytest.raises(ValueError, match="sampling='class_balanced'.*integer class labels"):
        buf.insert(torch.randn(4, 2), torch.randn(4))
    assert len(buf) == 0 and buf.layout is None
    with pytest.raises(ValueError, match="insertion='class_balanced'"):
        ShardedRehearsalBuffer(10, insertion="class_balanced").insert(torch.randn(4, 2), torch.rand(4))
