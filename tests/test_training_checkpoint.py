"""Saving and resuming a whole Avalanche run (model, optimizer, clock, plugin) without dill."""

import pytest
import torch

from digits_replay import digits_benchmark

pytest.importorskip("avalanche")
from avalanche.training import Naive  # noqa: E402

from avalanche_distributed_rehearsal import DistributedReplayPlugin  # noqa: E402
from avalanche_distributed_rehearsal.integration.checkpoint import (  # noqa: E402
    load_training_checkpoint, save_training_checkpoint)


def fresh():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    plugin = DistributedReplayPlugin(mem_size=80, batch_size_mem=8, seed=1)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                     train_mb_size=32, train_epochs=2, plugins=[plugin], evaluator=None)
    return strategy, plugin


def params(strategy):
    return torch.cat([p.detach().flatten() for p in strategy.model.parameters()])


def test_resume_gives_the_same_model_as_an_uninterrupted_run(tmp_path):
    bench = digits_benchmark()
    torch.manual_seed(123)
    strategy, plugin = fresh()
    for exp in bench.train_stream[:4]:
        strategy.train(exp)
    straight = params(strategy)
    plugin.close()

    torch.manual_seed(123)
    strategy, plugin = fresh()
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    save_training_checkpoint(str(tmp_path / "run"), strategy, plugin, extra={"next": 2})
    plugin.close()

    strategy, plugin = fresh()
    extra = load_training_checkpoint(str(tmp_path / "run"), strategy, plugin)
    assert extra == {"next": 2}
    assert plugin.pipeline.step > 0 and strategy.clock.train_exp_counter == 2
    for exp in bench.train_stream[extra["next"]:4]:
        strategy.train(exp)
    plugin.close()
    assert plugin.storage_policy.core.class_counts() == {c: 10 for c in range(8)}
    assert torch.equal(params(strategy), straight)
