"""Faults never hang; bad input is rejected clearly and leaves the buffer unchanged."""

import os
import random
import time

import pytest
import torch

from dist_harness import run_ranks
from avalanche_distributed_rehearsal.core import (RehearsalPipeline, ShardedRehearsalBuffer,
                                                  split_budget)


def survivor_or_victim(rank, world, timeout):
    buf = ShardedRehearsalBuffer(40, seed=0, timeout=timeout)
    pipe = RehearsalPipeline(buf, 4, 4, async_mode=True, timeout=timeout)
    start = None
    try:
        for step in range(200):
            if rank == 1 and step == 5:
                os._exit(17)  # killed mid-training
            if step == 5:
                start = time.monotonic()
            pipe.augment(torch.randn(8, 3), torch.randint(0, 3, (8,)))
    except Exception as exc:  # noqa: BLE001 - the point is that it raises
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - start}
    return {"error": None}


@pytest.mark.timeout(120)
def test_a_killed_rank_makes_the_others_fail_within_the_timeout():
    results = run_ranks(survivor_or_victim, 2, 10.0, may_die=(1,), timeout=90)
    assert results[1] is None
    assert results[0]["error"] is not None, "the survivor must not carry on silently"
    assert results[0]["seconds"] < 10.0 + 15.0


def buffer_with_data():
    buf = ShardedRehearsalBuffer(20, seed=1)
    buf.insert(torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]))
    return buf


def assert_unchanged(buf, before):
    after = buf.state_dict()
    assert torch.equal(after["rows"], before["rows"]) and after["reservoir"] == before["reservoir"]


@pytest.mark.parametrize("args, error, match", [
    (([1, 2, 3], torch.tensor([0])), TypeError, "'input' must be a torch.Tensor"),
    ((torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), ValueError, "non-empty"),
    ((torch.randn(2, 3), torch.tensor([0.0, 1.0])), ValueError, "'label' must be integer"),
    ((torch.randn(2, 3), torch.tensor([0, -1])), ValueError, "non-negative"),
    ((torch.randn(2, 3), torch.tensor([0, 1, 2])), ValueError, "'label' has 3 rows, another field 2"),
    ((torch.randn(2, 3), [0, 1]), TypeError, "'label' must be a torch.Tensor"),
    ((torch.randn(2, 4), torch.tensor([0, 1])), ValueError, r"per-sample shape \(3,\)"),
    ((torch.randn(2, 3).int(), torch.tensor([0, 1])), ValueError, "'input' must be floating point"),
    ((torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([0, -3])), ValueError, "task_labels"),
    ((torch.tensor([[0.0, float("nan"), 1.0], [1.0, 2.0, 3.0]]), torch.tensor([0, 1])),
     ValueError, "NaN or Inf"),
    ((torch.tensor([[0.0, float("inf"), 1.0]]), torch.tensor([0])), ValueError, "NaN or Inf"),
])
def test_bad_batches_are_rejected_and_change_nothing(args, error, match):
    buf = buffer_with_data()
    before = buf.state_dict()
    with pytest.raises(error, match=match):
        buf.insert(*args)
    assert_unchanged(buf, before)
    pipe = RehearsalPipeline(buf, 2, 2, async_mode=False)
    with pytest.raises(error, match=match):
        pipe.augment(*args)
        pipe.drain()
    assert_unchanged(buf, before)
    pipe.close()


