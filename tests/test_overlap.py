"""async_mode="auto": the job of each step on the worker or inline, whichever measured
faster; every choice gives the same shards and batches as the synchronous pipeline."""

import random
import time

import pytest
import torch

from avalanche_distributed_rehearsal.core import RehearsalPipeline, ShardedRehearsalBuffer
from avalanche_distributed_rehearsal.core.overlap import (INLINE, WORKER, OverlapChooser,
                                                          median_and_error)
from dist_harness import run_ranks


def drive(chooser, seconds_of, steps=200, choices=None):
    """Run the chooser over fake steps whose length depends on the mode (a dict, or a
    function of the mode and the step); return the modes. ``choices``, a list, receives
    the mode chosen at the end of every cycle."""
    now, modes = 0.0, []
    for step in range(steps):
        chooser.tick(now)
        mode = chooser.mode()
        made = chooser.choices
        chooser.offered(mode)
        if choices is not None and chooser.choices > made:
            choices.append(chooser.chosen)
        modes.append(mode)
        now += seconds_of(mode, step) if callable(seconds_of) else seconds_of[mode]
    return modes


def test_chooser_keeps_the_faster_mode_and_measures_again():
    chooser = OverlapChooser(probe=4, hold=10, warmup=2, max_hold=40)
    modes = drive(chooser, {WORKER: 2.0, INLINE: 1.0}, steps=2 + 4 * 8 + 10 + 20 + 40 + 40)
    assert modes[:2] == [INLINE] * 2  # warm-up
    assert modes[2:6] == [WORKER] * 4 and modes[6:10] == [INLINE] * 4  # the probes
    assert modes[10:20] == [INLINE] * 10  # the faster one is held
    assert modes[20:24] == [WORKER] * 4  # and measured again
    assert chooser.chosen == INLINE and chooser.choices == 4
    chooser = OverlapChooser(probe=4, hold=10, warmup=2)
    modes = drive(chooser, {WORKER: 1.0, INLINE: 3.0})
    assert modes[10:20] == [WORKER] * 10
    chooser = OverlapChooser(probe=4, hold=10, warmup=2)
    assert drive(chooser, {WORKER: 1.0, INLINE: 1.0})[10:20] == [INLINE] * 10  # a tie: inline


def held_lengths(modes, probe_modes):
    """The lengths of the holds in ``modes`` (runs between probes ``probe_modes``)."""
    lengths, k = [], 0
    while k < len(modes):
        if modes[k:k + len(probe_modes)] == probe_modes:
            k += len(probe_modes)
            start = k
            while k < len(modes) and modes[k:k + len(probe_modes)] != probe_modes:
                k += 1
            lengths.append(k - start)
        else:
            k += 1
    return lengths


@pytest.mark.parametrize("fast", [WORKER, INLINE])
def test_a_repeated_choice_holds_twice_as_long_up_to_max_hold(fast):
    """The probes of a long run cost less and less: 10, 20, 40, then 40 steps held."""
    seconds = {WORKER: 1.0, INLINE: 3.0} if fast == WORKER else {WORKER: 3.0, INLINE: 1.0}
    chooser = OverlapChooser(probe=4, hold=10, warmup=0, max_hold=40)
    modes = drive(chooser, seconds, steps=5 * 8 + 10 + 20 + 40 + 40 + 40)
    assert held_lengths(modes, [WORKER] * 4 + [INLINE] * 4)[:5] == [10, 20, 40, 40, 40]
    assert chooser.choices == 5 and chooser.chosen == fast and chooser.held == 40


def test_a_changed_choice_holds_for_hold_again():
    """The worker wins, then (the machine changed) loses: the hold starts again at 10."""
    change = 8 + 10 + 8 + 20  # the second hold's end

    def seconds(mode, step):
        worker_faster = step < change
        return 1.0 if (mode == WORKER) == worker_faster else 3.0

    chooser = OverlapChooser(probe=4, hold=10, warmup=0, max_hold=80)
    choices = []
    modes = drive(chooser, seconds, steps=change + 8 + 10 + 8 + 20, choices=choices)
    assert choices == [WORKER, WORKER, INLINE, INLINE]
    assert held_lengths(modes, [WORKER] * 4 + [INLINE] * 4) == [10, 20, 10, 20]


