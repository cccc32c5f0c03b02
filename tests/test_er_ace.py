"""Distributed ER-ACE: replayed rows kept apart, the asymmetric cross-entropy against a hand
computation, offline and online, 1 and 2 ranks, asynchronous == synchronous."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("avalanche")
from avalanche.benchmarks.scenarios.online import split_online_stream  # noqa: E402
from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

from avalanche_distributed_rehearsal import DistributedERACE  # noqa: E402
from dist_harness import run_ranks  # noqa: E402
from id_data import CLASSES, DIM, id_benchmark  # noqa: E402

pytestmark = pytest.mark.timeout(240)


class Recorder(SupervisedPlugin, supports_distributed=True):
    """Keeps every training step's outputs, labels, replayed rows and loss."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def before_backward(self, strategy, **kwargs):
        replay = strategy.replay
        buf = strategy.mb_buffer_out
        self.steps.append({
            "out": strategy.mb_output.detach().clone(), "y": strategy.mb_y.clone(),
            "x": strategy.mb_x.detach().clone(), "b": replay.new_rows, "d": replay.replayed_rows,
            "buf_out": None if buf is None else buf.detach().clone(),
            "buf_x": replay.replay_batch["input"].clone() if replay.replayed_rows else None,
            "buf_y": replay.replay_batch["label"].clone() if replay.replayed_rows else None,
            "raw": replay.last_replay.get("input"), "exp": strategy.clock.train_exp_counter,
            "loss": float(strategy.loss)})


def ace_by_hand(out, y, buf_out, buf_y):
    """(CE over all classes of the replayed rows + CE of the new rows over the classes
    present in the batch) / 2, in float64."""
    present = sorted(set(y.tolist()))
    column = {c: k for k, c in enumerate(present)}
    new_logp = torch.log_softmax(out[:, present].double(), 1)
    new = -new_logp[torch.arange(len(y)), torch.tensor([column[c] for c in y.tolist()])].mean()
    buf_logp = torch.log_softmax(buf_out.double(), 1)
    old = -buf_logp[torch.arange(len(buf_y)), buf_y].mean()
    return float((new + old) / 2)


class WithoutId(torch.nn.Module):
    """Drops the id column (the model must not see it)."""

    def forward(self, x):
        return x[:, 1:]


def make(async_mode=True, seed=0, epochs=1, transform=None, ddp=False, batch_size_mem=6, **kw):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(WithoutId(), torch.nn.Linear(DIM - 1, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, CLASSES))
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    recorder = Recorder()
    strategy = DistributedERACE(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                                mem_size=40, batch_size_mem=batch_size_mem, train_mb_size=10,
                                train_epochs=epochs, async_mode=async_mode, seed=seed,
                                plugins=[recorder], transform=transform,
                                evaluator=EvaluationPlugin(loggers=[]), **kw)
    return strategy, recorder


def check_losses(steps, x):
    replayed = [s for s in steps if s["d"]]
    assert len(replayed) >= len(steps) // 2
    for s in steps:
        assert s["out"].shape[0] == s["b"] == len(s["y"])  # the stream rows only
        if not s["d"]:
            assert s["buf_out"] is None
            assert s["loss"] == pytest.approx(float(F.cross_entropy(s["out"], s["y"])), rel=1e-6)
            continue
        assert s["buf_out"].shape == (s["d"], CLASSES)  # the replayed rows' own forward pass
        assert torch.equal(s["buf_x"], s["raw"])  # no transform: the stored rows as drawn
        ids = s["buf_x"][:, 0].long()
        assert torch.equal(s["buf_y"], torch.arange(240)[ids] % CLASSES)  # labels of those rows
        expected = ace_by_hand(s["out"], s["y"], s["buf_out"], s["buf_y"])
        assert s["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        # the new rows' loss ignores the classes absent from the batch: not plain CE
        unmasked = float(F.cross_entropy(s["out"], s["y"]) + F.cross_entropy(s["buf_out"], s["buf_y"])) / 2
        assert s["loss"] != pytest.approx(unmasked, rel=1e-4)


def test_ace_loss_matches_a_hand_computation_offline():
    bench, x = id_benchmark()
    strategy, rec = make(epochs=2)
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[], num_workers=0)
    strategy.close()
    check_losses(rec.steps, x)
    assert max(s["d"] for s in rec.steps) == 6
    # replay_new_classes=True (the default): the experience being trained is replayed too
    first = [s for s in rec.steps if s["exp"] == 0 and s["d"]]
    assert first and all(set(s["buf_y"].tolist()) <= {0, 1} for s in first)


