"""Single-process behaviour of the shard and the per-step pipeline."""

import gc
import threading
import time
import traceback

import pytest
import torch

from avalanche_distributed_rehearsal.core import (RehearsalPipeline, ShardedRehearsalBuffer,
                                                  WorkerTimeoutError, split_budget)


def batch(step, b=16, classes=5, shape=(3, 4)):
    """Inputs whose first element is a unique sample id, to detect duplicates."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn((b,) + shape, generator=g)
    x.view(b, -1)[:, 0] = torch.arange(step * b, (step + 1) * b, dtype=torch.float32)
    y = torch.randint(0, classes, (b,), generator=g)
    return x, y, torch.zeros(b, dtype=torch.int64)


def ids(x):
    return x.flatten(1)[:, 0].long().tolist()


def rep_worker_threads():
    return [t for t in threading.enumerate() if t.name.startswith("rehearsal-worker")]


def run(async_mode, steps=40, sampling="uniform", seed=0, mem=50):
    buf = ShardedRehearsalBuffer(mem, sampling=sampling, seed=seed)
    pipe = RehearsalPipeline(buf, batch_size_mem=8, num_candidates=6, async_mode=async_mode)
    outs = [pipe.augment(*batch(i)) for i in range(steps)]
    pipe.close()
    return buf, outs


def test_split_budget_adds_up():
    for total in (7, 8, 100):
        for world in (1, 2, 3, 4):
            shares = [split_budget(total, world, r) for r in range(world)]
            assert sum(shares) == total and max(shares) - min(shares) <= 1


def test_no_one_step_lag_and_b_plus_r_rows():
    buf, outs = run(async_mode=True)
    seen = set()  # samples of steps before the previous one: R_i is planned before x_(i-1) enters
    for i, (x, y, t) in enumerate(outs):
        bx, by, _ = batch(i)
        assert torch.equal(x[:16], bx) and torch.equal(y[:16], by)
        reps = ids(x[16:])
        assert not set(reps) & set(ids(bx)), "x_i never rehearsed at its own step"
        assert set(reps) <= seen, "representatives come from steps before i - 1 only"
        assert x.shape[0] == 16 + min(8, min(50, 6 * max(i - 1, 0)))
        if i >= 1:
            seen |= set(ids(batch(i - 1)[0]))
    assert len(buf) == 50


def test_representatives_match_stored_samples_and_labels():
    buf, outs = run(async_mode=False, steps=30)
    stored = {sid: lab for sid, lab in zip(ids(buf.local_tensors()["input"]),
                                             buf.local_tensors()["label"].tolist())}
    x, y, _ = outs[-1]
    assert len(set(ids(x[16:]))) == 8, "without replacement"
    full = {}
    for i in range(30):
        bx, by, _ = batch(i)
        full.update(zip(ids(bx), by.tolist()))
    for sid, label in zip(ids(x[16:]), y[16:].tolist()):
        assert full[sid] == label
    assert all(full[sid] == lab for sid, lab in stored.items())


@pytest.mark.parametrize("sampling", ["uniform", "class_balanced"])
def test_async_and_sync_are_bit_identical(sampling):
    buf_a, outs_a = run(True, sampling=sampling)
    buf_s, outs_s = run(False, sampling=sampling)
    for (xa, ya, ta), (xs, ys, ts) in zip(outs_a, outs_s):
        assert torch.equal(xa, xs) and torch.equal(ya, ys) and torch.equal(ta, ts)
    fa, fs = buf_a.local_tensors(), buf_s.local_tensors()
    assert all(torch.equal(fa[k], fs[k]) for k in fa)


def test_different_seeds_differ():
    _, a = run(False, seed=1)
    _, b = run(False, seed=2)
    assert not torch.equal(a[-1][0], b[-1][0])


def test_budget_and_no_duplicates_single_rank():
    buf, _ = run(True, steps=60, mem=37)
    stored = ids(buf.local_tensors()["input"])
    assert len(stored) == 37 == len(set(stored))


def test_worker_exception_surfaces_at_next_step_with_traceback(monkeypatch):
    buf = ShardedRehearsalBuffer(20)
    pipe = RehearsalPipeline(buf, 4, 4, async_mode=True)
    pipe.augment(*batch(0))
    pipe.drain()  # step 0's job ran before the failure is planted

    def broken_insert(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(buf, "_insert", broken_insert)
    pipe.augment(*batch(1))  # the job fails in the background
    with pytest.raises(RuntimeError, match="disk on fire") as info:
        pipe.augment(*batch(2))
    frames = traceback.extract_tb(info.value.__traceback__)
    assert any(f.name == "broken_insert" for f in frames), "original traceback kept"
    pipe.close()


def test_every_wait_has_a_timeout(monkeypatch):
    buf = ShardedRehearsalBuffer(20)
    pipe = RehearsalPipeline(buf, 4, 4, async_mode=True, timeout=0.5)
    release = threading.Event()
    original = buf.draw

    def slow_draw(*args, **kwargs):
        release.wait(10)
        return original(*args, **kwargs)

    monkeypatch.setattr(buf, "draw", slow_draw)
    pipe._pending = pipe.worker.submit(lambda: slow_draw(4, 1))
    start = time.monotonic()
    with pytest.raises(WorkerTimeoutError, match="did not finish"):
        pipe.augment(*batch(0))
    assert time.monotonic() - start < 5
    release.set()
    pipe.close()


def test_close_and_garbage_collection_stop_the_thread():
    before = len(rep_worker_threads())
    buf = ShardedRehearsalBuffer(20)
    pipe = RehearsalPipeline(buf, 4, 4)
    pipe.augment(*batch(0))
    pipe.augment(*batch(1))
    assert len(rep_worker_threads()) == before + 1
    pipe.close()
    pipe.close()  # idempotent
    assert len(rep_worker_threads()) == before
    with pytest.raises(RuntimeError, match="closed"):
        pipe.augment(*batch(2))

    pipe = RehearsalPipeline(ShardedRehearsalBuffer(20), 4, 4)
    pipe.augment(*batch(0))
    pipe.augment(*batch(1))
    del pipe
    gc.collect()
    deadline = time.monotonic() + 5
    while len(rep_worker_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(rep_worker_threads()) == before


def test_drain_keeps_prepared_representatives():
    buf_a = ShardedRehearsalBuffer(30, seed=4)
    pa = RehearsalPipeline(buf_a, 4, 4, async_mode=True)
    buf_b = ShardedRehearsalBuffer(30, seed=4)
    pb = RehearsalPipeline(buf_b, 4, 4, async_mode=True)
    for i in range(10):
        xa = pa.augment(*batch(i))[0]
        pa.drain()  # as at the end of every train() call
        xb = pb.augment(*batch(i))[0]
        assert torch.equal(xa, xb)
    pa.close()
    pb.close()


def test_candidates_clamped_to_small_batches():
    buf = ShardedRehearsalBuffer(30)
    pipe = RehearsalPipeline(buf, 4, 100, async_mode=False)
    pipe.augment(*batch(0, b=3))
    pipe.drain()
    assert len(buf) == 3
    pipe.close()


def excluding_run(async_mode):
    buf = ShardedRehearsalBuffer(60, sampling="class_balanced", seed=2)
    pipe = RehearsalPipeline(buf, batch_size_mem=8, num_candidates=6, async_mode=async_mode)
    outs, records = [], []
    for i in range(30):
        if i == 10:
            pipe.exclude([3, 1, 3])
        if i == 20:
            pipe.exclude([])
        outs.append(pipe.augment(*batch(i), offer=i % 3 != 2))
        records.append(pipe.last_draw)
    state = pipe.state_dict()
    pipe.close()
    return buf, outs, records, state


def test_exclusion_and_offer_flag_are_exact_in_both_modes():
    runs = [excluding_run(mode) for mode in (True, False)]
    for (_, a, _, _), (_, b, _, _) in zip(runs, runs[1:]):
        assert all(torch.equal(u, v) for x, y in zip(a, b) for u, v in zip(x, y))
    buf, outs, records, state = runs[0]
    assert state["step"] == 30 and state["excluded"] == [] and state["ready"] is not None
    for i, ((x, y, _), record) in enumerate(zip(outs, records)):
        reps = y[16:]
        assert record.step == i and len(reps) == record.stats.representatives
        if 10 <= i < 20:
            assert record.excluded == (1, 3) and not set(reps.tolist()) & {1, 3}
            assert len(reps) == 8
    assert any(set(y[16:].tolist()) & {1, 3} for _, y, _ in outs[20:])
    # steps with offer=False add nothing: 20 offering steps x 6 candidates
    assert sum(buf.reservoir.seen.values()) == 6 * sum(1 for i in range(30) if i % 3 != 2)


def test_exclude_rejects_negative_labels_without_changing_anything():
    buf = ShardedRehearsalBuffer(20)
    pipe = RehearsalPipeline(buf, batch_size_mem=2, num_candidates=2)
    pipe.exclude([1])
    with pytest.raises(ValueError, match="excluded labels"):
        pipe.exclude([2, -1])
    assert pipe.excluded == (1,)
    pipe.close()


def test_augment_after_close_fails_at_once():
    buf = ShardedRehearsalBuffer(20)
    pipe = RehearsalPipeline(buf, batch_size_mem=2, num_candidates=2)
    pipe.augment(*batch(0))
    pipe.close()
    with pytest.raises(RuntimeError, match="closed"):
        pipe.augment(*batch(1))
    assert pipe.step == 1 and len(buf) == 2
