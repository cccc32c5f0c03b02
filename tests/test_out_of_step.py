"""Ranks out of step are detected at the next gather, on every rank, at once."""

import time

import pytest
import torch

from dist_harness import run_ranks
from sim_world import run_threads

pytestmark = pytest.mark.timeout(240)


def drifting_step(rank, world, sim):
    from avalanche_distributed_rehearsal.core import OutOfStepError, ShardedRehearsalBuffer

    buf = ShardedRehearsalBuffer(20, seed=0, exchange=sim.exchange(rank))
    buf.insert(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    buf.draw(2, 0)
    before = {k: v.clone() for k, v in buf.local_tensors().items()}
    try:
        buf.draw(2, 3 + rank)  # rank 1 is one step ahead
    except OutOfStepError as exc:
        after = buf.local_tensors()
        return str(exc), all(torch.equal(before[k], after[k]) for k in before)
    return "no error", True


def test_a_rank_one_step_ahead_fails_every_rank_naming_both_steps():
    for message, unchanged in run_threads(drifting_step, 2):
        assert "out of step" in message
        assert "rank 0 at step 3" in message and "rank 1 at step 4" in message
        assert unchanged


def extra_collective(rank, world, sim):
    from avalanche_distributed_rehearsal.core import (OutOfStepError, RehearsalPipeline,
                                                      ShardedRehearsalBuffer)

    buf = ShardedRehearsalBuffer(20, seed=0, exchange=sim.exchange(rank))
    pipe = RehearsalPipeline(buf, 2, 4, async_mode=False)
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    pipe.augment(x, y)
    if rank == 0:
        pipe.invalidate()  # rank 0 alone drops its prepared draw: it will draw again
    try:
        for _ in range(3):
            pipe.augment(x, y)
    except OutOfStepError as exc:
        return str(exc)
    finally:
        pipe.close()
    return "no error"


def test_a_rank_that_draws_twice_is_detected_by_the_sequence_number():
    messages = run_threads(extra_collective, 2)
    assert all("out of step" in m and "#" in m for m in messages), messages
    assert messages[0] == messages[1]


def unequal_batches(rank, world):
    import warnings

    from avalanche.training.supervised import Naive

    from avalanche_distributed_rehearsal.app.data import load_digits, make_benchmark
    from avalanche_distributed_rehearsal.integration import DistributedReplayPlugin

    warnings.simplefilter("ignore")
    train, test, n = load_digits(0)
    bench = make_benchmark(train, test, n, 5, 0)
    plugin = DistributedReplayPlugin(mem_size=100, batch_size_mem=8, replay_new_classes=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     train_mb_size=32 if rank == 0 else 16, train_epochs=1, plugins=[plugin],
                     eval_every=-1)
    start = time.monotonic()
    try:
        for exp in bench.train_stream:
            strategy.train(exp, eval_streams=[], num_workers=0)
    except RuntimeError as exc:
        return str(exc), time.monotonic() - start
    finally:
        plugin.close()
    return "finished without noticing", time.monotonic() - start


def test_ranks_running_different_numbers_of_steps_fail_at_once():
    # rank 0 uses mini-batches of 32, rank 1 of 16: rank 1 makes twice the steps
    results = run_ranks(unequal_batches, 2, preimport=("avalanche.training",), timeout=200)
    for message, seconds in results:
        assert "out of step" in message, message
        assert "iteration 0 of 5" in message and "iteration 0 of 9" in message, message
        assert seconds < 60  # at the first gather, not after a timeout



def learns_layout_during_take(rank, world, sim, stored_at_error):
    from avalanche_distributed_rehearsal.core import RehearsalPipeline, ShardedRehearsalBuffer

    buf = ShardedRehearsalBuffer(20, seed=0, exchange=sim.exchange(rank))
    # insert() is collective: rank 1 offers nothing and learns the layout from rank 0
    buf.insert(torch.randn(4, 3), torch.tensor([0, 1, 0, 1])) if rank == 0 else buf.insert(None)
    assert buf.layout is not None
    pipe = RehearsalPipeline(buf, 2, 4, async_mode=False)
    width = 3 if rank == 0 else 5  # rank 1's batch does not fit the layout it will learn
    try:
        pipe.augment(torch.randn(6, width), torch.tensor([0, 1, 2, 0, 1, 2]))
    except ValueError:
        stored_at_error[rank] = (len(buf), buf.class_counts())
        raise
    finally:
        pipe.close()


def test_a_rank_that_learnt_the_layout_from_another_refuses_a_mismatched_batch():
    """A rank that stored nothing learns the sample layout from the ranks that did, at the
    same step; a batch that does not fit it is refused before anything is stored."""
    stored_at_error = {}
    with pytest.raises(ValueError, match=r"per-sample shape \(3,\).*got \(5,\)"):
        run_threads(learns_layout_during_take, 2, stored_at_error, timeout=30)
    assert stored_at_error == {1: (0, {})}  # nothing stored on the rank that refused


@pytest.mark.parametrize("world", [1, 2, 5, 32, 33, 200])
def test_header_agreement_on_few_and_many_ranks_accepts_and_rejects_the_same(world):
    """:func:`~.metadata.agree` compares headers as lists on a few ranks and as tensors
    on many: either way it accepts intact agreeing headers whatever their counts and
    keys, and rejects any change of a rank's magic word or agreed words, and a peer's
    error word (a rank's own error is its caller's to raise), on random ranks and words."""
    from avalanche_distributed_rehearsal.core import metadata as M

    gen = torch.Generator().manual_seed(world)
    width = 4

    def randint(high):
        return int(torch.randint(0, high, (1,), generator=gen))

    rows = []
    for w in range(world):
        keys = [randint(9) for _ in range(randint(width + 1))]
        rows.append(M.encode(M.STEP, 7, 3, 11, 13, 17, 19, 23, M.StepContext(1, 0, 2, 9),
                             0, keys, width))
    clean = torch.stack(rows)
    keys, counts = M.agree(clean, 0)
    assert torch.equal(keys, clean[:, M.HEADER:]) and torch.equal(counts, clean[:, M._COUNT])
    words = [M._MAGIC, M._ERROR] + list(range(M._KIND, M._ERROR))
    for trial in range(2 * len(words)):
        word = words[trial] if trial < len(words) else words[randint(len(words))]
        rank = randint(world)
        bad = clean.clone()
        bad[rank, word] += 1 + randint(5)
        if word == M._ERROR:
            M.agree(bad, rank)  # its own error: no exception here
            if world > 1:
                with pytest.raises(M.PeerError):
                    M.agree(bad, (rank + 1) % world)
        elif word == M._MAGIC or world > 1:  # one rank always agrees with itself
            with pytest.raises(RuntimeError):
                M.agree(bad, rank)


def test_the_remembered_exclusion_digest_is_the_digest_of_the_labels():
    """The header's exclusion words (remembered per tuple of labels) equal a fresh digest
    of the labels as a list, for random exclusions asked in random order and again."""
    from avalanche_distributed_rehearsal.core import metadata as M

    gen = torch.Generator().manual_seed(0)
    exclusions = [tuple(torch.randint(0, 50, (k,), generator=gen).tolist()) for k in range(12)]
    for labels in exclusions + exclusions[::-1]:
        assert M.labels_digest(labels) == M.digest(list(labels))
    assert M.labels_digest((1, 2)) != M.labels_digest((2, 1)) != M.labels_digest(())