def test_nonfinite_skip_policy_drops_only_the_bad_rows():
    buf = ShardedRehearsalBuffer(20, nonfinite="skip")
    x = torch.randn(4, 3)
    x[1, 0] = float("nan")
    assert buf.insert(x, torch.arange(4)) == 3
    assert buf.rejected_nonfinite == 1 and 1 not in buf.class_counts()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finite_check_is_exact_when_the_fast_sum_overflows(dtype):
    """The finite check sums the batch first; a sum that overflows to Inf must fall back
    to the exact per-row check, never reject finite data nor miss a NaN or Inf."""
    from avalanche_distributed_rehearsal.core.validation import all_finite, finite_rows

    huge = torch.full((4, 50), torch.finfo(dtype).max / 2, dtype=dtype)
    assert not torch.isfinite(huge.sum()) and all_finite(huge)
    assert finite_rows(huge).all()
    buf = ShardedRehearsalBuffer(20, nonfinite="raise")
    assert buf.insert(huge, torch.arange(4)) == 4
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = huge.clone()
        x[2, 7] = bad
        assert not all_finite(x) and finite_rows(x).tolist() == [True, True, False, True]
        y = torch.randn(4, 3, 2).to(dtype)
        y[0, 1, 1] = bad
        assert finite_rows(y).tolist() == [False, True, True, True]
    assert all_finite(torch.randint(0, 9, (3, 2))) and finite_rows(torch.ones(0, 3)).numel() == 0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mem_size=0), ValueError, "mem_size"),
    (dict(mem_size=-5), ValueError, "mem_size"),
    (dict(mem_size=2.5), TypeError, "mem_size"),
    (dict(mem_size=10, sampling="x"), ValueError, "sampling"),
    (dict(mem_size=10, nonfinite="ignore"), ValueError, "nonfinite"),
    (dict(mem_size=10, seed=-1), ValueError, "seed"),
])
def test_bad_buffer_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ShardedRehearsalBuffer(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size_mem=-1), "batch_size_mem"),
    (dict(num_candidates=-1), "num_candidates"),
])
def test_bad_pipeline_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RehearsalPipeline(ShardedRehearsalBuffer(10), **kwargs)


def small_budget(rank, world):
    try:
        ShardedRehearsalBuffer(world - 1)
    except ValueError as exc:
        return str(exc)
    return "accepted"


def test_mem_size_smaller_than_world_is_rejected():
    assert all("at least the world size" in m for m in run_ranks(small_budget, 2))


def check_invariants(buf, union_ids=None):
    res = buf.reservoir
    slots = sorted(s for v in res.slots_by_class.values() for s in v)
    assert slots == list(range(len(buf))) and len(buf) <= buf.local_capacity
    assert all(res.label_of_slot[s] == c for c, v in res.slots_by_class.items() for s in v)
    fields = buf.local_tensors()
    if fields:
        assert fields["label"].tolist() == res.label_of_slot
        ids = fields["input"][:, 0].long().tolist()
        assert len(ids) == len(set(ids))
    quotas = buf.ledger.quotas(buf.rank)
    assert sum(quotas.values()) <= buf.local_capacity
    buf.ledger.check_rank(buf.rank, buf.class_counts())
    if len(buf) == buf.local_capacity and buf.world_size == 1:
        # One shard: a class under its quota has kept every candidate it was offered.
        for c, v in res.slots_by_class.items():
            if len(v) < quotas.get(c, 0):
                assert len(v) == res.seen[c]


def stress(rank, world, steps):
    rng = random.Random(rank)
    buf = ShardedRehearsalBuffer(97, seed=4, sampling="class_balanced" if steps % 2 else "uniform")
    next_id = rank * 10_000_000
    for step in range(steps):
        b = rng.randint(1, 20)
        classes = rng.randint(1, 3 + step // 50)  # classes appear over time, in random order
        x = torch.randn(b, 2)
        x[:, 0] = torch.arange(next_id, next_id + b, dtype=torch.float32)
        next_id += b
        y = torch.tensor([rng.randrange(classes) * 7 % 29 for _ in range(b)])
        c = rng.randint(0, b)
        buf.insert(x[:c], y[:c]) if c else buf.insert(None)  # collective: every rank calls it
        shared = random.Random(step)  # the same on every rank
        excluded = shared.sample(range(29), shared.choice((0, 0, 1, 3)))
        reps = buf.draw((step * 7) % 13, step, exclude=excluded)
        check_invariants(buf)
        if reps:
            assert len(reps["label"]) == len(set(reps["input"][:, 0].tolist()))
            assert not set(reps["label"].tolist()) & set(excluded)
        assert sum(buf.global_counts().values()) <= 97
        assert buf.ledger.class_counts(rank) == buf.class_counts()
    buf.close()
    return len(buf)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world, steps", [(1, 1500), (2, 1501)])
def test_stress_invariants_hold_after_every_step(world, steps):
    sizes = run_ranks(stress, world, steps, timeout=280)
    assert sum(sizes) == 97 and sizes == [split_budget(97, world, r) for r in range(world)]
