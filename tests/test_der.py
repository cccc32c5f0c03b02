"""Distributed Dark Experience Replay: stored logits, the DER / DER++ loss, 1 and 2 ranks,
asynchronous == synchronous."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("avalanche")
from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

from avalanche_distributed_rehearsal import DistributedDER  # noqa: E402
from dist_harness import run_ranks  # noqa: E402
from id_data import CLASSES, DIM, id_benchmark as _id_benchmark  # noqa: E402


def id_benchmark(n=240, seed=0):
    return _id_benchmark(n, seed)[0]


pytestmark = pytest.mark.timeout(240)


class Recorder(SupervisedPlugin, supports_distributed=True):
    """Keeps every training step's outputs (by sample id), replayed logits and loss."""

    def __init__(self):
        super().__init__()
        self.outputs = {}  # sample id -> model output in the epoch whose batches are offered
        self.steps = []

    def after_forward(self, strategy, **kwargs):
        b = strategy.replay.new_rows
        if strategy.clock.train_exp_epochs == strategy.train_epochs - 1:  # the offered epoch
            for i, out in zip(strategy.mb_x[:b, 0].long().tolist(), strategy.mb_output[:b]):
                self.outputs[i] = out.detach().clone()

    def before_backward(self, strategy, **kwargs):
        replay = strategy.replay
        self.steps.append({"out": strategy.mb_output.detach().clone(),
                           "y": strategy.mb_y.clone(), "b": replay.new_rows,
                           "d": replay.replayed_rows,
                           "logits": replay.last_replay.get("logits"),
                           "loss": float(strategy.loss)})


def make_der(async_mode=True, alpha=0.3, beta=0.5, seed=0, epochs=1, logits_dtype=torch.float16):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, CLASSES))
    recorder = Recorder()
    strategy = DistributedDER(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                              mem_size=40, batch_size_mem=6, alpha=alpha, beta=beta,
                              train_mb_size=10, train_epochs=epochs, async_mode=async_mode,
                              seed=seed, plugins=[recorder], logits_dtype=logits_dtype,
                              evaluator=EvaluationPlugin(loggers=[]))
    return strategy, recorder


def train(strategy, bench):
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[], num_workers=0)


def test_stored_logits_are_the_outputs_at_insertion_time():
    strategy, rec = make_der(epochs=2)
    train(strategy, id_benchmark())
    fields = {k: v.clone() for k, v in strategy.replay.storage_policy.core.local_tensors().items()}
    strategy.close()
    assert fields["logits"].dtype == torch.float16
    ids = fields["input"][:, 0].long().tolist()
    assert len(ids) == 40
    for i, stored in zip(ids, fields["logits"]):
        assert torch.equal(stored, rec.outputs[i].half()), i


def test_der_and_der_plus_plus_losses_match_a_hand_computation():
    for beta in (0.0, 0.5):
        strategy, rec = make_der(alpha=0.3, beta=beta)
        train(strategy, id_benchmark())
        strategy.close()
        replayed = [s for s in rec.steps if s["d"]]
        assert len(replayed) > 10 and all(s["logits"].shape == (s["d"], CLASSES) for s in replayed)
        for s in rec.steps:
            out, y, b = s["out"], s["y"], s["b"]
            if not s["d"]:
                expected = F.cross_entropy(out, y)
            else:
                expected = (F.cross_entropy(out[:b], y[:b])
                            + 0.3 * F.mse_loss(out[b:], s["logits"].float())
                            + beta * F.cross_entropy(out[b:], y[b:]))
            assert s["loss"] == pytest.approx(float(expected), rel=1e-6, abs=1e-7)


def test_asynchronous_equals_synchronous():
    results = []
    for async_mode in (True, False):
        strategy, rec = make_der(async_mode=async_mode)
        train(strategy, id_benchmark())
        params = [p.detach().clone() for p in strategy.model.parameters()]
        fields = {k: v.clone() for k, v in strategy.replay.storage_policy.core.local_tensors().items()}
        strategy.close()
        results.append((params, fields, [s["loss"] for s in rec.steps]))
    (pa, fa, la), (ps, fs, ls) = results
    assert la == ls
    assert all(torch.equal(a, b) for a, b in zip(pa, ps))
    assert all(torch.equal(fa[k], fs[k]) for k in fa)


def der_on_ranks(rank, world, async_mode):
    from avalanche_distributed_rehearsal.core import split_budget

    strategy, rec = make_der(async_mode=async_mode)
    strategy.model = torch.nn.parallel.DistributedDataParallel(strategy.model)
    train(strategy, id_benchmark())
    core = strategy.replay.storage_policy.core
    fields = {k: v.clone() for k, v in core.local_tensors().items()}
    sources = core.last_draw.table.stored.sum(1).tolist()
    capacity = core.local_capacity == split_budget(40, world, rank)
    strategy.close()
    return {"losses": [s["loss"] for s in rec.steps], "fields": fields, "sources": sources,
            "capacity": capacity, "d": [s["d"] for s in rec.steps]}


def test_two_ranks_async_equals_sync():
    a = run_ranks(der_on_ranks, 2, True, preimport=("avalanche.training",), timeout=200)
    s = run_ranks(der_on_ranks, 2, False, preimport=("avalanche.training",), timeout=200)
    for rank in range(2):
        assert a[rank]["losses"] == s[rank]["losses"]
        assert all(torch.equal(a[rank]["fields"][k], s[rank]["fields"][k]) for k in a[rank]["fields"])
        assert a[rank]["capacity"] and all(n > 0 for n in a[rank]["sources"])
        assert max(a[rank]["d"]) == 6
        assert a[rank]["fields"]["logits"].dtype == torch.float16


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        make_der(alpha=-1)
    with pytest.raises(TypeError, match="output_dtype"):
        make_der(logits_dtype=torch.int64)


def test_bytes_per_sample_metric_reports_the_smaller_float16_records():
    from avalanche_distributed_rehearsal.integration.metrics import BytesPerSample

    sizes = {}
    for dtype in (torch.float16, torch.float32):
        metric = BytesPerSample("experience")
        torch.manual_seed(0)
        model = torch.nn.Linear(DIM, CLASSES)
        strategy = DistributedDER(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3),
                                  mem_size=20, batch_size_mem=4, train_mb_size=10,
                                  logits_dtype=dtype, evaluator=EvaluationPlugin(metric, loggers=[]))
        train(strategy, id_benchmark())
        sizes[dtype] = metric.result()
        assert sizes[dtype] == strategy.replay.storage_policy.core.bytes_per_sample
        strategy.close()
    # input 5 float32 (20 -> 24 bytes), label and task int64 (8 + 8), logits 6 values
    assert sizes[torch.float16] == 24 + 16 + 16 and sizes[torch.float32] == 24 + 16 + 24