def test_a_probe_that_the_worker_loses_ends_early():
    """At the end of each pair of blocks the worker must still be ahead: a slower worker
    costs one block of the probe, not half of it; a faster one is measured in full."""
    chooser = OverlapChooser(probe=8, hold=10, warmup=1, block=2)
    modes = drive(chooser, {WORKER: 1.5, INLINE: 1.0}, steps=1 + 4 + 10)
    assert modes == [INLINE] + [WORKER] * 2 + [INLINE] * 2 + [INLINE] * 10
    assert chooser.early_ends == 1 and chooser.choices == 1 and chooser.chosen == INLINE
    chooser = OverlapChooser(probe=8, hold=10, warmup=1, block=2)
    modes = drive(chooser, {WORKER: 0.5, INLINE: 1.0}, steps=1 + 16 + 10)
    assert modes[1:17] == ([WORKER] * 2 + [INLINE] * 4 + [WORKER] * 4 + [INLINE] * 4
                           + [WORKER] * 2)
    assert modes[17:] == [WORKER] * 10 and chooser.early_ends == 0


def test_a_probe_ends_early_when_the_worker_falls_behind_later():
    """Ahead while its first block dominates its median, behind once its slower later
    blocks do (a worker that slows down): the probe ends at the third pair of blocks."""
    def seconds(mode, step):
        return (0.5 if step < 2 else 2.0) if mode == WORKER else 1.0

    chooser = OverlapChooser(probe=8, hold=10, warmup=0, block=2)
    modes = drive(chooser, seconds, steps=12 + 10)
    assert modes[:12] == [WORKER] * 2 + [INLINE] * 4 + [WORKER] * 4 + [INLINE] * 2
    assert modes[12:] == [INLINE] * 10 and chooser.early_ends == 1


def test_chooser_measures_the_modes_in_balanced_blocks():
    chooser = OverlapChooser(probe=6, hold=5, warmup=1, block=2)
    modes = drive(chooser, {WORKER: 0.99, INLINE: 1.0}, steps=1 + 12 + 5 + 12)
    probe = [WORKER] * 2 + [INLINE] * 4 + [WORKER] * 4 + [INLINE] * 2  # W I I W W I
    assert modes[1:13] == probe and modes[18:30] == probe


@pytest.mark.parametrize("worker_seconds, chosen", [(0.99, INLINE), (0.975, INLINE),
                                                    (0.96, WORKER), (0.5, WORKER)])
def test_chooser_keeps_the_worker_only_when_it_is_faster_by_the_margin(worker_seconds, chosen):
    """margin=0.03: the worker must save more than 3 % of the inline step to be kept."""
    chooser = OverlapChooser(probe=8, hold=20, warmup=0, block=2, margin=0.03)
    modes = drive(chooser, {WORKER: worker_seconds, INLINE: 1.0}, steps=16 + 20)
    assert chooser.chosen == chosen and modes[16:] == [chosen] * 20


def test_chooser_is_not_fooled_by_a_machine_that_slows_down():
    """Both modes cost the same, but every step is slower than the one before (e.g. a
    neighbour's load growing): measured one after the other, the mode measured first
    would look faster; measured in alternating blocks, neither is faster by the margin."""
    def seconds(mode, step):
        return 1.0 + 0.01 * step

    blocks = OverlapChooser(probe=16, hold=8, warmup=0, block=4)
    drive(blocks, seconds, steps=32)
    assert blocks.chosen == INLINE
    one_after_the_other = OverlapChooser(probe=16, hold=8, warmup=0, block=16)
    drive(one_after_the_other, seconds, steps=32)
    assert one_after_the_other.chosen == WORKER  # the bias the blocks remove


def test_chooser_keeps_inline_when_noise_hides_the_difference():
    """Steps that vary by +-40 %: a worker 5 % faster, or no faster at all, cannot be told
    apart by 16 steps each way, and inline is kept in nearly every cycle (by the margin
    alone the worker would be kept in about half of them, a third with equal modes); a
    worker twice as fast is always kept."""
    rng = random.Random(0)

    def noisy(worker_factor, spread):
        return lambda mode, step: (worker_factor if mode == WORKER else 1.0) * (
            1.0 + spread * (2 * rng.random() - 1))

    for factor in (0.95, 1.0):
        chosen = []
        drive(OverlapChooser(probe=16, hold=0, warmup=0), noisy(factor, 0.4), 100 * 32, chosen)
        assert len(chosen) >= 100 and chosen.count(WORKER) <= 8
    chosen = []
    drive(OverlapChooser(probe=16, hold=0, warmup=0), noisy(0.5, 0.4), 20 * 32, chosen)
    assert chosen == [WORKER] * 20


