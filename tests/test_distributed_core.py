"""The core on 2 and 4 gloo ranks: invariants, exact global sampling, async == sync."""

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from dist_harness import run_ranks

pytestmark = pytest.mark.timeout(240)


def rank_batch(rank, step, b=12, classes=4):
    """Sample ids are globally unique: id = (rank, step, row) packed into element 0."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn((b, 2, 3), generator=g)
    x.view(b, -1)[:, 0] = torch.tensor([rank * 1_000_000 + step * b + j for j in range(b)],
                                       dtype=torch.float32)
    y = torch.randint(0, classes + rank, (b,), generator=g)
    return x, y, torch.full((b,), rank, dtype=torch.int64)


def ids(x):
    return x.flatten(1)[:, 0].long().tolist()


def pipeline_run(rank, world, async_mode, sampling, steps, mem):
    from avalanche_distributed_rehearsal.core import RehearsalPipeline, ShardedRehearsalBuffer

    buf = ShardedRehearsalBuffer(mem, sampling=sampling, seed=11)
    pipe = RehearsalPipeline(buf, batch_size_mem=5, num_candidates=7, async_mode=async_mode)
    outs = [pipe.augment(*rank_batch(rank, i)) for i in range(steps)]
    pipe.close()
    fields = {k: v.clone() for k, v in buf.local_tensors().items()}
    stats = buf.last_exchange
    buf.close()
    return {"outs": outs, "fields": fields, "capacity": buf.local_capacity,
            "payload_received": stats.payload_received, "row_bytes": buf.storage.layout.row_bytes}


@pytest.mark.parametrize("sampling", ["uniform", "class_balanced"])
def test_async_equals_sync_bit_for_bit_on_two_ranks(sampling):
    a = run_ranks(pipeline_run, 2, True, sampling, 25, 60)
    s = run_ranks(pipeline_run, 2, False, sampling, 25, 60)
    for rank in range(2):
        for (xa, ya, ta), (xs, ys, ts) in zip(a[rank]["outs"], s[rank]["outs"]):
            assert torch.equal(xa, xs) and torch.equal(ya, ys) and torch.equal(ta, ts)
        for key in a[rank]["fields"]:
            assert torch.equal(a[rank]["fields"][key], s[rank]["fields"][key])


@pytest.mark.parametrize("world", [2, 4])
def test_global_budget_no_duplicates_and_fill(world):
    mem = 50
    steps = 30
    results = run_ranks(pipeline_run, world, True, "uniform", steps, mem)
    union = []
    for rank, res in enumerate(results):
        local = ids(res["fields"]["input"])
        assert len(local) <= res["capacity"]
        assert all(i // 1_000_000 == rank for i in local), "a shard holds only its rank's samples"
        union += local
    assert len(union) == len(set(union)), "no stream sample stored twice"
    assert len(union) == min(mem, world * steps * 7)
    assert sum(r["capacity"] for r in results) == mem
    # Every rank receives the same number of representatives; they come from all ranks.
    sources = set()
    for rank, res in enumerate(results):
        x, _, t = res["outs"][-1]
        assert x.shape[0] == 12 + 5
        sources |= set(t[12:].tolist())
        assert torch.equal(x[:12], rank_batch(rank, steps - 1)[0])
    assert len(sources) > 1


def unequal_draws(rank, world, sampling, steps, exclude=()):
    from avalanche_distributed_rehearsal.core import ShardedRehearsalBuffer

    buf = ShardedRehearsalBuffer(200, sampling=sampling, seed=5)
    # Rank 0 stores 40 samples of classes 0..3, rank 1 stores 4 of class 4 (unequal shards).
    if rank == 0:
        x = torch.arange(40, dtype=torch.float32).view(40, 1)
        buf.insert(x, torch.arange(40) % 4)
    elif rank == 1:
        buf.insert(torch.arange(100, 104, dtype=torch.float32).view(4, 1),
                   torch.full((4,), 4))
    else:
        buf.insert(None)  # insert() is collective: a rank with nothing to offer takes part
    got = []
    for step in range(steps):
        reps = buf.draw(4, step, exclude=exclude)
        got.append((reps["input"].flatten().long().tolist(), reps["label"].tolist()))
    buf.close()
    return got


@pytest.mark.parametrize("world", [2, 3])
def test_uniform_sampling_is_exact_over_unequal_shards(world):
    results = run_ranks(unequal_draws, world, "uniform", 700)
    hits = Counter()
    for per_rank in results:
        for sample_ids, _ in per_rank:
            assert len(set(sample_ids)) == 4
            hits.update(sample_ids)
    assert set(hits) == set(range(40)) | set(range(100, 104))
    assert chisquare(list(hits.values())).pvalue > 1e-3


def test_class_balanced_sampling_is_exact_over_unequal_shards():
    results = run_ranks(unequal_draws, 2, "class_balanced", 700)
    classes, within = Counter(), Counter()
    for per_rank in results:
        for sample_ids, labels in per_rank:
            classes.update(labels)
            within.update(sample_ids)
    assert chisquare(list(classes.values())).pvalue > 1e-3
    assert classes[4] > 0.15 * sum(classes.values()), "the small class is not under-sampled"
    for c in range(4):
        assert chisquare([within[i] for i in range(c, 40, 4)]).pvalue > 1e-3
    assert chisquare([within[i] for i in range(100, 104)]).pvalue > 1e-3


@pytest.mark.parametrize("sampling", ["uniform", "class_balanced"])
def test_excluded_classes_are_never_drawn_and_the_rest_stays_exact(sampling):
    # rank 0 holds classes 0..3 (ids 0..39, id % 4 = class), rank 1 holds class 4
    results = run_ranks(unequal_draws, 2, sampling, 400, (0, 4))
    hits, classes = Counter(), Counter()
    for per_rank in results:
        for sample_ids, labels in per_rank:
            assert len(sample_ids) == 4 and not set(labels) & {0, 4}
            hits.update(sample_ids)
            classes.update(labels)
    eligible = [i for i in range(40) if i % 4]
    assert set(hits) == set(eligible)
    assert chisquare([hits[i] for i in eligible]).pvalue > 1e-3
    assert chisquare(list(classes.values())).pvalue > 1e-3


def mismatched_exclusion(rank, world):
    from avalanche_distributed_rehearsal.core import ShardedRehearsalBuffer

    buf = ShardedRehearsalBuffer(20, seed=0)
    buf.insert(torch.zeros(2, 1), torch.tensor([0, 1]))
    try:
        buf.draw(2, 0, exclude=[rank])
    except RuntimeError as exc:
        return str(exc), len(buf)
    finally:
        buf.close()
    return "no error", len(buf)


def test_ranks_excluding_different_classes_fail_clearly_everywhere():
    for message, size in run_ranks(mismatched_exclusion, 2):
        assert "excluded different classes" in message and size == 2


def payload_runs(rank, world):
    """The last step's received payload bytes for a small and a large buffer."""
    runs = {mem: pipeline_run(rank, world, False, "uniform", 15, mem) for mem in (40, 400)}
    return {mem: (res["payload_received"], res["row_bytes"]) for mem, res in runs.items()}


def test_payload_bytes_depend_on_r_not_on_buffer_or_world_size():
    per_world = {world: run_ranks(payload_runs, world) for world in (2, 4)}
    row = per_world[2][0][40][1]
    for world, results in per_world.items():
        for by_mem in results:
            assert {received for received, _ in by_mem.values()} == {5 * row}, (world, by_mem)


def mismatched_seed(rank, world):
    from avalanche_distributed_rehearsal.core import ShardedRehearsalBuffer

    buf = ShardedRehearsalBuffer(20, seed=rank)
    try:
        buf.draw(2, 0)
    except RuntimeError as exc:
        return str(exc)
    finally:
        buf.close()
    return "no error"


def test_ranks_with_different_configurations_fail_clearly_everywhere():
    messages = run_ranks(mismatched_seed, 2)
    assert all("different buffer configurations" in m for m in messages)
