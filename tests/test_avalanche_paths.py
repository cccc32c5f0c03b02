"""Avalanche paths the docs promise: the stock ReplayPlugin with our storage policy on
dictionary samples, budget errors that name the argument passed, and EWC, LwF and
OnlineNaive (online) with the plugin on 1 and 2 ranks."""

import warnings

import pytest
import torch
from torch.utils.data import Dataset

pytest.importorskip("avalanche")
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets  # noqa: E402
from avalanche.benchmarks.utils import AvalancheDataset, DataAttribute  # noqa: E402
from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin  # noqa: E402

from avalanche_distributed_rehearsal import (DistributedDER, DistributedERACE,  # noqa: E402
                                             DistributedRehearsalBuffer, DistributedReplayPlugin)
from avalanche_distributed_rehearsal.app.data import digits_benchmark  # noqa: E402
from dist_harness import run_ranks  # noqa: E402

pytestmark = pytest.mark.timeout(240)


# ---------------------------------------------------------------- dictionary samples
class DictSamples(Dataset):
    """Samples as dictionaries (an int label, as many datasets give it)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixels": self.x[i], "label": int(self.y[i]), "weight": torch.tensor(1.0)}


def dict_benchmark():
    g = torch.Generator().manual_seed(0)
    experiences = []
    for e in range(2):
        y = torch.arange(100) % 2 + 2 * e
        x = torch.randn(100, 5, generator=g) + y[:, None].float()
        experiences.append(AvalancheDataset([DictSamples(x, y)], data_attributes=[
            DataAttribute(y.tolist(), "targets"), DataAttribute([0] * 100, "targets_task_labels")]))
    return benchmark_from_datasets(train=experiences, test=experiences)


class DictNaive(Naive):
    """Naive over dictionary mini-batches."""

    def _unpack_minibatch(self):
        self.mbatch = {k: v.to(self.device) for k, v in self.mbatch.items()}

    @property
    def mb_x(self):
        return self.mbatch["pixels"]

    @property
    def mb_y(self):
        return self.mbatch["label"]

    @property
    def mb_task_id(self):
        return torch.zeros_like(self.mbatch["label"])


def test_stock_replay_plugin_with_our_policy_on_dictionary_samples():
    rows = []

    class Rows(SupervisedPlugin):
        def before_forward(self, strategy, **kwargs):
            rows.append((strategy.clock.train_exp_counter, strategy.mb_y.clone()))

    policy = DistributedRehearsalBuffer(40)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    strategy = DictNaive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         train_mb_size=10, evaluator=EvaluationPlugin(loggers=[]),
                         plugins=[ReplayPlugin(mem_size=40, batch_size_mem=5, storage_policy=policy),
                                  Rows()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for exp in dict_benchmark().train_stream:
            strategy.train(exp, eval_streams=[], num_workers=0)
    data = policy.buffer
    assert len(data) == 40
    sample = data[0]
    assert set(sample) == {"pixels", "label", "weight"}  # the samples' own keys
    assert sample["pixels"].shape == (5,) and float(sample["weight"]) == 1.0
    assert sorted(set(data.targets)) == [0, 1, 2, 3] and len(data.targets_task_labels) == 40
    second = [y for exp, y in rows if exp == 1]
    assert second and all(len(y) == 15 for y in second[:-1]), "10 stream + 5 buffer samples"
    assert set(torch.cat([y[10:] for y in second]).tolist()) <= {0, 1, 2, 3}
    assert {0, 1} & set(torch.cat([y[10:] for y in second]).tolist()), "past classes replayed"
    policy.close()


def test_plugin_buffer_of_dictionary_minibatches_keeps_their_keys():
    plugin = DistributedReplayPlugin(mem_size=20, batch_size_mem=4)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    strategy = DictNaive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         train_mb_size=10, evaluator=EvaluationPlugin(loggers=[]), plugins=[plugin])
    strategy.train(dict_benchmark().train_stream[0], eval_streams=[], num_workers=0)
    data = plugin.storage_policy.buffer
    assert len(data) == 20 and set(data[0]) == {"pixels", "label", "weight"}
    assert sorted(set(data.targets)) == [0, 1]
    plugin.close()


# ---------------------------------------------------------------- budgets on 2 ranks
def budget_errors(rank, world):
    from avalanche_distributed_rehearsal.core import ShardedRehearsalBuffer

    out = {}
    for name, make in (
            ("policy", lambda: DistributedRehearsalBuffer(1)),
            ("policy_kw", lambda: DistributedRehearsalBuffer(max_size=1)),
            ("plugin", lambda: DistributedReplayPlugin(mem_size=1)),
            ("der", lambda: DistributedDER(model=torch.nn.Linear(2, 2), optimizer=None, mem_size=1)),
            ("er_ace", lambda: DistributedERACE(model=torch.nn.Linear(2, 2), optimizer=None, mem_size=1)),
            ("core", lambda: ShardedRehearsalBuffer(1))):
        try:
            make()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    # a policy made for 2 ranks, resized below the world size
    policy = DistributedRehearsalBuffer(4)
    try:
        policy.resize(None, 1)
    except ValueError as e:
        out["resize"] = str(e)
    policy.close()
    return out


@pytest.mark.timeout(120)
def test_budget_below_the_world_size_names_the_argument_passed():
    for out in run_ranks(budget_errors, 2, preimport=("avalanche.training",), timeout=100):
        assert out["policy"].startswith("max_size (1) must be at least the world size (2)")
        assert out["policy_kw"].startswith("max_size (1)")
        for name in ("plugin", "der", "er_ace"):
            assert out[name].startswith("mem_size (1) must be at least the world size (2)"), out[name]
        assert out["core"].startswith("mem_size (1) must be at least the world size (2)")
        assert out["resize"].startswith("new_size (1) must be at least the world size (2)")


# ---------------------------------------------------------------- other strategies
def strategy_runs(rank, world, which):
    """Train ``which`` (EWC, LwF or OnlineNaive online) with the plugin on 2 digits
    experiences; report the steps, batch sizes and buffer."""
    from avalanche.benchmarks.scenarios.online import split_online_stream
    from avalanche.training import EWC, LwF, OnlineNaive

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    plugin = DistributedReplayPlugin(mem_size=40, batch_size_mem=8)
    sizes = []

    class Sizes(SupervisedPlugin, supports_distributed=True):
        def before_forward(self, strategy, **kwargs):
            sizes.append(int(strategy.mb_x.shape[0]))

    common = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                  criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32,
                  plugins=[plugin, Sizes()], evaluator=EvaluationPlugin(loggers=[]))
    stream = digits_benchmark().train_stream[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if which == "EWC":
            strategy, experiences = EWC(ewc_lambda=0.4, **common), stream
        elif which == "LwF":
            strategy, experiences = LwF(alpha=0.5, temperature=2.0, **common), stream
        else:
            strategy = OnlineNaive(train_passes=1, **common)
            experiences = split_online_stream(stream, experience_size=32, seed=0)
        calls = 0
        for exp in experiences:
            strategy.train(exp, eval_streams=[], num_workers=0)
            calls += 1
    out = {"calls": calls, "steps": plugin.pipeline.step, "sizes": sizes,
           "local": plugin.storage_policy.local_size(),
           "params": torch.cat([p.detach().flatten() for p in strategy.model.parameters()])}
    plugin.close()
    return out


def check_strategy_run(out, world, which):
    assert out["steps"] == len(out["sizes"]) > 0
    assert out["local"] == 40 // world
    replayed = [n for n in out["sizes"] if n > 32]
    assert replayed and max(out["sizes"]) == 40, "r = 8 representatives joined the batches"
    if which == "OnlineNaive":
        assert out["calls"] == out["steps"], "one step per online experience"


@pytest.mark.parametrize("which", ["EWC", "LwF", "OnlineNaive"])
def test_other_strategies_with_the_plugin_on_one_rank(which):
    check_strategy_run(strategy_runs(0, 1, which), 1, which)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("which", ["EWC", "LwF", "OnlineNaive"])
def test_other_strategies_with_the_plugin_on_two_ranks(which):
    results = run_ranks(strategy_runs, 2, which, preimport=("avalanche.training",), timeout=250)
    for out in results:
        check_strategy_run(out, 2, which)
    assert results[0]["steps"] == results[1]["steps"]
    assert torch.equal(results[0]["params"], results[1]["params"]), "DDP kept the replicas equal"
