"""Saving and resuming a whole Avalanche run (model, optimizer, clock, plugin) without dill."""

import pytest
import torch

from avalanche_distributed_rehearsal.app.data import digits_benchmark
from dist_harness import run_ranks

pytest.importorskip("avalanche")
from avalanche.training import Naive  # noqa: E402

from avalanche_distributed_rehearsal import DistributedReplayPlugin  # noqa: E402
from avalanche_distributed_rehearsal.integration.checkpoint import (  # noqa: E402
    load_training_checkpoint, save_training_checkpoint)


def dense_counts(counts):
    """``{label: n}`` as a list indexed by label (0 where absent)."""
    return [counts.get(c, 0) for c in range(max(counts, default=-1) + 1)]


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


# --------------------------------------------------------------------------- several ranks
# Each rank trains a DDP replica on its share of every experience (Avalanche's loaders
# shard the data over the ranks once a process group exists) and keeps its buffer shard.
MULTI_EXPS = 4


def fresh_ddp(mem_size=80):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    model = torch.nn.parallel.DistributedDataParallel(model)
    plugin = DistributedReplayPlugin(mem_size=mem_size, batch_size_mem=8, seed=1, timeout=60)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    strategy = Naive(model=model, optimizer=optimizer, train_mb_size=16, train_epochs=2,
                     plugins=[plugin], evaluator=None, device="cpu")
    return strategy, plugin


def shard_rows(plugin):
    """This rank's buffer as sorted ``(label, input bytes)`` pairs: a sample's identity."""
    fields = plugin.storage_policy.core.local_tensors()
    if not fields:
        return []
    return sorted((int(y), x.numpy().tobytes()) for x, y in zip(fields["input"], fields["label"]))


def scramble_rngs():
    """Resuming must not lean on the random state the process happens to have."""
    import random

    import numpy as np

    torch.manual_seed(4242)
    random.seed(4242)
    np.random.seed(4242)


def straight_multi_rank(rank, world):
    bench = digits_benchmark()
    torch.manual_seed(123)
    strategy, plugin = fresh_ddp()
    for exp in bench.train_stream[:MULTI_EXPS]:
        strategy.train(exp)
    plugin.close()
    return {"params": params(strategy), "rows": shard_rows(plugin)}


def save_after_two(rank, world, path):
    bench = digits_benchmark()
    torch.manual_seed(123)
    strategy, plugin = fresh_ddp()
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    save_training_checkpoint(path, strategy, plugin, extra={"next": 2})
    out = {"params": params(strategy), "rows": shard_rows(plugin), "step": plugin.pipeline.step}
    plugin.close()
    return out


def save_then_resume_multi_rank(rank, world, path):
    bench = digits_benchmark()
    saved = save_after_two(rank, world, path)
    saved_params, saved_step = saved["params"], saved["step"]

    scramble_rngs()
    strategy, plugin = fresh_ddp()
    extra = load_training_checkpoint(path, strategy, plugin)
    assert extra == {"next": 2} and strategy.clock.train_exp_counter == 2
    assert plugin.pipeline.step == saved_step and torch.equal(params(strategy), saved_params)
    for exp in bench.train_stream[extra["next"]:MULTI_EXPS]:
        strategy.train(exp)
    plugin.close()
    return {"params": params(strategy), "rows": shard_rows(plugin)}


@pytest.mark.timeout(120)
def test_two_rank_resume_gives_the_same_model_as_an_uninterrupted_run(tmp_path):
    straight = run_ranks(straight_multi_rank, 2, timeout=100)
    resumed = run_ranks(save_then_resume_multi_rank, 2, str(tmp_path / "run"), timeout=100)
    # DDP keeps the replicas equal; resuming reproduces them bit for bit.
    assert torch.equal(straight[0]["params"], straight[1]["params"])
    for rank in range(2):
        assert torch.equal(resumed[rank]["params"], straight[rank]["params"])
        assert resumed[rank]["rows"] == straight[rank]["rows"]  # every shard, sample for sample
        assert len(straight[rank]["rows"]) == 40


def resume_elsewhere(rank, world, path):
    bench = digits_benchmark()
    scramble_rngs()
    strategy, plugin = fresh_ddp()
    extra = load_training_checkpoint(path, strategy, plugin)
    loaded = {"params": params(strategy), "rows": shard_rows(plugin), "extra": extra,
              "step": plugin.pipeline.step, "exp_counter": strategy.clock.train_exp_counter}
    for exp in bench.train_stream[extra["next"]:MULTI_EXPS]:
        strategy.train(exp)
    core = plugin.storage_policy.core
    after = {"params": params(strategy), "step": plugin.pipeline.step,
             "global_counts": dense_counts(core.global_counts()), "local": len(core),
             "capacity": core.local_capacity}
    plugin.close()
    return {"loaded": loaded, "after": after}


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory):
    """A checkpoint saved by 2 ranks after two experiences (read-only for its users)."""
    path = str(tmp_path_factory.mktemp("two-rank") / "run")
    return path, run_ranks(save_after_two, 2, path, timeout=100)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("loaded_world", [1, 3])
