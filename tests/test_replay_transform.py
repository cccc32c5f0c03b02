"""Replay as the field trains it: a batch transform on [x_i ; R_i] at every step, rows stored
before it, uint8 storage end to end; 1 and 2 ranks, asynchronous == synchronous."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

pytest.importorskip("avalanche")
from avalanche.benchmarks import nc_benchmark  # noqa: E402
from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

from avalanche_distributed_rehearsal import DistributedDER, DistributedReplayPlugin  # noqa: E402
from dist_harness import run_ranks  # noqa: E402

pytestmark = pytest.mark.timeout(240)
CLASSES, DIM, N = 6, 5, 240


def id_data(n=N, seed=0):
    """``x`` ``(n, DIM)`` float32 whose column 0 is the sample's id; ``y`` ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = torch.randn(n, DIM, generator=g) * 0.3
    x[:, 1:] += F.one_hot(y, CLASSES)[:, : DIM - 1].float()
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    return x, y


def benchmark(x, y, n_experiences=3):
    train, test = TensorDataset(x, y), TensorDataset(x[:60], y[:60])
    train.targets, test.targets = y.tolist(), y[:60].tolist()
    return nc_benchmark(train, test, n_experiences=n_experiences, task_labels=False, seed=0,
                        fixed_class_order=list(range(CLASSES)))


class Jitter:
    """A random transform (torch's global generator): noise on every column but the id.

    Keeps a copy of every input it gets and of every output it returns."""

    def __init__(self):
        self.inputs, self.outputs = [], []

    def __call__(self, x):
        self.inputs.append(x.clone())
        out = x.float().clone()
        out[:, 1:] += 0.2 * torch.randn(x.shape[0], x.shape[1] - 1, device=x.device)
        self.outputs.append(out.clone())
        return out


class Steps(SupervisedPlugin, supports_distributed=True):
    """Per training step: the raw input (put it before the replay plugin), the model's
    input, and what the replay plugin replayed."""

    def __init__(self, replay):
        super().__init__()
        self.replay = replay
        self.raw, self.model_in, self.replayed, self.b = [], [], [], []

    def before_training_iteration(self, strategy, **kwargs):
        self.raw.append(strategy.mbatch[0].clone())

    def before_forward(self, strategy, **kwargs):
        self.model_in.append(strategy.mb_x.detach().clone())
        reps = self.replay.last_replay
        self.replayed.append(reps["input"].clone() if reps else None)
        self.b.append(self.replay.new_rows)


def naive_run(async_mode=True, transform=None, seed=0, mem=40, epochs=1, ddp=False, **kwargs):
    torch.manual_seed(seed)
    x, y = id_data()
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, CLASSES))
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    plugin = DistributedReplayPlugin(mem_size=mem, batch_size_mem=6, async_mode=async_mode,
                                     seed=seed, transform=transform, **kwargs)
    steps = Steps(plugin)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     train_mb_size=10, train_epochs=epochs, plugins=[steps, plugin],
                     evaluator=EvaluationPlugin(loggers=[]))
    try:
        for exp in benchmark(x, y).train_stream:
            strategy.train(exp, eval_streams=[], num_workers=0)
        stored = {k: v.clone() for k, v in plugin.storage_policy.core.local_tensors().items()}
        params = [p.detach().clone() for p in strategy.model.parameters()]
    finally:
        plugin.close()
    return {"steps": steps, "stored": stored, "params": params, "x": x, "plugin": plugin}


