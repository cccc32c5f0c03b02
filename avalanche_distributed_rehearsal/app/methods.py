"""The compared methods. Each trains a fresh copy of the same network on the stream and
returns its accuracy matrix, training time and buffer footprint.

* ``incremental``: Avalanche's ``Naive``, no replay (the lower bound).
* ``from_scratch``: after each experience, a fresh network trained on the union of all
  experiences seen so far (Avalanche's ``JointTraining``; the upper bound).
* ``stock_replay``: ``Naive`` + Avalanche's ``ReplayPlugin`` with a ``ClassBalancedBuffer``
  of budget M. Every rank holds the whole buffer (M samples per rank).
* ``stock_replay_equal``: the same with M / N samples per rank (the total memory of ours).
* ``ours``: ``Naive`` + :class:`DistributedReplayPlugin` with global budget M (M / N per rank).
* ``stock_der``: Avalanche's ``DER`` (Dark Experience Replay; DER++ when beta > 0) with
  budget M, replicated on every rank.
* ``der``: :class:`DistributedDER`, the same losses over the sharded buffer (M / N per rank).
* ``ours_local``: the same, each rank sampling its own shard only (``sampling="local"``,
  no payload exchange: the ablation baseline).
* ``stock_er_ace``: Avalanche's ``ER_ACE`` (asymmetric cross-entropy replay) with budget M,
  replicated on every rank.
* ``er_ace``: :class:`DistributedERACE`, the same losses over the sharded buffer (M / N per rank).

Batch transforms (``--store-dtype uint8``: uint8 to float; ``--augment``): methods with our
buffer pass the training transform to the plugin (``transform=``: rows stored raw, every
draw augmented afresh); the stock methods, which replay in dataset space, get a model that
applies it to every training forward pass (:class:`.augment.TransformedModel`), so their
replayed rows are augmented afresh too. Evaluation converts only, never augments.

With ``Context.rank_local`` (``--rank-split skewed``) every method trains on exactly its
rank's own share of each experience (:mod:`.split`), without Avalanche's distributed sampler.
"""

from __future__ import annotations

import dataclasses
import io
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .cli import Config
from .evaluation import evaluate
from .models import build_model


@dataclasses.dataclass
class MethodResult:
    """One method's outcome on this rank.

    ``accuracy``: the ``n x n`` matrix ``R[i][j]`` (fractions). ``train_seconds``: time
    spent in ``strategy.train`` summed over experiences (evaluation excluded).
    ``buffer_bytes_per_rank``: bytes of rehearsal storage on this rank (0 without one).
    ``metrics``: the last value of every Avalanche metric the method logged.
    ``traffic``: mean bytes per training step this rank exchanged with other ranks for
    the buffer (see :class:`.traffic.TrafficMeter`); None for methods without our buffer.
    ``steps``: training iterations this rank ran over the whole stream (every rank runs
    the same number).
    ``distinct_samples``: distinct samples stored over all ranks' buffers at the end
    (:func:`.stock.distinct_samples`); None without a buffer.
    """

    name: str
    accuracy: List[List[float]]
    train_seconds: float
    buffer_bytes_per_rank: int = 0
    metrics: Dict[str, float] = dataclasses.field(default_factory=dict)
    traffic: Optional[Dict[str, float]] = None
    steps: int = 0
    distinct_samples: Optional[int] = None


@dataclasses.dataclass
class Context:
    """What every method needs: the settings, the benchmark, the world and the device."""

    cfg: Config
    benchmark: object
    sample_shape: tuple
    n_classes: int
    world: int
    rank: int
    device: torch.device
    on_experience: Callable[[str, int], None] = lambda method, exp: None
    log_file: Optional[io.TextIOBase] = None
    group: object = None  # a process group serving `device` (see experiment.group_for)
    rank_local: bool = False  # train on the rank's own dataset, no distributed sampler
    transform: object = None  # training batch transform (conversion, augmentation) or None
    eval_transform: object = None  # evaluation batch transform (conversion) or None
    input_dtype: torch.dtype = torch.float32  # dtype of the data set's inputs


