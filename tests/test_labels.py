"""Any int64 class label >= 0 is served at the cost of the classes present; a label that
cannot be served is refused at once, before anything changes."""

import pytest
import torch

from dist_harness import run_ranks

pytestmark = pytest.mark.timeout(120)

HUGE = [3, 10 ** 9, 2 ** 62, 2 ** 63 - 1]


def labelled_draws(rank, world, labels, sampling):
    from avalanche_distributed_rehearsal.core import ShardedRehearsalBuffer

    buf = ShardedRehearsalBuffer(40, sampling=sampling, seed=1)
    y = torch.tensor([labels[(rank + i) % len(labels)] for i in range(12)], dtype=torch.int64)
    x = torch.arange(12, dtype=torch.float64).view(-1, 1) + 100 * rank
    buf.insert(x, y)
    drawn = set()
    for step in range(20):
        drawn |= set(buf.draw(6, step)["label"].tolist())
    meta = buf.last_exchange.metadata_received
    counts = buf.global_counts()
    buf.close()
    return drawn, meta, counts


@pytest.mark.parametrize("sampling", ["uniform", "class_balanced"])
def test_huge_labels_cost_what_small_labels_cost(sampling):
    huge = run_ranks(labelled_draws, 2, HUGE, sampling)
    small = run_ranks(labelled_draws, 2, [0, 1, 2, 3], sampling)
    for (drawn, meta, counts), (_, small_meta, small_counts) in zip(huge, small):
        assert drawn == set(HUGE)
        assert counts == {c: 6 for c in HUGE}
        assert meta == small_meta  # metadata grows with the classes present, not the labels


def test_one_process_with_huge_labels():
    from avalanche_distributed_rehearsal.core import ShardedRehearsalBuffer

    buf = ShardedRehearsalBuffer(8, sampling="class_balanced")
    buf.insert(torch.zeros(4, 1), torch.tensor(HUGE))
    assert set(buf.draw(4, 0)["label"].tolist()) == set(HUGE)


def test_labels_that_cannot_be_served_are_refused_before_any_change():
    from avalanche_distributed_rehearsal.core import ShardedRehearsalBuffer

    buf = ShardedRehearsalBuffer(8)
    buf.insert(torch.zeros(2, 1), torch.tensor([1, 2]))
    before = buf.local_tensors()["label"].clone()
    too_big = torch.tensor([1, 2 ** 63 + 5], dtype=torch.uint64)
    with pytest.raises(ValueError, match=r"2\*\*63 - 1"):
        buf.insert(torch.zeros(2, 1), too_big)
    with pytest.raises(ValueError, match="non-negative"):
        buf.insert(torch.zeros(2, 1), torch.tensor([1, -4]))
    assert torch.equal(buf.local_tensors()["label"], before) and len(buf) == 2
    # unsigned labels that fit are served
    buf.insert(torch.zeros(1, 1), torch.tensor([2 ** 40], dtype=torch.uint64))
    assert buf.class_counts()[2 ** 40] == 1
