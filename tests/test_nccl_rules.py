"""The GPU path's collective rules, tested on CPU.

A default process group of backend ``"cuda:gloo"`` serves only CUDA tensors and refuses
CPU tensors exactly as NCCL does, so every collective the package makes with a CPU tensor
on the wrong group fails here as it would on a GPU cluster. Device payloads (NCCL) must
be launched from the training thread: checked with an exchange that records which
thread launched each collective.
"""

import threading

import pytest
import torch

from dist_harness import run_ranks
from sim_world import run_threads

pytestmark = pytest.mark.timeout(300)
AVALANCHE = ("avalanche.training",)  # imported before the process group exists


def batches(rank, steps, b=12, classes=5, shape=(3,)):
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        yield torch.randn((b,) + shape, generator=g), torch.randint(0, classes, (b,), generator=g)


# --------------------------------------------------------------------------- core
def core_under_cuda_only_default(rank, world, tmp):
    import torch.distributed as dist

    from avalanche_distributed_rehearsal.core import RehearsalPipeline, ShardedRehearsalBuffer
    from avalanche_distributed_rehearsal.core.checkpoint import (load_buffer_checkpoint,
                                                                 save_buffer_checkpoint)

    try:
        dist.all_reduce(torch.ones(1))
        refused = False
    except RuntimeError:
        refused = True
    out = {"refused": refused}
    for sampling in ("uniform", "class_balanced", "local"):
        buf = ShardedRehearsalBuffer(40, sampling=sampling, seed=1)
        pipe = RehearsalPipeline(buf, batch_size_mem=4, num_candidates=6)
        rows = [pipe.augment(x, y)[0].shape[0] for x, y in batches(rank, 15)]
        pipe.close()
        save_buffer_checkpoint(buf, f"{tmp}/{sampling}", step=15)  # barriers
        buf.resize(30)
        load_buffer_checkpoint(buf, f"{tmp}/{sampling}")  # elastic path: 40 -> 30
        out[sampling] = (rows[-1], buf.global_counts(), len(buf))
        buf.close()
    return out


def test_buffer_collectives_work_when_the_default_group_refuses_cpu_tensors(tmp_path):
    results = run_ranks(core_under_cuda_only_default, 2, str(tmp_path), backend="cuda:gloo")
    for res in results:
        assert res["refused"], "the simulation must refuse CPU tensors on the default group"
        for sampling in ("uniform", "class_balanced", "local"):
            rows, counts, size = res[sampling]
            assert rows == 12 + 4
            assert sum(counts.values()) == 30
    assert results[0]["uniform"][1] == results[1]["uniform"][1]


def metadata_beside_a_cuda_only_payload_group(rank, world):
    """The layout of a CUDA shard's groups (payload on a group that refuses CPU tensors):
    every metadata collective still runs. Nothing is drawn (r = 0): the payload itself
    would need CUDA tensors."""
    from avalanche_distributed_rehearsal.core import (ProcessGroupExchange, RehearsalPipeline,
                                                      ShardedRehearsalBuffer, serves)

    exchange = ProcessGroupExchange("cpu", payload_backend="cuda:gloo")
    assert not serves(exchange.payload_group, "cpu") and serves(exchange.meta_group, "cpu")
    buf = ShardedRehearsalBuffer(40, seed=2, exchange=exchange)
    pipe = RehearsalPipeline(buf, batch_size_mem=0, num_candidates=6)
    # insert() is collective; rank 1 offers nothing and learns the sample layout from
    # rank 0 (an object all-gather on the metadata group)
    buf.insert(torch.randn(3, 3), torch.tensor([0, 1, 2])) if rank == 0 else buf.insert(None)
    for x, y in batches(rank, 10):
        pipe.augment(x, y)
    pipe.close()
    counts = buf.global_counts()
    buf.close()
    return sum(counts.values())


def test_metadata_never_travels_on_the_payload_group_of_a_cuda_shard():
    assert run_ranks(metadata_beside_a_cuda_only_payload_group, 2) == [40, 40]


# --------------------------------------------------------------------------- integration
def integration_under_cuda_only_default(rank, world, stock):
    import warnings

    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
    from avalanche.training.supervised import Naive

    from avalanche_distributed_rehearsal.app.data import load_digits, make_benchmark
    from avalanche_distributed_rehearsal.integration import (DistributedRehearsalBuffer,
                                                             DistributedReplayPlugin)
    from avalanche_distributed_rehearsal.integration.metrics import buffer_metrics

    warnings.simplefilter("ignore")
    train, test, n = load_digits(0)
    bench = make_benchmark(train, test, n, 5, 0)
    if stock:
        policy = DistributedRehearsalBuffer(100)
        plugin = ReplayPlugin(mem_size=100, batch_size_mem=8, storage_policy=policy)
    else:
        plugin = DistributedReplayPlugin(mem_size=100, batch_size_mem=8)
        policy = plugin.storage_policy
    metrics = buffer_metrics("experience")
    evaluator = EvaluationPlugin(*metrics, loggers=[])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     train_mb_size=16, train_epochs=1, plugins=[plugin], evaluator=evaluator,
                     eval_every=-1)
    for exp in bench.train_stream[:2]:
        strategy.train(exp, eval_streams=[], num_workers=0)
    size = next(m for m in metrics if type(m).__name__ == "BufferSize" and m.scope == "global")
    value = size.result()
    policy.close()
    return value


def integration_with_both_plugins(rank, world):
    return {stock: integration_under_cuda_only_default(rank, world, stock) for stock in (False, True)}


