"""The Avalanche integration: storage policy, plugin, strategies, online CL, end to end."""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from avalanche_distributed_rehearsal.app.data import digits_benchmark

avalanche = pytest.importorskip("avalanche")
from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.evaluation.metrics import accuracy_metrics  # noqa: E402
from avalanche.training import EWC, LwF, Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin  # noqa: E402

from avalanche_distributed_rehearsal import (DistributedRehearsalBuffer,  # noqa: E402
                                             DistributedReplayPlugin)

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def bench():
    return digits_benchmark()


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


class BatchRows(SupervisedPlugin):
    """Records the rows of every training and evaluation forward pass."""

    def __init__(self):
        super().__init__()
        self.train, self.eval = [], []

    def before_forward(self, strategy, **kwargs):
        self.train.append((int(strategy.mb_x.shape[0]), strategy.mb_y.clone()))

    def before_eval_forward(self, strategy, **kwargs):
        self.eval.append(int(strategy.mb_x.shape[0]))


def make(strategy_cls, plugins, epochs=1, **kwargs):
    model = mlp()
    return strategy_cls(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        train_mb_size=32, train_epochs=epochs, eval_mb_size=100,
                        plugins=plugins, evaluator=EvaluationPlugin(
                            accuracy_metrics(stream=True), loggers=[]), **kwargs)


def accuracy(strategy, stream):
    return strategy.eval(stream)["Top1_Acc_Stream/eval_phase/test_stream/Task000"]


