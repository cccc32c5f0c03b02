"""Pickling the storage policy and the plugin: ``pickle``, ``copy.deepcopy`` and Avalanche's
own (dill) checkpoints, ``avalanche.checkpointing.save_checkpoint`` / ``maybe_load_checkpoint``."""

import copy
import os
import pickle

import pytest
import torch

pytest.importorskip("avalanche")
from avalanche.benchmarks import nc_benchmark  # noqa: E402
from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import ReplayPlugin  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from avalanche_distributed_rehearsal import (DistributedRehearsalBuffer,  # noqa: E402
                                             DistributedReplayPlugin)
from dist_harness import run_ranks  # noqa: E402

# Avalanche 0.6's dill checkpoint cannot pickle a torch optimizer with torch 2.14, dill 0.4.1
# and typing_extensions 4.16 ("Can't pickle sentinel: it's not the same object as
# typing_extensions.sentinel"),
# with the stock ReplayPlugin as with ours; leaving the optimizer out is what the stock
# plugin needs to round-trip (the fresh strategy's optimizer is kept).
EXCLUDE = ["optimizer"]


def tiny_benchmark():
    """3 experiences of 2 classes, 40 training samples per class, 6 features, in memory."""
    gen = torch.Generator().manual_seed(0)

    def split(n_per_class):
        y = torch.arange(6).repeat_interleave(n_per_class)
        x = torch.randn(len(y), 6, generator=gen) + torch.nn.functional.one_hot(y, 6) * 3
        data = TensorDataset(x, y)
        data.targets = y.tolist()
        return data

    return nc_benchmark(split(40), split(10), n_experiences=3, task_labels=False, seed=0,
                        fixed_class_order=list(range(6)))


def make_strategy(plugin):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6))
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                 train_mb_size=16, train_epochs=1, plugins=[plugin], evaluator=None)


def make_plugin(kind):
    if kind == "ours":
        return DistributedReplayPlugin(mem_size=30, batch_size_mem=4, seed=3)
    if kind == "stock+our-policy":
        return ReplayPlugin(mem_size=30, storage_policy=DistributedRehearsalBuffer(30, seed=3))
    return ReplayPlugin(mem_size=30)


def policy_of(plugin):
    return plugin.storage_policy


def params(strategy):
    return torch.cat([p.detach().flatten() for p in strategy.model.parameters()])


def same(a, b) -> bool:
    """Equality of nested plain data and tensors (tensors: same dtype and values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_shard(got: dict, want: dict):
    """Two ``ShardedRehearsalBuffer.state_dict()``s hold the same shard, bit for bit."""
    assert set(got) == set(want)
    assert torch.equal(got["rows"], want["rows"]) and got["rows"].dtype == want["rows"].dtype
    assert got["reservoir"] == want["reservoir"]  # slots, per-class seen counters, RNG
    assert same(got, want)  # the replicated ledger (tensors) and everything else


def fields(policy):
    """This rank's shard as ``(inputs, labels, task labels)`` CPU copies."""
    data = policy.buffer
    if len(data) == 0:
        return None
    xs, ys, ts = zip(*(data[i][:3] for i in range(len(data))))
    return torch.stack(xs), torch.tensor(ys), torch.tensor(ts)