@pytest.fixture(scope="module")
def sizes_under_cuda_only_default():
    """Both plugins, one after the other in the same two ranks (one launch)."""
    return run_ranks(integration_with_both_plugins, 2, backend="cuda:gloo", preimport=AVALANCHE,
                     timeout=240)


@pytest.mark.parametrize("stock", [False, True], ids=["our-plugin", "stock-replay-plugin"])
def test_plugin_and_metrics_work_when_the_default_group_refuses_cpu_tensors(
        sizes_under_cuda_only_default, stock):
    sizes = [r[stock] for r in sizes_under_cuda_only_default]
    assert sizes[0] == sizes[1] and 0 < sizes[0] <= 100


# --------------------------------------------------------------------------- device payload
def pipeline_with_device_payload(rank, world, sim, async_mode):
    from avalanche_distributed_rehearsal.core import RehearsalPipeline, ShardedRehearsalBuffer

    exchange = sim.exchange(rank)
    exchange.device_payload = True  # as for a CUDA shard: the payload is an NCCL collective
    buf = ShardedRehearsalBuffer(50, sampling="class_balanced", seed=9, exchange=exchange)
    pipe = RehearsalPipeline(buf, batch_size_mem=5, num_candidates=7, async_mode=async_mode)
    outs = []
    launches = []
    for step, (x, y) in enumerate(batches(rank, 25)):
        before = len(exchange.calls)
        outs.append(pipe.augment(x, y))
        # the step's payload collective ran inside augment(), before it returned
        launches.append([c for c in exchange.calls[before:] if c[0] == "all_to_all"])
    pipe.close()
    fields = {k: v.clone() for k, v in buf.local_tensors().items()}
    return {"outs": outs, "fields": fields, "calls": list(exchange.calls), "launches": launches,
            "training_thread": threading.current_thread().name}


def test_device_payload_is_launched_by_the_training_thread_at_each_step():
    a = run_threads(pipeline_with_device_payload, 2, True)
    s = run_threads(pipeline_with_device_payload, 2, False)
    for rank in range(2):
        me = a[rank]["training_thread"]
        payload_threads = {t for name, t in a[rank]["calls"] if name == "all_to_all"}
        meta_threads = {t for name, t in a[rank]["calls"] if name == "all_gather"}
        assert payload_threads == {me}, "device collectives come from the training thread only"
        assert any(t.startswith("rehearsal-worker") for t in meta_threads), \
            "metadata is gathered in the background"
        assert all(len(launch) <= 1 for launch in a[rank]["launches"])
        assert sum(len(launch) for launch in a[rank]["launches"]) >= 20
        # the same shards and batches as the synchronous mode, bit for bit
        for (xa, ya, ta), (xs, ys, ts) in zip(a[rank]["outs"], s[rank]["outs"]):
            assert torch.equal(xa, xs) and torch.equal(ya, ys) and torch.equal(ta, ts)
        for key in a[rank]["fields"]:
            assert torch.equal(a[rank]["fields"][key], s[rank]["fields"][key])
    # the launch order is the same on every rank: one payload per step, step by step
    assert [len(x) for x in a[0]["launches"]] == [len(x) for x in a[1]["launches"]]


def payload_group_of_its_own(rank, world, async_mode):
    from avalanche_distributed_rehearsal.core import (ProcessGroupExchange, RehearsalPipeline,
                                                      ShardedRehearsalBuffer)

    exchange = ProcessGroupExchange("cpu", payload_backend="gloo")  # launched like NCCL's
    assert exchange.device_payload and exchange.payload_group is not exchange.meta_group
    buf = ShardedRehearsalBuffer(50, seed=4, exchange=exchange)
    pipe = RehearsalPipeline(buf, batch_size_mem=5, num_candidates=7, async_mode=async_mode)
    outs = [pipe.augment(x, y) for x, y in batches(rank, 20)]
    pipe.close()
    buf.close()
    return outs


def test_device_payload_mode_over_real_process_groups_equals_sync():
    a = run_ranks(payload_group_of_its_own, 2, True)
    s = run_ranks(payload_group_of_its_own, 2, False)
    for rank in range(2):
        for (xa, ya, _), (xs, ys, _) in zip(a[rank], s[rank]):
            assert torch.equal(xa, xs) and torch.equal(ya, ys)
        assert a[rank][-1][0].shape[0] == 12 + 5


# --------------------------------------------------------------------------- timeouts
def timeouts(rank, world):
    from avalanche_distributed_rehearsal.core import (RehearsalPipeline, ShardedRehearsalBuffer,
                                                      process_group_timeout)

    buf = ShardedRehearsalBuffer(20)
    pipe = RehearsalPipeline(buf)
    values = (process_group_timeout(), buf.exchange.timeout,
              process_group_timeout(buf.exchange.meta_group), pipe.worker.timeout)
    pipe.close()
    buf.close()
    return values


def test_timeouts_default_to_the_process_groups():
    results = run_ranks(timeouts, 2, group_timeout=77)
    assert results == [(77.0, 77.0, 77.0, 77.0)] * 2


def test_timeouts_without_a_process_group_are_torchs_default():
    import torch.distributed as dist

    from avalanche_distributed_rehearsal.core import (BackgroundWorker, RehearsalPipeline,
                                                      ShardedRehearsalBuffer)

    default = dist.default_pg_timeout.total_seconds()
    pipe = RehearsalPipeline(ShardedRehearsalBuffer(8))
    assert pipe.worker.timeout == default == BackgroundWorker().timeout
    pipe.close()