def test_median_error_matches_the_spread_of_medians():
    """The standard error estimated from one sample's quartiles is, on average, within
    15 % of the observed spread of the median over many samples (normal steps, n = 16)."""
    rng = random.Random(1)
    medians, errors = [], []
    for _ in range(2000):
        samples = [rng.gauss(10.0, 1.0) for _ in range(16)]
        m, e = median_and_error(samples)
        medians.append(m)
        errors.append(e)
    mean = sum(medians) / len(medians)
    observed = (sum((m - mean) ** 2 for m in medians) / (len(medians) - 1)) ** 0.5
    assert abs(sum(errors) / len(errors) / observed - 1) < 0.15
    assert median_and_error([3.0]) == (3.0, float("inf"))


def test_chooser_follows_the_agreed_vote():
    """With ``agree``, the chooser holds what the ranks agreed, not its own vote."""
    votes = []

    def nobody_else_wants_the_worker(vote):
        votes.append(vote)
        return False

    chooser = OverlapChooser(probe=4, hold=10, warmup=0, agree=nobody_else_wants_the_worker)
    modes = drive(chooser, {WORKER: 0.5, INLINE: 1.0}, steps=8 + 10)
    assert votes == [True] and chooser.chosen == INLINE and modes[8:] == [INLINE] * 10
    chooser = OverlapChooser(probe=4, hold=10, warmup=0, agree=lambda vote: vote)
    assert drive(chooser, {WORKER: 0.5, INLINE: 1.0}, steps=18)[8:] == [WORKER] * 10


def test_chooser_refuses_bad_settings():
    with pytest.raises(ValueError, match="probe"):
        OverlapChooser(probe=0)
    with pytest.raises(ValueError, match="block"):
        OverlapChooser(probe=16, block=5)
    with pytest.raises(ValueError, match="block"):
        OverlapChooser(block=0)
    with pytest.raises(ValueError, match="margin"):
        OverlapChooser(margin=1.0)
    with pytest.raises(ValueError, match="margin"):
        OverlapChooser(margin=-0.1)
    with pytest.raises(ValueError, match="z must"):
        OverlapChooser(z=-1)
    with pytest.raises(ValueError, match="max_hold must be >= hold=10, got 5"):
        OverlapChooser(hold=10, max_hold=5)


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


class FixedVote(OverlapChooser):
    """Votes ``votes[k]`` at its k-th choice and ``aheads[k]`` at its k-th check of a
    probe's pair of blocks, whatever it measured."""

    def __init__(self, votes, aheads, agree=None):
        super().__init__(probe=2, hold=3, warmup=1, block=1, max_hold=6, agree=agree)
        self.votes, self.aheads, self.checks = list(votes), list(aheads), 0

    def vote(self):
        return self.votes[self.choices]

    def ahead(self):
        self.checks += 1
        return self.aheads[self.checks - 1]


STEPS = 1 + 6 * 4 + 3 + 6 + 3 + 6  # enough for the votes below to be used


def _ranks_vote(rank, world, votes_of, aheads_of):
    """Every rank runs auto with its own votes; returns the modes its jobs ran in."""
    buf = ShardedRehearsalBuffer(30, seed=3)
    pipe = RehearsalPipeline(buf, batch_size_mem=5, num_candidates=4, async_mode="auto")
    chooser = pipe.chooser = FixedVote(votes_of[rank], aheads_of[rank], pipe._agree_on_worker)
    modes, outs = [], []
    for i in range(STEPS):
        modes.append(chooser.mode())
        outs.append(pipe.augment(*batch(i * world + rank)))
    pipe.close()
    sync = run(rank, world, False, len(outs))
    same(([torch.cat([x, y.unsqueeze(1).float()], 1) for x, y, _ in outs], buf.local_tensors()),
         sync)
    return modes


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_run_the_modes_they_agreed_the_worker_only_if_every_rank_voted_for_it(world):
    """Randomized votes per rank, for the choices and for the early ends of the probes:
    every rank runs every step in the same mode, that of one chooser whose votes are
    the AND of the ranks' (the worker only if every rank voted for it, a probe goes on
    only while every rank's worker is ahead); results equal sync."""
    rng = random.Random(world)
    votes_of = [[True, True] + [rng.random() < 0.7 for _ in range(8)] for _ in range(world)]
    aheads_of = [[True, True] + [rng.random() < 0.8 for _ in range(8)] for _ in range(world)]
    votes_of[rng.randrange(world)][1] = False  # every vote but one for the worker: inline
    aheads_of[rng.randrange(world)][2] = False  # one rank's worker behind: the probe ends
    modes = run_ranks(_ranks_vote, world, votes_of, aheads_of, timeout=150)
    alone = FixedVote([all(v) for v in zip(*votes_of)], [all(a) for a in zip(*aheads_of)])
    expected = drive(alone, {WORKER: 1.0, INLINE: 1.0}, steps=STEPS)
    assert all(m == expected for m in modes), (votes_of, aheads_of, modes, expected)
    assert alone.early_ends >= 1 and alone.choices >= 4
    assert expected[1:1 + 4 + 3] == [WORKER, INLINE, INLINE, WORKER] + [WORKER] * 3
    assert expected[8:10] == [WORKER, INLINE] and expected[12:14] == [INLINE] * 2