# --------------------------------------------------------------------------- Avalanche checkpoints
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["stock", "ours", "stock+our-policy"])
def test_avalanche_checkpoint_round_trips_a_strategy_using_our_objects(tmp_path, kind):
    bench = tiny_benchmark()
    plugin = make_plugin(kind)
    strategy = make_strategy(plugin)
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    ours = kind != "stock"
    if ours:
        saved_shard = policy_of(plugin).state_dict()
        saved_fields = fields(policy_of(plugin))
        assert len(saved_shard["rows"]) > 0
    if kind == "ours":
        saved_plugin = plugin.state_dict(include_buffer=False)
        assert saved_plugin["pipeline"]["step"] > 0 and saved_plugin["seen_classes"] == [0, 1, 2, 3]
    path = str(tmp_path / "ckpt.pkl")
    save_checkpoint(strategy, path, exclude=EXCLUDE)
    saved_params = params(strategy)
    if ours:  # the live objects keep working after being pickled
        assert_same_shard(policy_of(plugin).state_dict(), saved_shard)
    torch.manual_seed(7)  # the data loader's shuffling
    strategy.train(bench.train_stream[2])  # the uninterrupted run, to compare with
    straight = params(strategy)
    if kind == "ours":
        plugin.close()

    fresh_plugin = make_plugin(kind)
    fresh = make_strategy(fresh_plugin)
    fresh, next_exp = maybe_load_checkpoint(fresh, path)
    assert next_exp == 2
    (restored,) = [p for p in fresh.plugins if type(p) is type(plugin)]
    assert restored is not fresh_plugin and torch.equal(params(fresh), saved_params)
    if ours:
        policy = policy_of(restored)
        assert isinstance(policy, DistributedRehearsalBuffer)
        assert policy is not policy_of(fresh_plugin)
        # the shard is held until the buffer is created, then loaded into it, bit for bit
        assert policy.local_size() == len(saved_shard["rows"])
        got_fields = fields(policy)
        assert all(torch.equal(a, b) for a, b in zip(got_fields, saved_fields))
        policy.materialize(fresh.device)
        assert_same_shard(policy.state_dict(), saved_shard)
        assert all(torch.equal(a, b) for a, b in zip(fields(policy), saved_fields))
    if kind == "ours":
        assert same(restored.state_dict(include_buffer=False), saved_plugin)
        assert restored.seen_classes == {0, 1, 2, 3}
    torch.manual_seed(7)
    fresh.train(bench.train_stream[2])  # training goes on, exactly as it did without a break
    assert torch.equal(params(fresh), straight) and not torch.equal(straight, saved_params)
    if kind == "ours":
        assert restored.pipeline is policy.pipeline is not None
        assert restored.pipeline.step == saved_plugin["pipeline"]["step"] + 5  # 80 samples / 16
        assert restored.seen_classes == {0, 1, 2, 3, 4, 5}
        restored.close()
    if ours:
        assert set(policy.core.class_counts()) == set(range(6))


def checkpoint_per_rank(rank, world, directory):
    """Each rank saves an Avalanche checkpoint of its own and resumes from it."""
    bench = tiny_benchmark()
    plugin = DistributedReplayPlugin(mem_size=30, batch_size_mem=4, seed=3, timeout=60)
    strategy = make_strategy(plugin)
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    shard, counters = plugin.storage_policy.state_dict(), plugin.state_dict(include_buffer=False)
    path = os.path.join(directory, f"ckpt-{rank}.pkl")
    if rank == 1:  # ranks pickle on their own, at different times: no collective inside
        import time
        time.sleep(1.0)
    save_checkpoint(strategy, path, exclude=EXCLUDE)
    plugin.close()

    fresh, _ = maybe_load_checkpoint(make_strategy(DistributedReplayPlugin(mem_size=30)), path)
    (restored,) = [p for p in fresh.plugins if isinstance(p, DistributedReplayPlugin)]
    policy = restored.storage_policy
    loaded_counters = restored.state_dict(include_buffer=False)
    core = policy.materialize(fresh.device)  # collective: every rank creates its shard
    loaded = core.state_dict()
    same_shard = torch.equal(loaded["rows"], shard["rows"]) and loaded["reservoir"] == shard["reservoir"]
    counters_kept = same(loaded_counters, counters)
    fresh.train(bench.train_stream[2])
    core = policy.core  # waits for the job train() leaves in flight (it runs collectives)
    out = {"same_shard": same_shard, "rank": core.rank, "world": core.world_size,
           "counters": counters_kept, "step": restored.pipeline.step,
           "saved_step": counters["pipeline"]["step"], "global": sum(core.global_counts().values()),
           "classes": sorted(restored.seen_classes)}
    restored.close()
    return out