def check_transform_contract(run, transform):
    """The transform ran once per step on [raw batch ; stored rows drawn], and the model
    trained on its output; stored rows are the raw rows, never a transformed one."""
    steps, x = run["steps"], run["x"]
    assert len(transform.inputs) == len(steps.raw) == len(steps.model_in)
    replayed_steps = 0
    for raw, seen, got, reps, out in zip(steps.raw, transform.inputs, steps.model_in,
                                         steps.replayed, transform.outputs):
        expected = raw if reps is None else torch.cat([raw, reps])
        assert torch.equal(seen, expected)  # raw batch, then the stored (raw) representatives
        assert torch.equal(got, out)  # the model trained on the transform's output
        if reps is not None:
            replayed_steps += 1
            assert torch.equal(reps, x[reps[:, 0].long()])  # drawn rows are raw rows
            assert not torch.equal(got[len(raw):], reps)  # ... and were transformed
    assert replayed_steps >= len(steps.raw) // 2  # experiences 1 and 2 replay
    stored = run["stored"]["input"]
    assert torch.equal(stored, x[stored[:, 0].long()]), "the buffer holds raw rows only"


def test_the_transform_runs_on_every_draw_and_never_on_stored_rows():
    transform = Jitter()
    run = naive_run(transform=transform)
    check_transform_contract(run, transform)
    # a sample drawn at several steps is augmented afresh every time
    views = {}
    for got, b, reps in zip(run["steps"].model_in, run["steps"].b, run["steps"].replayed):
        if reps is not None:
            for i, row in zip(reps[:, 0].long().tolist(), got[b:]):
                views.setdefault(i, []).append(row)
    again = [rows for rows in views.values() if len(rows) > 1]
    assert len(again) > 5
    assert all(not torch.equal(rows[0], rows[1]) for rows in again)


def test_asynchronous_equals_synchronous_with_a_random_transform():
    a = naive_run(async_mode=True, transform=Jitter())
    s = naive_run(async_mode=False, transform=Jitter())
    assert all(torch.equal(p, q) for p, q in zip(a["params"], s["params"]))
    assert all(torch.equal(p, q) for p, q in zip(a["steps"].model_in, s["steps"].model_in))
    assert all(torch.equal(a["stored"][k], s["stored"][k]) for k in a["stored"])