def _mixed_auto(rank, world):
    buf = ShardedRehearsalBuffer(30, seed=3)
    pipe = RehearsalPipeline(buf, batch_size_mem=5, num_candidates=4,
                             async_mode="auto" if rank == 0 else False)
    try:
        pipe.augment(*batch(rank))
    except RuntimeError as exc:
        return str(exc)
    finally:
        pipe.close()
    return None


@pytest.mark.timeout(120)
def test_auto_on_some_ranks_only_is_refused_on_every_rank_at_the_first_step():
    """auto votes collectively, so a rank without it would leave the others waiting:
    the step's header check refuses the mix on every rank, naming async_mode."""
    errors = run_ranks(_mixed_auto, 2, timeout=100)
    assert all(e is not None and "async_mode='auto' on some ranks only" in e for e in errors)


def slow_submit(submit, seconds):
    """``submit`` (a worker's) whose jobs sleep ``seconds`` first."""
    def submit_slowly(fn, *args):
        def slow(*a):
            time.sleep(seconds)
            return fn(*a)
        return submit(slow, *args)
    return submit_slowly


def test_auto_picks_inline_when_the_worker_is_slower(monkeypatch):
    """A worker made slow (each job sleeps first): auto measures it and runs inline."""
    buf = ShardedRehearsalBuffer(30, seed=3)
    pipe = RehearsalPipeline(buf, batch_size_mem=5, num_candidates=4, async_mode="auto")
    pipe.chooser = OverlapChooser(probe=4, hold=20, warmup=1)
    monkeypatch.setattr(pipe.worker, "submit", slow_submit(pipe.worker.submit, 0.01))
    for i in range(20):
        pipe.augment(*batch(i))
    assert pipe.chooser.choices == 1 and pipe.chooser.chosen == INLINE
    pipe.close()


@pytest.mark.parametrize("bad", [1, "yes", None, 0.5])
def test_async_mode_must_be_a_bool_or_auto(bad):
    with pytest.raises(ValueError, match="async_mode must be True, False or 'auto'"):
        RehearsalPipeline(ShardedRehearsalBuffer(10), async_mode=bad)


def _slow_worker_on_rank_zero(rank, world):
    """auto with rank 0's worker made slow: both ranks end the first probe early (rank 0's
    vote) and run inline from there; the batches and shards equal sync."""
    buf = ShardedRehearsalBuffer(30, seed=3)
    pipe = RehearsalPipeline(buf, batch_size_mem=5, num_candidates=4, async_mode="auto")
    pipe.chooser = OverlapChooser(probe=8, hold=20, warmup=1, block=2,
                                  agree=pipe._agree_on_worker)
    if rank == 0:
        pipe.worker.submit = slow_submit(pipe.worker.submit, 0.02)
    modes, outs = [], []
    for i in range(1 + 4 + 20):
        modes.append(pipe.chooser.mode())
        outs.append(pipe.augment(*batch(i * world + rank)))
    early, chosen = pipe.chooser.early_ends, pipe.chooser.chosen
    pipe.close()
    sync = run(rank, world, False, len(outs))
    same(([torch.cat([x, y.unsqueeze(1).float()], 1) for x, y, _ in outs], buf.local_tensors()),
         sync)
    return modes, early, chosen


@pytest.mark.timeout(180)
def test_a_slow_worker_on_one_rank_ends_the_probe_early_on_every_rank():
    results = run_ranks(_slow_worker_on_rank_zero, 2, timeout=150)
    expected = [INLINE] + [WORKER] * 2 + [INLINE] * 2 + [INLINE] * 20
    assert all(r == (expected, 1, INLINE) for r in results), results
