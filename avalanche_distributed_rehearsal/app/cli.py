"""Command-line arguments of the main job and their validation.

Every bad argument is rejected before any work starts with one line naming the
argument, e.g. ``avalanche_distributed_rehearsal: error: --epochs must be an integer >= 1, got 0``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import sys
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

T = TypeVar("T")
PROG = "avalanche_distributed_rehearsal"
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "synthetic")
#: every ``--model``; ``_gn``: the same network with GroupNorm instead of BatchNorm
MODELS = ("mlp", "cnn", "cnn_gn", "resnet18", "resnet18_gn")
METHODS = ("incremental", "from_scratch", "stock_replay", "stock_replay_equal", "ours",
           "ours_local", "stock_der", "der", "stock_er_ace", "er_ace")
#: What the main job runs by default (``--methods default``); ``all`` adds the DER and
#: ER-ACE pairs.
DEFAULT_METHODS = ("incremental", "from_scratch", "stock_replay", "stock_replay_equal", "ours",
                   "ours_local")
#: methods whose memory is split over the ranks: each needs --mem-size >= the number of ranks
SPLIT_BUDGET_METHODS = ("stock_replay_equal", "ours", "ours_local", "der", "er_ace")
SAMPLING = ("uniform", "class_balanced")
RANK_SPLITS = ("iid", "skewed")
STORE_DTYPES = ("float32", "uint8")
#: data sets whose raw pixels are integers (``--store-dtype uint8`` keeps them as uint8)
INTEGER_PIXEL_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100")


class UsageError(ValueError):
    """A bad command-line argument; the message is one line naming the argument."""


@dataclasses.dataclass
class Config:
    """The validated settings of one run (see ``--help`` for each field)."""

    dataset: str = "digits"
    data_root: str = "data"
    download: bool = False
    synthetic_size: int = 10000
    synthetic_shape: Tuple[int, ...] = (1, 28, 28)
    synthetic_classes: int = 10
    n_experiences: int = 5
    rank_split: str = "iid"
    skew: float = 0.8
    model: str = "mlp"
    hidden: int = 128
    methods: Tuple[str, ...] = DEFAULT_METHODS
    mem_size: int = 200
    batch_size: int = 16
    replay_batch_size: Optional[int] = None
    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    sampling: str = "class_balanced"
    sync: bool = False
    der_alpha: float = 0.1
    der_beta: float = 0.5
    augment: bool = False
    store_dtype: str = "float32"
    seed: int = 0
    output_dir: str = "results"
    progress: bool = True
    plots: bool = True
    threads: Optional[int] = None
    backend: str = "auto"

    @property
    def replay_mb(self) -> int:
        """r: replayed samples per step for both replay methods (default: twice the batch size)."""
        return 2 * self.batch_size if self.replay_batch_size is None else self.replay_batch_size


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(message)


def parse_or_status(parse: Callable[[Optional[List[str]]], T], argv: Optional[List[str]],
                    prog: str, quiet: bool = False) -> Tuple[Optional[T], int]:
    """``(parse(argv), 0)``; ``(None, 2)`` after printing a one-line usage error to stderr;
    ``(None, 0)`` after ``--help``. ``quiet``: print nothing (the ranks but rank 0 under
    torchrun, which all parse the same arguments)."""
    out = io.StringIO() if quiet else None
    try:
        with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
            return parse(argv), 0
    except UsageError as e:
        if not quiet:
            print(f"{prog}: error: {e} (see --help)", file=sys.stderr)
        return None, 2
    except SystemExit as e:  # --help
        return None, int(e.code or 0)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=(
        "Class-incremental experiment: incremental (no replay), from scratch on all data "
        "seen so far, Avalanche's stock ReplayPlugin (budget M per rank, or M / N), and the "
        "distributed rehearsal buffer (global or rank-local sampling), "
        "in one process or under torchrun --nproc-per-node=N."))
    d = Config()
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, help=f"one of {', '.join(DATASETS)} (default: digits, bundled with scikit-learn)")
    g.add_argument("--data-root", default=d.data_root, help="torchvision datasets live here (default: ./data)")
    g.add_argument("--download", action="store_true", help="download torchvision datasets missing from --data-root (needs internet)")
    g.add_argument("--synthetic-size", type=str, default=str(d.synthetic_size), help="synthetic: training samples (test: a fifth)")
    g.add_argument("--synthetic-shape", type=str, default="1,28,28", help="synthetic: per-sample shape, e.g. 3,32,32 or 64")
    g.add_argument("--synthetic-classes", type=str, default=str(d.synthetic_classes), help="synthetic: number of classes")
    g.add_argument("--n-experiences", type=str, default=str(d.n_experiences), help="experiences (classes split evenly; default 5)")
    g.add_argument("--rank-split", default=d.rank_split, help="how each experience is shared among ranks: iid (default: Avalanche's distributed sampler) or skewed (each rank gets mostly its home classes, see --skew)")
    g.add_argument("--skew", type=str, default=str(d.skew), help="skewed: strength in [0, 1] (0: even split of every class, 1: each class only on its home ranks; default 0.8; seeded by --seed)")
    g = p.add_argument_group("model and training")
    g.add_argument("--model", default=d.model, help="mlp (default); cnn: a small convolutional net with BatchNorm (digits or image data); resnet18: torchvision's ResNet-18 with BatchNorm (image data C,H,W only); cnn_gn, resnet18_gn: the same with GroupNorm instead of BatchNorm. Under torchrun each rank's BatchNorm uses its own batch statistics (no SyncBatchNorm)")
    g.add_argument("--hidden", type=str, default=str(d.hidden), help="mlp hidden width (default 128)")
    g.add_argument("--epochs", type=str, default=str(d.epochs), help="epochs per experience (default 10)")
    g.add_argument("--batch-size", type=str, default=str(d.batch_size), help="b: mini-batch size per rank (default 16)")
    g.add_argument("--lr", type=str, default=str(d.lr), help="SGD learning rate (default 0.05)")
    g.add_argument("--momentum", type=str, default=str(d.momentum), help="SGD momentum (default 0.9)")
    g.add_argument("--seed", type=str, default=str(d.seed), help="seed of everything (default 0)")
    g.add_argument("--threads", type=str, default=None, help="torch threads per rank (default: cores / local ranks)")
    g.add_argument("--backend", default=d.backend, help="torch.distributed backend of the run's process group under torchrun: auto (default: cpu:gloo,cuda:nccl with GPUs, gloo without), gloo, nccl, or device:backend pairs such as cuda:gloo (which, on CPU, refuses CPU tensors as NCCL does)")
    g = p.add_argument_group("methods and buffer")
    g.add_argument("--methods", nargs="+", default=["default"], help=f"subset of {','.join(METHODS)}, comma- or space-separated; 'default' = {','.join(DEFAULT_METHODS)}; 'all' = every method (default: default)")
    g.add_argument("--mem-size", type=str, default=str(d.mem_size), help="M: buffer budget: global for ours, ours_local, der, er_ace and stock_replay_equal (M / N per rank), per rank for stock_replay, stock_der and stock_er_ace (default 200)")
    g.add_argument("--replay-batch-size", type=str, default=None, help="r: replayed samples per step for every replay method (default: twice --batch-size)")
    g.add_argument("--sampling", default=d.sampling, help="ours: uniform or class_balanced (default)")
    g.add_argument("--sync", action="store_true", help="ours: do the buffer work inline (default: measured, on the background worker only where it makes steps measurably shorter)")
    g.add_argument("--augment", action="store_true", help="augment every training batch on the device, replayed rows included (re-augmented at every draw): random shifts for digits and MNIST, crop with padding + horizontal flip for Fashion-MNIST and 32x32 images; evaluation is never augmented")
    g.add_argument("--store-dtype", default=d.store_dtype, help="float32 (default): inputs as normalised float32; uint8: the data set yields its raw integer pixels as uint8 (digits: 0..16, images: 0..255), our buffers store and exchange them as uint8 (4x less memory than float32) and a transform on the device divides them into [0, 1] (the model sees the same values)")
    g.add_argument("--der-alpha", type=str, default=str(d.der_alpha), help="der, stock_der: weight of the logit-matching (MSE) term (default 0.1)")
    g.add_argument("--der-beta", type=str, default=str(d.der_beta), help="der, stock_der: weight of the replayed samples' cross-entropy; 0 is DER, > 0 DER++ (default 0.5)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default=d.output_dir, help="results.json, results.md and PNG plots go here (default: ./results)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def _int(name: str, text, minimum: int) -> int:
    try:
        value = int(str(text), 10)
    except ValueError:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def _float(name: str, text, minimum: float, strict: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{name} must be a number, got {text!r}") from None
    if not (value > minimum if strict else value >= minimum) or value != value or value == float("inf"):
        raise UsageError(f"{name} must be a finite number {'>' if strict else '>='} {minimum}, got {text}")
    return value


def _fraction(name: str, text) -> float:
    """A number in [0, 1]."""
    value = _float(name, text, 0.0, strict=False)
    if value > 1:
        raise UsageError(f"{name} must be in [0, 1], got {text}")
    return value


def _choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _shape(text: str) -> Tuple[int, ...]:
    parts = [s.strip() for s in str(text).replace("x", ",").split(",") if s.strip()]
    if not 1 <= len(parts) <= 3:
        raise UsageError(f"--synthetic-shape must be 1 to 3 comma-separated integers >= 1 (D or C,H,W), got {text!r}")
    return tuple(_int("--synthetic-shape", s, 1) for s in parts)


_BACKENDS = ("gloo", "nccl", "mpi", "ucc")
_DEVICE_TYPES = ("cpu", "cuda")


def _backend(text: str) -> str:
    text = str(text).strip()
    if text == "auto" or text in _BACKENDS:
        return text
    pairs = [p.strip() for p in text.split(",")]
    ok = pairs and all(p.count(":") == 1 and p.split(":")[0] in _DEVICE_TYPES
                       and p.split(":")[1] in _BACKENDS for p in pairs)
    if not ok:
        raise UsageError(f"--backend must be auto, one of {', '.join(_BACKENDS)}, or "
                         f"device:backend pairs like cpu:gloo,cuda:nccl, got {text!r}")
    return text


def joined(values) -> str:
    """The words of a list option (``nargs="+"``) as one comma-separated string:
    ``["ours", "der"]`` and ``["ours,der"]`` both give ``"ours,der"``."""
    return ",".join(values) if isinstance(values, (list, tuple)) else str(values)


def _methods(text: str) -> Tuple[str, ...]:
    if text.strip() == "all":
        return METHODS
    if text.strip() == "default":
        return DEFAULT_METHODS
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UsageError(f"--methods must name at least one of {','.join(METHODS)}, got {text!r}")
    for n in names:
        _choice("--methods", n, METHODS)
    if len(set(names)) != len(names):
        raise UsageError(f"--methods names a method twice: {text!r}")
    return tuple(m for m in METHODS if m in names)  # fixed order in the report


def parse_args(argv: Optional[List[str]] = None) -> Config:
    """Parse and validate ``argv`` (default ``sys.argv[1:]``); raise :class:`UsageError`."""
    a = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    cfg = Config(
        dataset=_choice("--dataset", a.dataset, DATASETS),
        data_root=a.data_root,
        download=a.download,
        synthetic_size=_int("--synthetic-size", a.synthetic_size, 1),
        synthetic_shape=_shape(a.synthetic_shape),
        synthetic_classes=_int("--synthetic-classes", a.synthetic_classes, 2),
        n_experiences=_int("--n-experiences", a.n_experiences, 1),
        rank_split=_choice("--rank-split", a.rank_split, RANK_SPLITS),
        skew=_fraction("--skew", a.skew),
        model=_choice("--model", a.model, MODELS),
        hidden=_int("--hidden", a.hidden, 1),
        methods=_methods(joined(a.methods)),
        mem_size=_int("--mem-size", a.mem_size, 1),
        batch_size=_int("--batch-size", a.batch_size, 1),
        replay_batch_size=None if a.replay_batch_size is None else _int("--replay-batch-size", a.replay_batch_size, 0),
        epochs=_int("--epochs", a.epochs, 1),
        lr=_float("--lr", a.lr, 0.0, strict=True),
        momentum=_float("--momentum", a.momentum, 0.0, strict=False),
        sampling=_choice("--sampling", a.sampling, SAMPLING),
        sync=a.sync,
        der_alpha=_float("--der-alpha", a.der_alpha, 0.0, strict=False),
        der_beta=_float("--der-beta", a.der_beta, 0.0, strict=False),
        augment=a.augment,
        store_dtype=_choice("--store-dtype", a.store_dtype, STORE_DTYPES),
        seed=_int("--seed", a.seed, 0),
        output_dir=a.output_dir,
        progress=not a.no_progress,
        plots=not a.no_plots,
        threads=None if a.threads is None else _int("--threads", a.threads, 1),
        backend=_backend(a.backend),
    )
    if cfg.momentum >= 1:
        raise UsageError(f"--momentum must be smaller than 1, got {cfg.momentum}")
    _check_model(cfg)
    if cfg.store_dtype == "uint8" and cfg.dataset not in INTEGER_PIXEL_DATASETS:
        raise UsageError(f"--store-dtype uint8 needs a data set of integer pixels "
                         f"({', '.join(INTEGER_PIXEL_DATASETS)}); {cfg.dataset} samples are floats")
    if cfg.augment and cfg.dataset == "synthetic" and len(cfg.synthetic_shape) != 3:
        raise UsageError("--augment needs image data: digits, an image data set or synthetic "
                         f"with a C,H,W --synthetic-shape, got {','.join(map(str, cfg.synthetic_shape))}")
    if cfg.dataset == "synthetic" and cfg.synthetic_size < cfg.synthetic_classes:
        raise UsageError(f"--synthetic-size ({cfg.synthetic_size}) must be at least "
                         f"--synthetic-classes ({cfg.synthetic_classes})")
    return cfg


def _check_model(cfg: Config) -> None:
    """Convolutional models need image-shaped samples (the digits are 8x8 images, flat)."""
    synthetic = cfg.synthetic_shape if cfg.dataset == "synthetic" else None
    if cfg.model.startswith("resnet18") and (cfg.dataset == "digits" or
                                             (synthetic is not None and len(synthetic) != 3)):
        raise UsageError(f"--model {cfg.model} needs image data (C,H,W): use --dataset mnist, "
                         "fashion-mnist, cifar10, cifar100 or synthetic with a C,H,W "
                         "--synthetic-shape (--model cnn runs on the 8x8 digits)")
    if cfg.model.startswith("cnn") and synthetic is not None and len(synthetic) != 3 and not (
            len(synthetic) == 1 and math.isqrt(synthetic[0]) ** 2 == synthetic[0]):
        raise UsageError(f"--model {cfg.model} needs image data: a C,H,W --synthetic-shape or "
                         f"a flat square one (e.g. 64), got {','.join(map(str, synthetic))}")


#: classes of every dataset but synthetic (whose --synthetic-classes says)
DATASET_CLASSES = {"digits": 10, "mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100}


def n_classes_of(cfg: Config) -> int:
    """The number of classes ``cfg.dataset`` has, known without loading it."""
    return DATASET_CLASSES.get(cfg.dataset, cfg.synthetic_classes)


def check_against_world(cfg: Config, n_classes: int, world: int) -> None:
    """Checks that need the data or the world size; raise :class:`UsageError`."""
    if cfg.n_experiences > n_classes:
        raise UsageError(f"--n-experiences ({cfg.n_experiences}) must be at most the number "
                         f"of classes ({n_classes})")
    if n_classes % cfg.n_experiences:
        raise UsageError(f"--n-experiences ({cfg.n_experiences}) must divide the number of "
                         f"classes ({n_classes}) evenly")
    split = [m for m in cfg.methods if m in SPLIT_BUDGET_METHODS]
    if split and cfg.mem_size < world:
        raise UsageError(f"--mem-size ({cfg.mem_size}) must be at least the number of ranks "
                         f"({world}) for {', '.join(split)}")