def test_ace_online_with_split_online_stream():
    bench, x = id_benchmark()
    strategy, rec = make()
    online = split_online_stream(bench.train_stream, experience_size=10, seed=0)
    calls = 0
    for exp in online:
        strategy.train(exp, eval_streams=[], num_workers=0)
        calls += 1
    strategy.close()
    assert calls == 24 and len(rec.steps) == 24
    check_losses(rec.steps, x)


def test_both_forward_passes_get_transformed_rows():
    bench, x = id_benchmark()
    outputs = []

    def jitter(t):
        out = t.clone()
        out[:, 1:] += 0.2 * torch.randn(t.shape[0], t.shape[1] - 1)
        outputs.append(out.clone())
        return out

    strategy, rec = make(transform=jitter)
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[], num_workers=0)
    strategy.close()
    assert len(outputs) == len(rec.steps)
    for s, out in zip(rec.steps, outputs):
        b = s["b"]
        assert torch.equal(s["x"], out[:b])
        if s["d"]:
            assert torch.equal(s["buf_x"], out[b:]) and not torch.equal(s["buf_x"], s["raw"])
            assert torch.equal(s["raw"], x[s["raw"][:, 0].long()])  # drawn raw, then transformed
            assert s["loss"] == pytest.approx(ace_by_hand(s["out"], s["y"], s["buf_out"], s["buf_y"]),
                                              rel=1e-5, abs=1e-6)


def test_ace_loss_equals_avalanches_ace_criterion_and_stays_finite():
    from avalanche.training import ACECriterion

    from avalanche_distributed_rehearsal.integration.er_ace import ace_loss

    g = torch.Generator().manual_seed(0)
    out, buf = torch.randn(12, CLASSES, generator=g) * 3, torch.randn(5, CLASSES, generator=g) * 3
    y, y_buf = torch.tensor([4, 2, 2, 4, 5] * 2 + [2, 5]), torch.randint(0, CLASSES, (5,), generator=g)
    ours, theirs = ace_loss(out, y, buf, y_buf), ACECriterion()(out, y, buf, y_buf)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    assert float(ours) == pytest.approx(ace_by_hand(out, y, buf, y_buf), rel=1e-6)
    out[0, 2] = -200.0  # a present class far below the others
    assert torch.isnan(ACECriterion()(out, y, buf, y_buf))
    assert torch.isfinite(ace_loss(out, y, buf, y_buf))
    assert float(ace_loss(out, y, buf, y_buf)) == pytest.approx(ace_by_hand(out, y, buf, y_buf), rel=1e-6)


def test_asynchronous_equals_synchronous():
    bench, _ = id_benchmark()
    results = []
    for async_mode in (True, False):
        strategy, rec = make(async_mode=async_mode)
        for exp in bench.train_stream:
            strategy.train(exp, eval_streams=[], num_workers=0)
        params = [p.detach().clone() for p in strategy.model.parameters()]
        strategy.close()
        results.append((params, [s["loss"] for s in rec.steps]))
    (pa, la), (ps, ls) = results
    assert la == ls and all(torch.equal(a, b) for a, b in zip(pa, ps))


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size_mem"):
        make(batch_size_mem=-1)
    with pytest.raises(ValueError, match="mem_size"):
        DistributedERACE(model=torch.nn.Linear(2, 2), optimizer=None, mem_size=0)


def er_ace_on_ranks(rank, world, async_mode):
    bench, x = id_benchmark()
    strategy, rec = make(async_mode=async_mode, ddp=True)
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[], num_workers=0)
    core = strategy.replay.storage_policy.core
    sources = core.last_draw.table.stored.sum(1).tolist()
    params = [p.detach().clone() for p in strategy.model.parameters()]
    strategy.close()
    check_losses(rec.steps, x)
    return {"losses": [s["loss"] for s in rec.steps], "d": [s["d"] for s in rec.steps],
            "sources": sources, "params": params}


@pytest.mark.timeout(300)
def test_two_ranks_losses_by_hand_and_async_equals_sync():
    a = run_ranks(er_ace_on_ranks, 2, True, preimport=("avalanche.training",), timeout=250)
    s = run_ranks(er_ace_on_ranks, 2, False, preimport=("avalanche.training",), timeout=250)
    for rank in range(2):
        assert a[rank]["losses"] == s[rank]["losses"]
        assert all(torch.equal(p, q) for p, q in zip(a[rank]["params"], s[rank]["params"]))
        assert all(n > 0 for n in a[rank]["sources"])  # both shards hold samples
        assert max(a[rank]["d"]) == 6
    assert a[0]["d"] == a[1]["d"]  # every rank makes the same forward passes
    assert all(torch.equal(p, q) for p, q in zip(a[0]["params"], a[1]["params"]))  # DDP