def _model(ctx: Context, train_transform: bool = True) -> nn.Module:
    """The network on ``ctx.device``, behind the batch transforms when there are any
    (``train_transform=False``: the evaluation transform only, for methods whose plugin
    transforms the training batches); under torch.distributed wrapped in DDP (which
    averages gradients over ranks) on a group that serves that device."""
    model = build_model(ctx.cfg.model, ctx.sample_shape, ctx.n_classes, ctx.cfg.hidden,
                        ctx.cfg.seed)
    if ctx.transform is not None or ctx.eval_transform is not None:
        from .augment import TransformedModel

        model = TransformedModel(model, ctx.transform if train_transform else None,
                                 ctx.eval_transform)
    model = model.to(ctx.device)
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids, process_group=ctx.group)
    return model


def _evaluator(metrics=(), loggers=()):
    from avalanche.training.plugins import EvaluationPlugin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No loggers specified"
        return EvaluationPlugin(*metrics, loggers=list(loggers))


def _strategy_class(ctx: Context, cls):
    """``cls`` as the run trains it: on the rank's own data with ``--rank-split skewed``."""
    from .split import rank_local

    return rank_local(cls) if ctx.rank_local else cls


def _naive(ctx: Context, model: nn.Module, plugins=(), evaluator=None, cls=None):
    from avalanche.training.supervised import Naive

    cfg = ctx.cfg
    cls = _strategy_class(ctx, cls or Naive)
    return cls(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum),
               criterion=nn.CrossEntropyLoss(), train_mb_size=cfg.batch_size,
               train_epochs=cfg.epochs, eval_mb_size=512, device=ctx.device,
               plugins=list(plugins), evaluator=evaluator or _evaluator(), eval_every=-1)


def _run_stream(ctx: Context, name: str, strategy, model) -> MethodResult:
    torch.manual_seed(ctx.cfg.seed)  # the same shuffles for every method
    matrix, seconds = [], 0.0
    for i, exp in enumerate(ctx.benchmark.train_stream):
        start = time.perf_counter()
        strategy.train(exp, eval_streams=[], num_workers=0)
        seconds += time.perf_counter() - start
        matrix.append(evaluate(model, ctx.benchmark.test_stream, ctx.device, group=ctx.group))
        ctx.on_experience(name, i)
    return MethodResult(name, matrix, seconds, steps=strategy.clock.train_iterations)


def incremental(ctx: Context) -> MethodResult:
    model = _model(ctx)
    return _run_stream(ctx, "incremental", _naive(ctx, model), model)


def from_scratch(ctx: Context) -> MethodResult:
    from avalanche.training.supervised import JointTraining

    torch.manual_seed(ctx.cfg.seed)
    stream = ctx.benchmark.train_stream
    matrix, seconds, steps = [], 0.0, 0
    for i in range(len(stream)):
        model = _model(ctx)
        strategy = _naive(ctx, model, cls=JointTraining)
        start = time.perf_counter()
        strategy.train(stream[: i + 1], eval_streams=[], num_workers=0)
        seconds += time.perf_counter() - start
        steps += strategy.clock.train_iterations
        matrix.append(evaluate(model, ctx.benchmark.test_stream, ctx.device, group=ctx.group))
        ctx.on_experience("from_scratch", i)
    return MethodResult("from_scratch", matrix, seconds, steps=steps)


def sample_bytes(sample_shape, dtype=torch.float32) -> int:
    """Bytes of one stored sample: the input, an int64 class label and an int64 task label."""
    n = 1
    for s in sample_shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size() + 2 * 8


def _stock_replay(ctx: Context, name: str, mem_size: int) -> MethodResult:
    from avalanche.training.storage_policy import ClassBalancedBuffer

    from .stock import StockReplayPlugin, distinct_samples

    cfg = ctx.cfg
    policy = ClassBalancedBuffer(max_size=mem_size, adaptive_size=True)
    plugin = StockReplayPlugin(mem_size=mem_size, batch_size_mem=max(1, cfg.replay_mb),
                               storage_policy=policy, distributed_sampling=not ctx.rank_local)
    model = _model(ctx)
    result = _run_stream(ctx, name, _naive(ctx, model, [plugin]), model)
    # Avalanche keeps the buffer as index views of the datasets; we count what the stored
    # samples weigh (inputs + labels + task labels).
    result.buffer_bytes_per_rank = len(policy.buffer) * sample_bytes(ctx.sample_shape, ctx.input_dtype)
    result.distinct_samples = distinct_samples(policy.buffer, ctx.world, ctx.group)
    return result