def test_two_rank_checkpoint_resumes_on_another_world_size(two_rank_checkpoint, loaded_world):
    path, saved = two_rank_checkpoint
    resumed = run_ranks(resume_elsewhere, loaded_world, path, timeout=120)
    saved_union = sorted(row for r in saved for row in r["rows"])
    loaded_union = sorted(row for r in resumed for row in r["loaded"]["rows"])
    assert len(saved_union) == 80
    assert loaded_union == saved_union  # no sample lost, none duplicated
    for r in resumed:
        loaded, after = r["loaded"], r["after"]
        assert loaded["extra"] == {"next": 2} and loaded["exp_counter"] == 2
        assert loaded["step"] == saved[0]["step"]
        assert torch.equal(loaded["params"], saved[0]["params"])  # the model, exactly
        # Training went on: more steps, a changed model, a full buffer of 8 classes.
        assert after["step"] > loaded["step"]
        assert torch.isfinite(after["params"]).all()
        assert not torch.equal(after["params"], loaded["params"])
        assert after["local"] == after["capacity"]
        assert sum(after["global_counts"]) == 80
        assert [c > 0 for c in after["global_counts"][:8]] == [True] * 8
    assert torch.equal(resumed[0]["after"]["params"], resumed[-1]["after"]["params"])


def rng_after_resume(rank, world, path):
    bench = digits_benchmark()
    strategy, plugin = fresh_ddp()
    strategy.train(bench.train_stream[0])
    torch.manual_seed(1000 + rank)  # dropout, augmentations...: each rank its own stream
    save_training_checkpoint(path, strategy, plugin)
    expected = torch.rand(3)
    plugin.close()
    scramble_rngs()
    strategy, plugin = fresh_ddp()
    load_training_checkpoint(path, strategy, plugin)
    plugin.close()
    return expected, torch.rand(3)


@pytest.mark.timeout(120)
def test_every_rank_gets_its_own_random_state_back(tmp_path):
    results = run_ranks(rng_after_resume, 2, str(tmp_path / "run"), timeout=100)
    for expected, got in results:
        assert torch.equal(expected, got)
    assert not torch.equal(results[0][0], results[1][0])
    assert sorted(p.name for p in (tmp_path / "run").glob("rng-*.pt")) == ["rng-00000.pt", "rng-00001.pt"]


# --------------------------------------------------------------------------- elastic RNG
def draws():
    """The next values of every generator a training step draws from (CPU here)."""
    import random

    import numpy as np

    return {"torch": torch.rand(4).tolist(), "python": [random.random() for _ in range(4)],
            "numpy": np.random.rand(4).tolist()}


def save_with_rank_streams(rank, world, path):
    import random

    import numpy as np

    strategy, plugin = fresh_ddp()
    torch.manual_seed(1000 + rank)  # each rank its own streams, as dropout etc. leave them
    random.seed(2000 + rank)
    np.random.seed(3000 + rank)
    save_training_checkpoint(path, strategy, plugin)
    expected = draws()
    plugin.close()
    return expected


def resume_twice_and_draw(rank, world, path):
    """Resume from ``path`` twice, from different random states; return both draws."""
    import random

    import numpy as np

    out = []
    for scramble in (4242, 77):
        torch.manual_seed(scramble)
        random.seed(scramble)
        np.random.seed(scramble)
        strategy, plugin = fresh_ddp()
        load_training_checkpoint(path, strategy, plugin)
        plugin.close()
        out.append(draws())
    return out


@pytest.mark.timeout(300)
def test_new_ranks_of_an_elastic_resume_get_their_own_reproducible_random_state(tmp_path):
    path = str(tmp_path / "run")
    saved = run_ranks(save_with_rank_streams, 2, path, timeout=100)
    resumed = run_ranks(resume_twice_and_draw, 4, path, timeout=150)
    first = [r[0] for r in resumed]
    for rank in (0, 1):  # ranks that saved get their own streams back
        assert first[rank] == saved[rank]
    for rank in range(4):  # the same checkpoint resumes to the same streams, whatever came before
        assert resumed[rank][1] == first[rank], rank
    for a in range(4):  # ranks 2 and 3 (new) share no stream with each other or ranks 0, 1
        for b in range(a + 1, 4):
            for lib in ("torch", "python", "numpy"):
                assert first[a][lib] != first[b][lib], (a, b, lib)