@pytest.mark.timeout(180)
def test_avalanche_checkpoints_under_two_ranks_one_file_per_rank(tmp_path):
    results = run_ranks(checkpoint_per_rank, 2, str(tmp_path), timeout=150)
    for rank, r in enumerate(results):
        assert r["same_shard"] and r["counters"] and (r["rank"], r["world"]) == (rank, 2)
        # Avalanche gives each rank half of each experience: 40 samples, 3 steps of <= 16
        assert (r["saved_step"], r["step"]) == (6, 9) and r["global"] == 30
        assert r["classes"] == list(range(6))
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pkl")) == ["ckpt-0.pkl", "ckpt-1.pkl"]


# --------------------------------------------------------------------------- pickle, deepcopy
def round_trips(obj):
    return [pickle.loads(pickle.dumps(obj)), copy.deepcopy(obj)]


@pytest.mark.timeout(120)
def test_pickle_and_deepcopy_before_and_after_training_and_after_close():
    bench = tiny_benchmark()
    plugin = DistributedReplayPlugin(mem_size=30, batch_size_mem=4, seed=3,
                                     sampling="class_balanced")
    policy = plugin.storage_policy
    for obj in round_trips(plugin) + round_trips(policy):  # before any training
        copy_policy = obj if isinstance(obj, DistributedRehearsalBuffer) else obj.storage_policy
        assert copy_policy.max_size == 30 and copy_policy.sampling == "class_balanced"
        assert copy_policy.local_size() == 0 and copy_policy.pipeline is None
    plugin_copy, policy_copy = pickle.loads(pickle.dumps((plugin, policy)))
    assert plugin_copy.storage_policy is policy_copy  # shared references stay shared

    strategy = make_strategy(plugin)
    strategy.train(bench.train_stream[0])
    shard, step = policy.state_dict(), plugin.pipeline.step
    for obj in round_trips(plugin):
        assert obj.pipeline is None and obj is not plugin
        assert same(obj.state_dict(include_buffer=False), plugin.state_dict(include_buffer=False))
        assert_same_shard(obj.storage_policy.state_dict(), shard)
        assert_same_shard(obj.state_dict()["buffer"], shard)
    for obj in round_trips(policy):
        assert obj.pipeline is None and obj.local_size() == policy.local_size()
        assert_same_shard(obj.state_dict(), shard)
    # a copy trains on from the saved state, independently of the original
    clone = copy.deepcopy(plugin)
    other = make_strategy(clone)
    torch.manual_seed(5)  # the same data order for both
    strategy.train(bench.train_stream[1])  # the original goes on too
    torch.manual_seed(5)
    other.train(bench.train_stream[1])
    assert clone.pipeline.step == plugin.pipeline.step == step + 5
    assert_same_shard(clone.storage_policy.state_dict(), policy.state_dict())
    clone.close()

    step = plugin.pipeline.step
    shard = policy.state_dict()
    plugin.close()
    for obj in round_trips(plugin):  # a closed plugin still pickles, counters included
        assert obj.state_dict(include_buffer=False)["pipeline"]["step"] == step
        assert_same_shard(obj.storage_policy.state_dict(), shard)
    assert plugin.state_dict()["pipeline"]["step"] == step


def test_a_pickled_shard_refuses_another_rank_before_creating_anything():
    policy = DistributedRehearsalBuffer(20, seed=1)
    policy.materialize("cpu").insert(torch.randn(6, 3), torch.arange(6) % 3)
    state = policy.__getstate__()
    state["_pending_shard"] = dict(state["_pending_shard"], rank=1, world_size=2)
    moved = DistributedRehearsalBuffer.__new__(DistributedRehearsalBuffer)
    moved.__setstate__(state)
    with pytest.raises(ValueError, match=r"rank 1 of 2.*rank 0 of 1.*its own file"):
        moved.materialize("cpu")
    assert moved.pipeline is None and moved.local_size() == 6  # still pending, nothing created
    policy.close()