def stock_replay(ctx: Context) -> MethodResult:
    """The stock plugin as Avalanche runs it: every rank holds the whole budget M."""
    return _stock_replay(ctx, "stock_replay", ctx.cfg.mem_size)


def stock_replay_equal(ctx: Context) -> MethodResult:
    """The stock plugin at our memory: M // N samples per rank (+1 on the first M % N
    ranks), the total budget M over all ranks."""
    m, n = ctx.cfg.mem_size, ctx.world
    return _stock_replay(ctx, "stock_replay_equal", m // n + (1 if ctx.rank < m % n else 0))


def _ours(ctx: Context, name: str, sampling: str) -> MethodResult:
    from avalanche.logging import TextLogger

    from ..integration import DistributedReplayPlugin
    from ..integration.metrics import buffer_metrics
    from .traffic import TrafficMeter

    cfg = ctx.cfg
    plugin = DistributedReplayPlugin(mem_size=cfg.mem_size, batch_size_mem=cfg.replay_mb,
                                     sampling=sampling, async_mode=False if cfg.sync else "auto", seed=cfg.seed,
                                     transform=ctx.transform)
    meter = TrafficMeter(plugin)
    loggers = [TextLogger(ctx.log_file)] if ctx.log_file is not None else []
    # per experience (into results.json) and per epoch (what the text logger prints)
    metrics = buffer_metrics(every="experience") + buffer_metrics(every="epoch", class_counts=False)
    evaluator = _evaluator(metrics, loggers)
    model = _model(ctx, train_transform=False)
    strategy = _naive(ctx, model, [plugin, meter], evaluator)
    return _run_sharded(ctx, name, strategy, model, plugin, evaluator, meter)


def _run_sharded(ctx: Context, name: str, strategy, model, plugin, evaluator, meter) -> MethodResult:
    """Run a method that uses our buffer (``plugin``), then record its footprint, buffer
    metrics and inter-rank traffic; the buffer is closed whatever happens."""
    from .stock import distinct_samples

    try:
        result = _run_stream(ctx, name, strategy, model)
        core = plugin.storage_policy.core
        result.buffer_bytes_per_rank = 0 if core is None else int(core.storage.nbytes)
        result.metrics = {k: v for k, v in evaluator.get_last_metrics().items()
                          if isinstance(v, (int, float))}
        result.traffic = meter.per_step()
        result.distinct_samples = distinct_samples(plugin.storage_policy.buffer, ctx.world, ctx.group)
    finally:
        plugin.close()
    return result


def ours(ctx: Context) -> MethodResult:
    """Global sampling (``--sampling``) from the union of the shards."""
    return _ours(ctx, "ours", ctx.cfg.sampling)


def ours_local(ctx: Context) -> MethodResult:
    """Each rank samples its own shard only: no payload crosses ranks."""
    return _ours(ctx, "ours_local", "local")


def _der_arguments(ctx: Context, model: nn.Module) -> dict:
    """The arguments both DER methods share: same network, optimiser, budget, r, losses."""
    cfg = ctx.cfg
    return dict(model=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum),
                criterion=nn.CrossEntropyLoss(), mem_size=cfg.mem_size,
                batch_size_mem=max(1, cfg.replay_mb), alpha=cfg.der_alpha, beta=cfg.der_beta,
                train_mb_size=cfg.batch_size, train_epochs=cfg.epochs, eval_mb_size=512,
                device=ctx.device, eval_every=-1)


