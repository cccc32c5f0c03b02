"""The study's grid: its settings, the points it measures, the runs of the main job that
measure them, and where those runs' records live.

The shared layer of the study package: :mod:`.study` (the runner: arguments, ranks,
progress) and :mod:`.study_report` (tables and plots) both import it, and it imports
neither, nor torch or Avalanche.

A **point** is one setting the study reports on: a scaling mode, a model, a world size, a
rank split, a budget M, a replay size r (the grid's value: over all ranks under strong
scaling, per rank under weak), a global sampling mode and a seed, with the methods that
this point adds. A **run** is one invocation of the main job, identified by what it
runs: the world size, the split, the model, M, the per-rank b and r, the sampling mode and
the seed. Points of both scalings that ask the main job for the same thing (at N = 2 the
defaults do: strong b = 32, r = 64 over 2 ranks is weak b = 16, r = 32 per rank) share one
run, which carries the union of their methods.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from typing import Dict, Iterator, List, Optional, Tuple

from .cli import DATASET_CLASSES, METHODS, Config

SCALINGS = ("strong", "weak")

#: what the study compares by default (``--methods all``: every method of the main job)
STUDY_METHODS = ("incremental", "from_scratch", "stock_replay", "stock_replay_equal", "ours",
                 "ours_local")

#: methods whose results do not depend on M, r or the sampling mode: run once per
#: (scaling, model, world, split, seed); methods that do not depend on the sampling mode:
#: once per (M, r)
NO_BUFFER = ("incremental", "from_scratch")
NO_SAMPLING = ("stock_replay", "stock_replay_equal", "ours_local")

#: classes of every dataset but synthetic
N_CLASSES = DATASET_CLASSES

#: b (new samples per step) and r (representatives per step) by scaling when not given:
#: over all ranks under strong scaling, per rank under weak
DEFAULT_BATCH = {"strong": 32, "weak": 16}
DEFAULT_REPLAY = {"strong": (64,), "weak": (32,)}


@dataclasses.dataclass
class StudyConfig:
    """The grid and the fixed settings of every run (see the study's ``--help``).

    ``batch_sizes`` and ``replay_sizes`` map each scaling of ``scalings`` to its b and its
    r values (default :data:`DEFAULT_BATCH`, :data:`DEFAULT_REPLAY`).
    """

    world_sizes: Tuple[int, ...] = (1, 2, 4, 8)
    mem_sizes: Tuple[int, ...] = (200,)
    scalings: Tuple[str, ...] = ("strong",)
    replay_sizes: Optional[Dict[str, Tuple[int, ...]]] = None
    batch_sizes: Optional[Dict[str, int]] = None
    models: Tuple[str, ...] = ("mlp",)
    samplings: Tuple[str, ...] = ("uniform",)
    rank_splits: Tuple[str, ...] = ("iid", "skewed")
    skew: float = 0.8
    methods: Tuple[str, ...] = STUDY_METHODS
    seeds: Tuple[int, ...] = (0, 1, 2)
    dataset: str = "digits"
    data_root: str = "data"
    epochs: int = 10
    lr: float = Config.lr  # the main job's default
    n_experiences: int = 5
    threads: int = 1
    run_timeout: float = 1800.0
    output_dir: str = "study-results"
    plots: bool = True
    quick: bool = False

    def __post_init__(self):
        if self.batch_sizes is None:
            self.batch_sizes = {s: DEFAULT_BATCH[s] for s in self.scalings}
        if self.replay_sizes is None:
            self.replay_sizes = {s: DEFAULT_REPLAY[s] for s in self.scalings}


#: ``--quick``: what it changes from the defaults (under 10 minutes on 2 CPU cores)
QUICK = dict(seeds=(0, 1), epochs=3)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of the main job: everything it is given that the grid varies, per rank
    (``batch``, ``replay``), and the methods it compares."""

    world: int
    split: str
    model: str
    mem_size: int
    batch: int
    replay: int
    sampling: str
    seed: int
    methods: Tuple[str, ...]

    @property
    def id(self) -> str:
        return (f"N{self.world}-{self.split}-{self.model}-M{self.mem_size}-b{self.batch}"
                f"-r{self.replay}-{self.sampling}-seed{self.seed}")

    def argv(self, cfg: StudyConfig, out: str) -> List[str]:
        """The main job's command line for this run, writing into ``out``."""
        return ["--dataset", cfg.dataset, "--data-root", cfg.data_root, "--model", self.model,
                "--n-experiences", str(cfg.n_experiences), "--epochs", str(cfg.epochs),
                "--lr", repr(cfg.lr),
                "--batch-size", str(self.batch), "--mem-size", str(self.mem_size),
                "--replay-batch-size", str(self.replay), "--sampling", self.sampling,
                "--rank-split", self.split, "--skew", str(cfg.skew), "--seed", str(self.seed),
                "--methods", ",".join(self.methods), "--threads", str(cfg.threads),
                "--output-dir", out, "--no-progress", "--no-plots"]


@dataclasses.dataclass(frozen=True)
class Point:
    """One setting the study reports on (see the module docstring); ``replay`` is the
    grid's r (all ranks under strong scaling, per rank under weak)."""

    scaling: str
    model: str
    world: int
    split: str
    mem_size: int
    replay: int
    sampling: str
    seed: int
    methods: Tuple[str, ...]

    def per_rank(self, value: int) -> int:
        """A per-step quantity of the grid (b, r) as one rank's share."""
        return value // self.world if self.scaling == "strong" else value

    def run(self, cfg: StudyConfig, methods: Optional[Tuple[str, ...]] = None) -> RunSpec:
        """The run that measures this point (with ``methods``, default the point's)."""
        return RunSpec(self.world, self.split, self.model, self.mem_size,
                       self.per_rank(cfg.batch_sizes[self.scaling]), self.per_rank(self.replay),
                       self.sampling, self.seed, self.methods if methods is None else methods)


def points(cfg: StudyConfig) -> Iterator[Point]:
    """Every point of the grid, by world size, then split, model, seed, scaling, M, r and
    sampling mode.

    Methods that ignore M, r and sampling (incremental, from scratch) join the first
    (M, r, sampling) combination of a scaling only; methods that ignore the sampling mode
    (the stock plugin, ours_local) the first sampling mode only. With one rank there is
    nothing to split: the skewed split runs from two ranks on (the study reports one-rank
    runs of the iid split for both).
    """
    for world in cfg.world_sizes:
        for split in cfg.rank_splits:
            if split != "iid" and world == 1:
                continue
            for model in cfg.models:
                for seed in cfg.seeds:
                    for scaling in cfg.scalings:
                        for i, mem in enumerate(cfg.mem_sizes):
                            for j, r in enumerate(cfg.replay_sizes[scaling]):
                                for k, sampling in enumerate(cfg.samplings):
                                    methods = tuple(
                                        m for m in cfg.methods
                                        if (m not in NO_BUFFER or i == j == k == 0)
                                        and (m not in NO_SAMPLING or k == 0))
                                    if methods:
                                        yield Point(scaling, model, world, split, mem, r,
                                                    sampling, seed, methods)


def plan(cfg: StudyConfig) -> List[RunSpec]:
    """The runs that measure every point, in the order of :func:`points`; points that ask
    the main job for the same thing share one run, with the union of their methods."""
    methods: Dict[str, set] = {}
    first: Dict[str, RunSpec] = {}
    for p in points(cfg):
        spec = p.run(cfg)
        first.setdefault(spec.id, spec)
        methods.setdefault(spec.id, set()).update(p.methods)
    return [dataclasses.replace(s, methods=tuple(m for m in METHODS if m in methods[i]))
            for i, s in first.items()]


def settings(argv: List[str]) -> List[str]:
    """``argv`` without ``--output-dir``: what must match for a finished run to count."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--output-dir":
            skip = True
        else:
            out.append(a)
    return out


def run_dir(root: str, spec: RunSpec) -> str:
    return os.path.join(root, "runs", spec.id)


def load_run(root: str, spec: RunSpec, cfg: StudyConfig) -> Optional[dict]:
    """The finished run's record, or None if it is missing, unreadable, incomplete or
    was run with other settings."""
    path = os.path.join(run_dir(root, spec), "run.json")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if record.get("settings") != settings(spec.argv(cfg, "x")):
        return None
    if set(record.get("results", {}).get("methods", {})) != set(spec.methods):
        return None
    return record


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader sees the
    old file or the new one, never a part."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, obj) -> None:
    """Write ``obj`` as JSON to ``path`` (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=1))


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages, or None where the platform has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment() -> dict:
    """The machine, for ``study.json`` (imports torch to count GPUs)."""
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__,
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
