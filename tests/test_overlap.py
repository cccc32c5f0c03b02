"""async_mode="auto": the job of each step on the worker or inline, whichever measured
faster; every choice gives the same shards and batches as the synchronous pipeline."""

import random
import time

import pytest
import torch

from avalanche_distributed_rehearsal.core import RehearsalPipeline, ShardedRehearsalBuffer
from avalanche_distributed_rehearsal.core.overlap import INLINE, WORKER, OverlapChooser
from dist_harness import run_ranks


def drive(chooser, seconds_of):
    """Run the chooser over fake steps whose length depends on the mode; return the modes."""
    now, modes = 0.0, []
    for _ in range(200):
        chooser.tick(now)
        mode = chooser.mode()
        chooser.offered(mode)
        modes.append(mode)
        now += seconds_of[mode]
    return modes


def test_chooser_keeps_the_faster_mode_and_measures_again():
    chooser = OverlapChooser(probe=4, hold=10, warmup=2)
    modes = drive(chooser, {WORKER: 2.0, INLINE: 1.0})
    cycle = 4 + 4 + 10
    assert modes[:2] == [WORKER] * 2  # warm-up
    assert modes[2:6] == [WORKER] * 4 and modes[6:10] == [INLINE] * 4  # the probes
    assert modes[10:20] == [INLINE] * 10  # the faster one is held
    assert modes[2 + cycle: 6 + cycle] == [WORKER] * 4  # and measured again
    assert chooser.chosen == INLINE and chooser.choices >= 10
    chooser = OverlapChooser(probe=4, hold=10, warmup=2)
    modes = drive(chooser, {WORKER: 1.0, INLINE: 3.0})
    assert modes[10:20] == [WORKER] * 10
    chooser = OverlapChooser(probe=4, hold=10, warmup=2)
    assert drive(chooser, {WORKER: 1.0, INLINE: 1.0})[10:20] == [WORKER] * 10  # a tie: the worker


def test_chooser_refuses_bad_settings():
    with pytest.raises(ValueError, match="probe"):
        OverlapChooser(probe=0)


def batch(step, b=12, classes=6):
    g = torch.Generator().manual_seed(step)
    return (torch.randn(b, 3, generator=g), torch.randint(0, classes, (b,), generator=g),
            torch.zeros(b, dtype=torch.int64))


class RandomChooser(OverlapChooser):
    """Flips between the modes at random: every interleaving of worker and inline jobs."""

    def __init__(self, seed):
        super().__init__()
        self.rng = random.Random(seed)

    def mode(self):
        return self.rng.choice([WORKER, INLINE])


def run(rank, world, async_mode, steps, chooser_seed=None):
    buf = ShardedRehearsalBuffer(30, seed=3)
    pipe = RehearsalPipeline(buf, batch_size_mem=5, num_candidates=4, async_mode=async_mode)
    if chooser_seed is not None:
        pipe.chooser = RandomChooser(chooser_seed + rank)
    outs = [pipe.augment(*batch(i * world + rank)) for i in range(steps)]
    pipe.close()
    return [torch.cat([x, y.unsqueeze(1).float()], 1) for x, y, _ in outs], buf.local_tensors()


def same(a, b):
    (outs_a, shard_a), (outs_b, shard_b) = a, b
    assert len(outs_a) == len(outs_b)
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))
    assert all(torch.equal(shard_a[k], shard_b[k]) for k in shard_a)


def test_auto_and_any_mix_of_modes_equal_sync_on_one_rank():
    sync = run(0, 1, False, 60)
    same(run(0, 1, "auto", 60), sync)
    for seed in range(3):
        same(run(0, 1, "auto", 60, chooser_seed=seed), sync)


def _two_ranks(rank, world):
    sync = run(rank, world, False, 40)
    mixed = run(rank, world, "auto", 40, chooser_seed=rank * 10)  # ranks choose apart
    same(mixed, sync)
    return True


@pytest.mark.timeout(180)
def test_ranks_that_choose_different_modes_equal_sync_on_two_ranks():
    assert run_ranks(_two_ranks, 2, timeout=150) == [True, True]


def test_auto_picks_inline_when_the_worker_is_slower(monkeypatch):
    """A worker made slow (each job sleeps first): auto measures it and runs inline."""
    buf = ShardedRehearsalBuffer(30, seed=3)
    pipe = RehearsalPipeline(buf, batch_size_mem=5, num_candidates=4, async_mode="auto")
    pipe.chooser = OverlapChooser(probe=4, hold=20, warmup=1)
    submit = pipe.worker.submit

    def slow_submit(fn, *args):
        def slow(*a):
            time.sleep(0.01)
            return fn(*a)
        return submit(slow, *args)

    monkeypatch.setattr(pipe.worker, "submit", slow_submit)
    for i in range(20):
        pipe.augment(*batch(i))
    assert pipe.chooser.choices == 1 and pipe.chooser.chosen == INLINE
    pipe.close()


@pytest.mark.parametrize("bad", [1, "yes", None, 0.5])
def test_async_mode_must_be_a_bool_or_auto(bad):
    with pytest.raises(ValueError, match="async_mode must be True, False or 'auto'"):
        RehearsalPipeline(ShardedRehearsalBuffer(10), async_mode=bad)
