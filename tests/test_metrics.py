"""Buffer metrics: values (not just presence), on one process and on two gloo ranks."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

# Avalanche must be imported before a process group exists (it creates a logger at import
# time and refuses to on non-main ranks): spawned ranks import this module first.
import avalanche.training  # noqa: F401
from avalanche.logging import BaseLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from avalanche.training.supervised import Naive

from avalanche_distributed_rehearsal.app.data import load_digits, make_benchmark
from avalanche_distributed_rehearsal.integration import (DistributedRehearsalBuffer,
                                                         DistributedReplayPlugin)
from avalanche_distributed_rehearsal.integration.metrics import (
    BufferClassCounts, BufferSize, ExchangedBytes, RepresentativesPerStep, WorkerWaitTime,
    buffer_metrics)

from dist_harness import run_ranks


class RecordingLogger(BaseLogger):
    """Keeps every (name, value, x) it is given, in order."""

    def __init__(self):
        super().__init__()
        self.values = []

    def log_single_metric(self, name, value, x_plot):
        self.values.append((name, value, x_plot))


def _benchmark(n_experiences=2, classes=4):
    train, test, _ = load_digits(0)
    keep = [i for i, y in enumerate(train.targets) if y < classes]
    x, y = train.tensors[0][keep], train.tensors[1][keep]
    tr = torch.utils.data.TensorDataset(x, y)
    tr.targets = y.tolist()
    keep = [i for i, y in enumerate(test.targets) if y < classes]
    te = torch.utils.data.TensorDataset(test.tensors[0][keep], test.tensors[1][keep])
    te.targets = te.tensors[1].tolist()
    return make_benchmark(tr, te, classes, n_experiences, 0)


def _strategy(plugins, metrics, loggers, mb=16):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(*metrics, loggers=loggers)
    return Naive(model, torch.optim.SGD(model.parameters(), lr=0.05), torch.nn.CrossEntropyLoss(),
                 train_mb_size=mb, train_epochs=1, device="cpu", plugins=plugins,
                 evaluator=evaluator, eval_every=-1)


def _by_name(values, prefix):
    return [(n, v, x) for n, v, x in values if n.startswith(prefix)]


@pytest.mark.parametrize("async_mode", [True, False])
def test_single_process_values(async_mode):
    mem, r = 40, 6
    plugin = DistributedReplayPlugin(mem_size=mem, batch_size_mem=r, async_mode=async_mode, seed=3,
                                     replay_new_classes=True)  # d = min(r, whole buffer)
    logger = RecordingLogger()
    metrics = buffer_metrics("iteration") + buffer_metrics("experience")
    strategy = _strategy([plugin], metrics, [logger])
    bm = _benchmark()
    finals = []
    try:
        for exp in bm.train_stream:
            strategy.train(exp, eval_streams=[])
            core = plugin.storage_policy.core
            finals.append((len(core), core.class_counts(), strategy.clock.train_iterations))
        row_bytes = core.storage.layout.row_bytes
    finally:
        plugin.close()
    vals = logger.values
    # --- per experience: sizes and class counts equal the shard (world 1: global == local)
    for prefix in ("Buffer_GlobalSize_Exp", "Buffer_LocalSize_Exp"):
        got = _by_name(vals, prefix)
        assert [(v, x) for _, v, x in got] == [(n, it) for n, _, it in finals]
    for prefix in ("Buffer_GlobalClassCount_Exp", "Buffer_LocalClassCount_Exp"):
        got = _by_name(vals, prefix)
        for (n, counts, it) in finals:
            at = {int(name.rsplit("Class", 1)[1]): v for name, v, x in got if x == it}
            assert at == counts
    assert finals[-1][0] == mem  # 4 classes x ~100 samples offered: the buffer is full
    assert set(finals[-1][1]) == {0, 1, 2, 3}
    # --- per step
    reps = [v for _, v, _ in _by_name(vals, "Buffer_Representatives_MB")]
    sizes = [v for _, v, _ in _by_name(vals, "Buffer_GlobalSize_MB")]
    steps = finals[-1][2]
    assert len(reps) == len(sizes) == steps
    assert reps[0] == 0 and sizes[0] == 0  # step 0 draws from the empty buffer
    assert reps == [min(r, s) for s in sizes]  # d = min(r, buffer size at the draw)
    # step i's draw is planned before step i - 1's candidates enter: step 2 sees step 0's 16
    assert sizes == sorted(sizes) and sizes[1] == 0 and sizes[2] == 16
    sent = [v for n, v, _ in _by_name(vals, "Buffer_ExchangedBytes_MB") if n.endswith("/Sent")]
    recv = [v for n, v, _ in _by_name(vals, "Buffer_ExchangedBytes_MB") if n.endswith("/Received")]
    assert len(sent) == len(recv) == steps
    assert sent == recv  # one rank talks to itself
    # one rank: no metadata to agree on; the payload is the d records it "sends" itself
    assert recv == [d * row_bytes for d in reps] and recv[0] == 0
    # --- per experience summaries agree with the per-step values
    waits_mb = _by_name(vals, "Buffer_WaitSeconds_MB")
    waits_exp = _by_name(vals, "Buffer_WaitSeconds_Exp")
    reps_exp = [v for _, v, _ in _by_name(vals, "Buffer_Representatives_Exp")]
    bounds = [0] + [it for _, _, it in finals]
    for e in range(len(finals)):
        in_exp = [v for _, v, x in waits_mb if bounds[e] <= x < bounds[e + 1]]  # x: steps before
        assert all(v >= 0 for v in in_exp)
        assert waits_exp[e][1] == pytest.approx(sum(in_exp))
        per_step = reps[bounds[e]:bounds[e + 1]]
        assert reps_exp[e] == pytest.approx(sum(per_step) / len(per_step))
    # --- result() holds the last value
    size_metric = next(m for m in metrics if isinstance(m, BufferSize) and m.every == "experience")
    assert size_metric.result() == finals[-1][0]
    counts_metric = next(m for m in metrics if isinstance(m, BufferClassCounts)
                         and m.every == "experience" and m.scope == "local")
    assert counts_metric.result() == finals[-1][1]


def test_text_logger_receives_buffer_metrics():
    plugin = DistributedReplayPlugin(mem_size=20, batch_size_mem=4, seed=0)
    out = io.StringIO()
    strategy = _strategy([plugin], buffer_metrics("epoch"), [TextLogger(out)])
    strategy.train_epochs = 2
    try:
        strategy.train(_benchmark().train_stream[0], eval_streams=[])
    finally:
        plugin.close()
    text = out.getvalue()
    # printed after each epoch; at the end of epoch 2 the buffer (20) is full, balanced
    assert text.count("Buffer_GlobalSize_Epoch/train_phase/train_stream = ") == 2
    assert "Buffer_GlobalSize_Epoch/train_phase/train_stream = 20" in text
    assert "Buffer_LocalClassCount_Epoch/train_phase/train_stream/Class0 = 10" in text
    assert "Buffer_Representatives_Epoch/train_phase/train_stream = " in text
    assert "Buffer_ExchangedBytes_Epoch/train_phase/train_stream/Received" in text


def test_stock_replay_plugin_with_our_buffer_single_process():
    policy = DistributedRehearsalBuffer(30, seed=0)
    logger = RecordingLogger()
    strategy = _strategy([ReplayPlugin(mem_size=30, storage_policy=policy)],
                         buffer_metrics("experience"), [logger])
    try:
        for exp in _benchmark().train_stream:
            strategy.train(exp, eval_streams=[])
        counts = policy.core.class_counts()
    finally:
        policy.close()
    assert _by_name(logger.values, "Buffer_GlobalSize_Exp")[-1][1] == 30 == sum(counts.values())
    assert not _by_name(logger.values, "Buffer_Representatives")  # no per-step draws


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="every"):
        BufferSize(every="batch")
    with pytest.raises(ValueError, match="scope"):
        BufferClassCounts(scope="world")
    with pytest.raises(TypeError, match="buffer"):
        RepresentativesPerStep(buffer=object())
    with pytest.raises(ValueError, match="every"):
        buffer_metrics(every="step")
    assert str(WorkerWaitTime("iteration")) == "Buffer_WaitSeconds_MB"
    assert str(ExchangedBytes("experience")) == "Buffer_ExchangedBytes_Exp"
    assert str(BufferSize("local", "epoch")) == "Buffer_LocalSize_Epoch"


# ---------------------------------------------------------------------- two ranks
def _collected(evaluator):
    """Every value the evaluator collected, as (name, value, x) ordered by x then name."""
    out = [(name, v, x) for name, (xs, vs) in evaluator.get_all_metrics().items()
           for x, v in zip(xs, vs)]
    return sorted(out, key=lambda t: (t[2], t[0]))


def _two_rank_job(rank, world, use_plugin):
    torch.set_num_threads(1)
    mem = 50
    # Avalanche forbids creating loggers on non-main ranks: read the evaluator instead.
    metrics = buffer_metrics("experience") + [BufferSize("global", "iteration")]
    if use_plugin:
        plugin = DistributedReplayPlugin(mem_size=mem, batch_size_mem=5, seed=1)
        policy = plugin.storage_policy
    else:
        policy = DistributedRehearsalBuffer(mem, seed=1)
        plugin = ReplayPlugin(mem_size=mem, storage_policy=policy)
    strategy = _strategy([plugin], metrics, [], mb=8)
    out = []
    try:
        for exp in _benchmark().train_stream:  # Avalanche shards each experience over ranks
            strategy.train(exp, eval_streams=[])
            core = policy.core
            out.append({"local": len(core), "local_counts": core.class_counts(),
                        "steps": strategy.clock.train_iterations})
    finally:
        policy.close()
    return {"finals": out, "values": _collected(strategy.evaluator)}


def _both_two_rank_jobs(rank, world):
    return {use_plugin: _two_rank_job(rank, world, use_plugin) for use_plugin in (True, False)}


@pytest.fixture(scope="module")
def two_rank_jobs():
    """Both variants, one after the other in the same two ranks (one launch)."""
    return run_ranks(_both_two_rank_jobs, 2, timeout=200)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("use_plugin", [True, False])
def test_two_ranks_global_values_match_the_shards(two_rank_jobs, use_plugin):
    res = [r[use_plugin] for r in two_rank_jobs]
    n_exp = len(res[0]["finals"])
    for e in range(n_exp):
        local = [r["finals"][e]["local"] for r in res]
        total_counts = {}
        for r in res:
            for c, n in r["finals"][e]["local_counts"].items():
                total_counts[c] = total_counts.get(c, 0) + n
        for rank, r in enumerate(res):
            glob = _by_name(r["values"], "Buffer_GlobalSize_Exp")[e][1]
            loc = _by_name(r["values"], "Buffer_LocalSize_Exp")[e][1]
            assert glob == sum(local)  # the same on every rank
            assert loc == local[rank]
            x = r["finals"][e]["steps"]
            gcounts = {int(n.rsplit("Class", 1)[1]): v
                       for n, v, xx in _by_name(r["values"], "Buffer_GlobalClassCount_Exp") if xx == x}
            assert gcounts == total_counts
    assert sum(r["finals"][-1]["local"] for r in res) == 50
    assert res[0]["finals"][-1]["steps"] == res[1]["finals"][-1]["steps"]
    if use_plugin:  # per-step global sizes agree across ranks and grow
        per_step = [[v for _, v, _ in _by_name(r["values"], "Buffer_GlobalSize_MB")] for r in res]
        assert per_step[0] == per_step[1] and per_step[0][-1] == 50
        assert per_step[0][1] == 0 and per_step[0][2] == 16  # step 0's 8 + 8, drawn from step 2