def stock_der(ctx: Context) -> MethodResult:
    """Avalanche's ``DER`` (DER++ for ``--der-beta`` > 0) with budget M on every rank."""
    from avalanche.training.supervised import DER

    model = _model(ctx)
    strategy = _strategy_class(ctx, DER)(evaluator=_evaluator(), **_der_arguments(ctx, model))
    result = _run_stream(ctx, "stock_der", strategy, model)
    # every rank holds the whole buffer: inputs, labels, task labels and float32 logits
    logits = ctx.n_classes * 4
    result.buffer_bytes_per_rank = len(strategy.storage_policy.buffer) * (
        sample_bytes(ctx.sample_shape, ctx.input_dtype) + logits)
    return result


def der(ctx: Context) -> MethodResult:
    """:class:`~avalanche_distributed_rehearsal.integration.DistributedDER`: the same
    losses over the sharded buffer (M / N per rank, float16 logits), sampled uniformly
    over the union of shards like Avalanche's DER samples its buffer."""
    from ..integration import DistributedDER

    return _sharded_strategy(ctx, "der", DistributedDER, _der_arguments)


def _sharded_strategy(ctx: Context, name: str, cls, arguments) -> MethodResult:
    """Run one of our strategies (``cls``: ``DistributedDER`` or ``DistributedERACE``,
    ``arguments(ctx, model)``: its own arguments) with the buffer metrics and traffic."""
    from ..integration.metrics import buffer_metrics
    from .traffic import TrafficMeter

    cfg = ctx.cfg
    evaluator = _evaluator(buffer_metrics(every="experience"))
    model = _model(ctx, train_transform=False)
    strategy = _strategy_class(ctx, cls)(
        evaluator=evaluator, sampling="uniform", async_mode=False if cfg.sync else "auto",
        seed=cfg.seed, transform=ctx.transform, **arguments(ctx, model))
    meter = TrafficMeter(strategy.replay)
    strategy.plugins.append(meter)
    return _run_sharded(ctx, name, strategy, model, strategy.replay, evaluator, meter)


def _er_ace_arguments(ctx: Context, model: nn.Module) -> dict:
    """The arguments both ER-ACE methods share: network, optimiser, budget, r."""
    cfg = ctx.cfg
    return dict(model=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum),
                criterion=nn.CrossEntropyLoss(), mem_size=cfg.mem_size,
                batch_size_mem=max(1, cfg.replay_mb), train_mb_size=cfg.batch_size,
                train_epochs=cfg.epochs, eval_mb_size=512, device=ctx.device, eval_every=-1)


def stock_er_ace(ctx: Context) -> MethodResult:
    """Avalanche's ``ER_ACE`` with budget M on every rank."""
    from avalanche.training.supervised import ER_ACE

    from .stock import quiet

    model = _model(ctx)
    strategy = _strategy_class(ctx, quiet(ER_ACE))(evaluator=_evaluator(),
                                                   **_er_ace_arguments(ctx, model))
    result = _run_stream(ctx, "stock_er_ace", strategy, model)
    # every rank holds the whole buffer (inputs, labels, task labels)
    result.buffer_bytes_per_rank = len(strategy.storage_policy.buffer) * sample_bytes(
        ctx.sample_shape, ctx.input_dtype)
    return result


def er_ace(ctx: Context) -> MethodResult:
    """:class:`~avalanche_distributed_rehearsal.integration.DistributedERACE`: the same
    losses over the sharded buffer (M / N per rank), sampled uniformly over the union of
    shards like Avalanche's ER_ACE samples its buffer."""
    from ..integration import DistributedERACE

    return _sharded_strategy(ctx, "er_ace", DistributedERACE, _er_ace_arguments)


METHODS: Dict[str, Callable[[Context], MethodResult]] = {
    "incremental": incremental, "from_scratch": from_scratch,
    "stock_replay": stock_replay, "stock_replay_equal": stock_replay_equal,
    "ours": ours, "ours_local": ours_local, "stock_der": stock_der, "der": der,
    "stock_er_ace": stock_er_ace, "er_ace": er_ace}

#: methods that use the distributed rehearsal buffer (a buffer-metrics log each)
BUFFER_METHODS = ("ours", "ours_local")