def steps_of(exp, batch=32):
    return -(-len(exp.dataset) // batch)


def test_plugin_appends_past_representatives_and_leaves_eval_untouched(bench):
    rows = BatchRows()
    plugin = DistributedReplayPlugin(mem_size=100, batch_size_mem=8, num_candidates=16)
    strategy = make(Naive, [plugin, rows])
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    strategy.eval(bench.test_stream[:1])
    n0 = steps_of(bench.train_stream[0])
    first, second = rows.train[:n0], rows.train[n0:]
    # experience 0 introduces all its classes: nothing is replayed yet
    assert all(n <= 32 and set(y.tolist()) <= {0, 1} for n, y in first)
    # experience 1: every full batch gets r = 8 representatives, all of past classes
    assert [n for n, _ in second[:-1]] == [40] * (len(second) - 1)
    assert all(set(y[:32].tolist()) <= {2, 3} for _, y in second[:-1])
    rehearsed = torch.cat([y[32:] for _, y in second[:-1]])
    assert set(rehearsed.tolist()) == {0, 1}
    assert max(rows.eval) <= 100
    assert len(plugin.storage_policy.buffer) == 100
    assert plugin.seen_classes == {0, 1, 2, 3}
    plugin.close()


def test_replay_new_classes_replays_the_current_experience_too(bench):
    rows = BatchRows()
    plugin = DistributedReplayPlugin(mem_size=100, batch_size_mem=8, num_candidates=16,
                                     replay_new_classes=True)
    strategy = make(Naive, [plugin, rows])
    strategy.train(bench.train_stream[0])
    sizes = [n for n, _ in rows.train]
    # step i's candidates can be drawn from step i + 2 on (R_(i+1) is planned before they
    # enter the buffer): nothing to replay at steps 0 and 1
    assert sizes[:2] == [32, 32], "empty buffer at the first two steps"
    assert sizes[2:-1] == [40] * (len(sizes) - 3)
    assert set(torch.cat([y[32:] for _, y in rows.train[2:]]).tolist()) == {0, 1}
    plugin.close()


def test_candidates_are_offered_in_the_first_epoch_only(bench):
    plugin = DistributedReplayPlugin(mem_size=1000, batch_size_mem=4)
    strategy = make(Naive, [plugin], epochs=3)
    exp = bench.train_stream[0]
    strategy.train(exp)
    core = plugin.storage_policy.core
    assert sum(core.reservoir.seen.values()) == len(exp.dataset)  # each sample offered once
    stored = core.local_tensors()["input"]
    assert len(core) == len(exp.dataset)
    assert torch.unique(stored, dim=0).shape[0] == len(exp.dataset)  # no sample stored twice
    plugin.close()


def test_replay_beats_incremental_and_works_with_ewc_and_lwf(bench):
    def run(strategy_cls, with_replay, **kwargs):
        plugin = DistributedReplayPlugin(mem_size=200, batch_size_mem=16) if with_replay else None
        strategy = make(strategy_cls, [plugin] if plugin else [], epochs=6, **kwargs)
        for exp in bench.train_stream:
            strategy.train(exp)
        acc = accuracy(strategy, bench.test_stream)
        if plugin:
            plugin.close()
        return acc

    incremental = run(Naive, False)
    replay = run(Naive, True)
    ewc = run(EWC, True, ewc_lambda=0.4, criterion=torch.nn.CrossEntropyLoss())
    lwf = run(LwF, True, alpha=0.5, temperature=2.0, criterion=torch.nn.CrossEntropyLoss())
    assert incremental < 0.3
    assert replay > incremental + 0.3
    assert ewc > incremental + 0.3 and lwf > incremental + 0.3


def test_survives_periodic_evaluation_inside_training(bench):
    rows = BatchRows()
    plugin = DistributedReplayPlugin(mem_size=60, batch_size_mem=4)
    strategy = make(Naive, [plugin, rows], epochs=2, eval_every=1)
    for exp in bench.train_stream[:2]:
        strategy.train(exp, eval_streams=[bench.test_stream[:1]])
    assert rows.eval, "periodic evaluation ran"
    assert max(rows.eval) <= 100 and max(n for n, _ in rows.train) == 36
    assert plugin.storage_policy.local_size() == 60
    plugin.close()


def worker_threads():
    return [t for t in threading.enumerate() if t.name.startswith("rehearsal-worker")]


def test_online_continual_learning_pays_no_start_up_per_train_call(bench):
    from avalanche.benchmarks.scenarios.online import split_online_stream

    before = len(worker_threads())
    plugin = DistributedReplayPlugin(mem_size=50, batch_size_mem=4, num_candidates=8)
    strategy = make(Naive, [plugin])
    online = split_online_stream(bench.train_stream[:2], experience_size=32, seed=0)
    calls = 0
    worker, threads = None, set()
    for exp in online:
        strategy.train(exp)
        calls += 1
        if worker is None:
            worker = plugin.pipeline.worker
        assert plugin.pipeline.worker is worker
        assert len(worker_threads()) <= before + 1
        threads.update(worker_threads())
    # auto's warm-up runs inline; its first probe starts the one thread, which stays
    assert len(threads) == before + 1 and len(worker_threads()) == before + 1
    assert calls > 10 and plugin.pipeline.step == calls
    assert plugin.storage_policy.local_size() == 50
    plugin.close()
    assert len(worker_threads()) == before


def test_storage_policy_with_the_stock_replay_plugin(bench):
    policy = DistributedRehearsalBuffer(max_size=80, sampling="class_balanced")
    rows = BatchRows()
    strategy = make(Naive, [ReplayPlugin(mem_size=80, batch_size_mem=16, storage_policy=policy), rows])
    strategy.train(bench.train_stream[0])
    assert len(policy.buffer) == 80
    assert policy.core.class_counts() == {0: 40, 1: 40}
    strategy.train(bench.train_stream[1])
    assert policy.core.class_counts() == {0: 20, 1: 20, 2: 20, 3: 20}
    data = policy.buffer
    assert sorted(set(data.targets)) == [0, 1, 2, 3]
    assert len(data.targets_task_labels) == 80
    assert max(n for n, _ in rows.train) == 48, "ReplayDataLoader appended buffer samples"
    policy.close()


def test_update_and_resize(bench):
    policy = DistributedRehearsalBuffer(max_size=50)
    strategy = make(Naive, [])
    strategy.experience = bench.train_stream[0]
    policy.update(strategy)
    assert policy.local_size() == 50
    policy.resize(strategy, 20)
    assert policy.max_size == 20 and policy.local_size() == 20
    assert set(policy.core.class_counts().values()) == {10}
    policy.resize(strategy, 70)
    assert policy.local_size() == 20 and policy.core.local_capacity == 70
    policy.post_adapt(strategy, bench.train_stream[1])
    assert policy.local_size() == 70
    with pytest.raises(ValueError, match="new_size"):
        policy.resize(strategy, 0)
    with pytest.raises(AttributeError, match="read-only"):
        policy.buffer = None
    policy.close()


def test_resize_between_experiences_keeps_training_consistent(bench):
    plugin = DistributedReplayPlugin(mem_size=60, batch_size_mem=8)
    strategy = make(Naive, [plugin])
    strategy.train(bench.train_stream[0])
    plugin.storage_policy.resize(strategy, 30)
    strategy.train(bench.train_stream[1])
    assert plugin.storage_policy.local_size() == 30
    plugin.close()


@pytest.mark.parametrize("kwargs, match", [
    (dict(mem_size=0), "mem_size"),
    (dict(mem_size=10, batch_size_mem=-1), "batch_size_mem"),
    (dict(mem_size=10, num_candidates=-2), "num_candidates"),
    (dict(mem_size=10, sampling="weird"), "sampling"),
    (dict(mem_size=10, async_mode="yes"), "async_mode"),
    (dict(mem_size=10, storage_policy=DistributedRehearsalBuffer(20)), "max_size"),
    (dict(mem_size=10, timeout=0), "timeout"),
])
def test_bad_plugin_arguments_are_rejected(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DistributedReplayPlugin(**kwargs)


def test_minibatch_entries_the_buffer_does_not_store_pass_through(bench):
    seen = {}

    class ExtraField(SupervisedPlugin):
        def before_training_iteration(self, strategy, **kwargs):
            strategy.mbatch = list(strategy.mbatch) + [torch.full((len(strategy.mb_x),), 7.0)]

        def before_forward(self, strategy, **kwargs):
            seen["rows"] = [len(v) for v in strategy.mbatch]

    plugin = DistributedReplayPlugin(mem_size=20, batch_size_mem=4)
    strategy = make(Naive, [ExtraField(), plugin])
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    plugin.close()
    b = seen["rows"][3]
    assert seen["rows"][:3] == [b + 4] * 3, "stored entries gain the representatives"
    assert sorted(plugin.storage_policy.core.layout.fields) == ["input", "label", "task"]


class DictNaive(Naive):
    """A strategy whose mini-batches are dictionaries (as custom Avalanche strategies use)."""

    def _unpack_minibatch(self):
        super()._unpack_minibatch()
        x, y, t = self.mbatch
        self.mbatch = {"pixels": x, "labels": y, "task_labels": t,
                       "weight": torch.ones(len(y)), "note": "not a tensor"}

    @property
    def mb_x(self):
        return self.mbatch["pixels"]

    @property
    def mb_y(self):
        return self.mbatch["labels"]

    @property
    def mb_task_id(self):
        return self.mbatch["task_labels"]


@pytest.mark.parametrize("fields", [None, {"input": "pixels", "label": "labels",
                                           "task": "task_labels"}])
def test_dictionary_minibatches(bench, fields):
    seen = {}

    class Spy(SupervisedPlugin):
        def before_forward(self, strategy, **kwargs):
            seen["rows"] = {k: len(v) for k, v in strategy.mbatch.items()}

    plugin = DistributedReplayPlugin(mem_size=30, batch_size_mem=5, fields=fields)
    strategy = make(DictNaive, [plugin, Spy()])
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    plugin.close()
    stored = set(plugin.storage_policy.core.layout.fields)
    if fields is None:  # every per-sample tensor is stored, under its key (roles renamed)
        assert stored == {"pixels", "label", "task", "weight"}
        assert seen["rows"]["weight"] == seen["rows"]["pixels"]
    else:  # the weight is not stored: it passes through with the stream's rows only
        assert stored == {"input", "label", "task"}
        assert seen["rows"]["weight"] == seen["rows"]["pixels"] - 5
    assert seen["rows"]["labels"] == seen["rows"]["pixels"]
    assert seen["rows"]["note"] == len("not a tensor")  # non-tensor entries untouched


def test_dictionary_minibatch_missing_a_field_is_refused_before_anything_is_stored(bench):
    plugin = DistributedReplayPlugin(mem_size=30, batch_size_mem=5,
                                     fields={"input": "pixels", "label": "no-such-key"})
    strategy = make(DictNaive, [plugin])
    with pytest.raises(ValueError, match="no entry 'no-such-key' for field 'label'"):
        strategy.train(bench.train_stream[0])
    core = plugin.storage_policy.core
    assert core is None or len(core) == 0
    plugin.close()


def test_post_adapt_inserts_dictionary_samples():
    from types import SimpleNamespace

    samples = [{"x": torch.full((3,), float(i)), "label": i % 2} for i in range(10)]
    policy = DistributedRehearsalBuffer(6)
    policy.post_adapt(SimpleNamespace(device="cpu"), SimpleNamespace(dataset=samples))
    core = policy.core
    assert len(core) == 6 and set(core.layout.fields) == {"x", "label"}
    assert core.class_counts() == {0: 3, 1: 3}
    policy.close()


def run_e2e(tmp_path, nproc, *extra):
    out = tmp_path / f"out{nproc}{''.join(extra)}"
    script = os.path.join(HERE, "..", "examples", "digits_replay.py")
    if nproc == 1:
        cmd = [sys.executable, script, "--out", str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--standalone", script, "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.load(open(out / f"rank{r}.json")) for r in range(nproc)]


@pytest.mark.timeout(300)
def test_end_to_end_one_process(tmp_path):
    (res,) = run_e2e(tmp_path, 1)  # the main job's settings: it reaches the main job's accuracy
    assert res["accuracy"] > 0.85
    assert res["local_size"] == 200 and sum(res["global_counts"]) == 200
    assert res["max_rows"] == 16 + 32


@pytest.mark.timeout(400)
def test_end_to_end_two_ranks_async_equals_sync(tmp_path):
    results = run_e2e(tmp_path, 2)
    sync = run_e2e(tmp_path, 2, "--sync")
    for res in results:
        assert res["world"] == 2 and res["ddp"] == "DistributedDataParallel"
        assert res["local_size"] == res["local_capacity"] == 100
        assert sum(res["global_counts"]) == 200 and set(res["global_counts"]) == {20}
        assert res["max_rows"] == 16 + 32
        assert res["accuracy"] > 0.8  # on the whole test set, the same on every rank
    assert results[0]["accuracy"] == results[1]["accuracy"]
    assert results[0]["steps"] == results[1]["steps"]
    assert [r["accuracy"] for r in results] == [r["accuracy"] for r in sync]


def test_plugin_state_dict_round_trip_and_bad_state(bench):
    plugin = DistributedReplayPlugin(mem_size=60, batch_size_mem=4, seed=3)
    strategy = make(Naive, [plugin])
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    state = plugin.state_dict()
    assert state["pipeline"]["step"] == plugin.pipeline.step and state["seen_classes"] == [0, 1, 2, 3]
    rows = state["buffer"]["rows"].clone()

    restored = DistributedReplayPlugin(mem_size=60, batch_size_mem=4, seed=3)
    for bad in ({"pipeline": {}}, {"pipeline": {}, "seen_classes": [-1]},
                {"pipeline": {"step": "3"}, "seen_classes": []}):
        with pytest.raises(ValueError, match="state"):
            restored.load_state_dict(bad)
    restored.load_state_dict(state)  # no strategy yet: applied at the first step
    other = make(Naive, [restored])
    other.model.load_state_dict(strategy.model.state_dict())
    restored.before_training(other)  # what train() calls first
    assert torch.equal(restored.storage_policy.core.state_dict()["rows"], rows)
    assert restored.pipeline.step == state["pipeline"]["step"] and restored.seen_classes == {0, 1, 2, 3}
    # both continue identically on the next experience
    for s in (strategy, other):
        s.optimizer = torch.optim.SGD(s.model.parameters(), lr=0.1)
        torch.manual_seed(7)  # the data loader's shuffling
        s.train(bench.train_stream[2])
    assert torch.equal(torch.cat([p.flatten() for p in strategy.model.parameters()]),
                       torch.cat([p.flatten() for p in other.model.parameters()]))
    plugin.close()
    restored.close()


def test_the_job_in_flight_outlives_train_and_readers_wait_for_it(bench):
    plugin = DistributedReplayPlugin(mem_size=60, batch_size_mem=4, num_candidates=8,
                                     async_mode=True)  # auto's last step may be inline
    strategy = make(Naive, [plugin])
    strategy.train(bench.train_stream[0])
    pipeline = plugin.pipeline
    assert pipeline._pending is not None  # next step's representatives, still in the works
    core = plugin.storage_policy.core  # waits for it
    assert pipeline._pending is None and pipeline._ready is not None
    assert sum(core.reservoir.seen.values()) == 8 * steps_of(bench.train_stream[0])
    plugin.close()