def test_evaluation_is_untouched_unless_an_eval_transform_is_given():
    x, y = id_data()
    seen = []

    class EvalInputs(SupervisedPlugin):
        def before_eval_forward(self, strategy, **kwargs):
            seen.append(strategy.mb_x.clone())

    for eval_transform in (None, lambda t: t * 2):
        seen.clear()
        torch.manual_seed(0)
        model = torch.nn.Linear(DIM, CLASSES)
        plugin = DistributedReplayPlugin(mem_size=20, batch_size_mem=4, transform=Jitter(),
                                         eval_transform=eval_transform)
        strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                         train_mb_size=10, eval_mb_size=60, plugins=[plugin, EvalInputs()],
                         evaluator=EvaluationPlugin(loggers=[]))
        bench = benchmark(x, y)
        strategy.train(bench.train_stream[0], eval_streams=[], num_workers=0)
        strategy.eval(bench.test_stream[:1])
        factor = 1 if eval_transform is None else 2
        assert seen and all(torch.equal(t, factor * x[t[:, 0].long() // factor]) for t in seen)
        plugin.close()


def test_bad_transforms_are_refused_with_their_name():
    with pytest.raises(TypeError, match="transform must be a callable"):
        DistributedReplayPlugin(mem_size=10, transform="flip")
    with pytest.raises(TypeError, match="eval_transform must be a callable"):
        DistributedReplayPlugin(mem_size=10, eval_transform=3)
    with pytest.raises(ValueError, match="transform must return a tensor with one row per input row"):
        naive_run(transform=lambda t: t[:1])


def test_der_logits_are_those_of_the_transformed_view_trained_at_insertion():
    x, y = id_data()
    transform = Jitter()
    outputs = {}

    class Outputs(SupervisedPlugin):
        def after_forward(self, strategy, **kwargs):
            b = strategy.replay.new_rows
            if strategy.clock.train_exp_epochs == strategy.train_epochs - 1:  # offered epoch
                for i, out in zip(strategy.mb_x[:b, 0].long().tolist(), strategy.mb_output[:b]):
                    outputs[i] = out.detach().clone()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.ReLU(), torch.nn.Linear(16, CLASSES))
    strategy = DistributedDER(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                              mem_size=40, batch_size_mem=6, train_mb_size=10, train_epochs=2,
                              transform=transform, plugins=[Outputs()],
                              evaluator=EvaluationPlugin(loggers=[]))
    for exp in benchmark(x, y).train_stream:
        strategy.train(exp, eval_streams=[], num_workers=0)
    fields = {k: v.clone() for k, v in strategy.replay.storage_policy.core.local_tensors().items()}
    strategy.close()
    ids = fields["input"][:, 0].long()
    assert torch.equal(fields["input"], x[ids]), "inputs stored before the transform"
    for i, stored in zip(ids.tolist(), fields["logits"]):
        assert torch.equal(stored, outputs[i].half())  # the augmented forward pass's output
    # the logits are not those of the raw rows (the transform changed the view)
    raw_out = model(fields["input"]).detach().half()
    assert not torch.equal(raw_out, fields["logits"])


# ---------------------------------------------------------------- uint8 storage
def uint8_data(n=N, seed=0):
    """Un-normalised uint8 'images' ``(n, 8)``: pixel 0..7 count, class signal."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = torch.randint(0, 60, (n, 8), generator=g, dtype=torch.uint8)
    x[:, : CLASSES] += (F.one_hot(y, CLASSES) * 150).to(torch.uint8)
    return x, y


class ToFloat:
    """uint8 -> float32 in [0, 1]; records the dtypes it was given."""

    def __init__(self):
        self.dtypes = []

    def __call__(self, x):
        self.dtypes.append(x.dtype)
        return x.float() / 255.0


def uint8_run(rank=0, world=1, async_mode=True, dtypes=None, data=None):
    torch.manual_seed(0)
    x, y = uint8_data() if data is None else data
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, CLASSES))
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    transform = ToFloat()
    plugin = DistributedReplayPlugin(mem_size=40, batch_size_mem=6, async_mode=async_mode,
                                     transform=transform, dtypes=dtypes)
    received, replay_dtypes = [], []

    class Traffic(SupervisedPlugin, supports_distributed=True):
        def before_forward(self, strategy, **kwargs):
            draw = plugin.pipeline.last_draw
            if plugin.replayed_rows:
                received.append((draw.stats.payload_received, plugin.replayed_rows, draw.row_bytes))
                replay_dtypes.append(plugin.last_replay["input"].dtype)

    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     train_mb_size=10, plugins=[plugin, Traffic()],
                     evaluator=EvaluationPlugin(loggers=[]))
    train = TensorDataset(x, y)
    train.targets = y.tolist()
    bench = nc_benchmark(train, train, n_experiences=3, task_labels=False, seed=0,
                         fixed_class_order=list(range(CLASSES)))
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[], num_workers=0)
    core = plugin.storage_policy.core
    out = {"layout": core.layout.describe(), "bytes": core.bytes_per_sample,
           "nbytes": int(core.storage.nbytes), "stored": core.local_tensors()["input"].clone(),
           "received": received, "replay_dtypes": set(replay_dtypes),
           "transform_dtypes": set(transform.dtypes),
           "params": [p.detach().clone() for p in strategy.model.parameters()]}
    plugin.close()
    return out


def test_uint8_is_stored_as_uint8_in_a_quarter_of_the_memory():
    x, y = uint8_data()
    small = uint8_run()
    big = uint8_run(data=(x.float(), y))  # the same pixels as float32 batches
    assert ["input", [8], "uint8"] in small["layout"] and ["input", [8], "float32"] in big["layout"]
    assert small["replay_dtypes"] == small["transform_dtypes"] == {torch.uint8}
    assert big["transform_dtypes"] == {torch.float32}
    # input bytes per sample: 8 (uint8) vs 32 (float32); labels and tasks: 16 either way
    assert small["bytes"] == 8 + 16 and big["bytes"] == 32 + 16
    assert big["nbytes"] - 40 * 16 == 4 * (small["nbytes"] - 40 * 16)
    # the model saw the same values: the same training, bit for bit
    assert all(torch.equal(p, q) for p, q in zip(small["params"], big["params"]))


def test_a_float_batch_of_integers_may_be_stored_as_uint8_exactly():
    x, y = uint8_data()
    run = uint8_run(data=(x.float(), y), dtypes={"input": torch.uint8})
    assert ["input", [8], "uint8"] in run["layout"]
    assert run["stored"].dtype == torch.uint8
    # every stored row is one of the data set's rows, exactly
    rows = {tuple(r) for r in x.tolist()}
    assert all(tuple(r) in rows for r in run["stored"].tolist())


def test_normalised_floats_are_refused_for_uint8_storage_before_anything_is_stored():
    x, y = uint8_data()
    plugin = DistributedReplayPlugin(mem_size=40, batch_size_mem=6, dtypes={"input": torch.uint8})
    model = torch.nn.Linear(8, CLASSES)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     train_mb_size=10, plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]))
    train = TensorDataset(x.float() / 255.0, y)
    train.targets = y.tolist()
    bench = nc_benchmark(train, train, n_experiences=3, task_labels=False, seed=0)
    with pytest.raises(ValueError, match=r"'input' is stored as uint8 \(dtypes\['input'\]\).*"
                                         r"not integers in \[0, 255\]"):
        strategy.train(bench.train_stream[0], eval_streams=[], num_workers=0)
    core = plugin.storage_policy.core
    # refused by the step that offered the batch (in the background, raised at the next
    # step's take()), on every rank at once: nothing stored anywhere
    assert core is not None and len(core) == 0 and plugin.pipeline.step <= 1
    assert core.global_counts() == {}
    plugin.close()


def uint8_on_ranks(rank, world, async_mode):
    out = uint8_run(rank, world, async_mode)
    out["stored"] = out["stored"].dtype
    return out


@pytest.mark.timeout(300)
def test_uint8_in_stored_exchanged_on_two_ranks_async_equals_sync():
    a = run_ranks(uint8_on_ranks, 2, True, preimport=("avalanche.training",), timeout=250)
    s = run_ranks(uint8_on_ranks, 2, False, preimport=("avalanche.training",), timeout=250)
    for rank in range(2):
        r = a[rank]
        assert r["stored"] == torch.uint8 and ["input", [8], "uint8"] in r["layout"]
        assert r["replay_dtypes"] == r["transform_dtypes"] == {torch.uint8}
        # what crossed ranks: whole uint8 records (24 bytes), at most d of them per step
        assert all(row_bytes == 24 and sent % 24 == 0 and sent <= 24 * d
                   for sent, d, row_bytes in r["received"])
        assert sum(sent for sent, _, _ in r["received"]) > 0
        assert all(torch.equal(p, q) for p, q in zip(r["params"], s[rank]["params"]))
        assert r["received"] == s[rank]["received"]


def transform_on_ranks(rank, world, async_mode):
    transform = Jitter()
    run = naive_run(async_mode=async_mode, transform=transform, ddp=True, seed=0)
    check_transform_contract(run, transform)
    return {"params": run["params"], "model_in": run["steps"].model_in, "stored": run["stored"]}


@pytest.mark.timeout(300)
def test_transform_on_two_ranks_async_equals_sync():
    a = run_ranks(transform_on_ranks, 2, True, preimport=("avalanche.training",), timeout=250)
    s = run_ranks(transform_on_ranks, 2, False, preimport=("avalanche.training",), timeout=250)
    for rank in range(2):
        assert all(torch.equal(p, q) for p, q in zip(a[rank]["params"], s[rank]["params"]))
        assert all(torch.equal(p, q) for p, q in zip(a[rank]["model_in"], s[rank]["model_in"]))
        assert all(torch.equal(a[rank]["stored"][k], s[rank]["stored"][k]) for k in a[rank]["stored"])
    assert all(torch.equal(p, q) for p, q in zip(a[0]["params"], a[1]["params"]))  # DDP
