"""The trade-off study: ``python -m avalanche_distributed_rehearsal.study``.

The runner: it parses the arguments, launches the ranks and runs the grid's runs of the
main job (:func:`.experiment.run`, unchanged), then hands the finished runs to
:mod:`.study_report`. The grid itself (settings, points, runs, their records) lives in
:mod:`.study_grid`, below both.

The grid: world sizes, models, budgets M, replay sizes r, global sampling modes, rank
splits (iid, skewed), seeds and scaling modes, each run comparing the methods of the main
job. Scaling (``--scaling``, one or both): ``strong`` keeps the global mini-batch fixed,
``b`` new samples and ``r`` representatives per step over all ranks (``b / N`` and
``r / N`` per rank), so every world size makes the same number of SGD steps on batches of
the same size and composition, and what changes with N is only where data and buffer
live; ``weak`` keeps ``b`` and ``r`` per rank (the main job's own semantics), so N ranks
take N times larger global steps and N times fewer of them. The study launches the ranks
itself: one group of spawned processes per world size (:func:`.launch.spawn`: gloo on CPU,
``cpu:gloo,cuda:nccl`` with a GPU per rank), which runs that world size's runs one after
the other, every rank with one intra-op thread by default.

Layout of ``--output-dir`` (default ``study-results``)::

    runs/<run id>/run.json      one finished run: its settings and the main job's results
                                (written atomically, last: a run without it re-runs)
    runs/<run id>/results.json  the main job's own outputs (results.md, metric logs)
    study.json, study.md, *.png the aggregate (see :mod:`.study_report`), rewritten at
                                the end of every invocation, interrupted or not

Re-running the same command skips every run whose ``run.json`` holds the same settings,
so an interrupted study (Ctrl-C, a killed job) continues where it stopped. Exit status:
0 done, 2 bad argument (one line), 1 a run failed (its traceback in ``errors.log``),
130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .cli import (METHODS, MODELS, RANK_SPLITS, SAMPLING, SPLIT_BUDGET_METHODS, UsageError,
                  _choice, _float, _fraction, _int, joined, parse_or_status)
from .study_grid import (DEFAULT_BATCH, DEFAULT_REPLAY, N_CLASSES, QUICK, SCALINGS,
                         STUDY_METHODS, RunSpec, StudyConfig, load_average, load_run, plan,
                         run_dir, settings, write_json_atomic)

PROG = "avalanche_distributed_rehearsal.study"


# ---------------------------------------------------------------------------- arguments
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    d = StudyConfig()
    p = _Parser(prog=PROG, description=(
        "The trade-off study: runs the main job over a grid of world sizes, models, budgets, "
        "replay sizes, sampling modes, rank splits, seeds and scaling modes (it launches the "
        "ranks itself), and writes study.json, study.md and plots. Re-run the same command "
        "to continue an interrupted study. List options take commas or spaces (1,2,4 or 1 2 4)."))
    lst = dict(default=None, nargs="+")
    p.add_argument("--quick", action="store_true", help="a small preset (seeds 0,1; 3 epochs per experience; the rest as by default): under 10 minutes on 2 CPU cores; explicit options override it")
    p.add_argument("--world-sizes", **lst, help="numbers of ranks (default 1,2,4,8)")
    p.add_argument("--models", **lst, help=f"the main job's --model, among {', '.join(MODELS)} (default mlp); e.g. cnn,cnn_gn: BatchNorm against GroupNorm")
    p.add_argument("--mem-sizes", **lst, help="budgets M (default 200)")
    p.add_argument("--scaling", **lst, help="strong (default): --batch-size and --replay-sizes are global per step, divided over the ranks; weak: they are per rank, as in the main job; strong,weak: both, in one grid (runs that ask the main job for the same per-rank settings are shared)")
    p.add_argument("--replay-sizes", **lst, help=f"r, representatives per step (default {DEFAULT_REPLAY['strong'][0]} strong, {DEFAULT_REPLAY['weak'][0]} weak)")
    p.add_argument("--sampling", **lst, help=f"global sampling modes of ours, among {', '.join(SAMPLING)} (default uniform, so that ours and ours_local differ only in where samples come from)")
    p.add_argument("--rank-splits", **lst, help=f"among {', '.join(RANK_SPLITS)} (default both)")
    p.add_argument("--skew", default=None, help=f"skewed split strength in [0, 1] (default {d.skew})")
    p.add_argument("--methods", **lst, help=f"subset of {','.join(METHODS)}, or all (default {','.join(STUDY_METHODS)})")
    p.add_argument("--seeds", **lst, help="seeds, or a range like 0-4 (default 0,1,2)")
    p.add_argument("--dataset", default=None, help="the main job's --dataset (default digits)")
    p.add_argument("--data-root", default=None, help="the main job's --data-root")
    p.add_argument("--epochs", default=None, help=f"epochs per experience (default {d.epochs})")
    p.add_argument("--lr", default=None, help=f"the main job's SGD learning rate (default {d.lr})")
    p.add_argument("--batch-size", default=None, help=f"b, new samples per step (default {DEFAULT_BATCH['strong']} strong, {DEFAULT_BATCH['weak']} weak)")
    p.add_argument("--n-experiences", default=None, help=f"experiences (default {d.n_experiences})")
    p.add_argument("--threads", default=None, help=f"torch threads per rank (default {d.threads})")
    p.add_argument("--run-timeout", default=None, help=f"seconds one run may take before the study gives up (default {d.run_timeout:.0f})")
    p.add_argument("--output-dir", default=None, help=f"where runs/, study.json, study.md and the plots go (default {d.output_dir})")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def _ints(name: str, text, minimum: int) -> Tuple[int, ...]:
    text = joined(text)
    values: List[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            lo_v, hi_v = _int(name, lo, minimum), _int(name, hi, minimum)
            if hi_v < lo_v:
                raise UsageError(f"{name} range {part!r} is empty")
            values += list(range(lo_v, hi_v + 1))
        elif part:
            values.append(_int(name, part, minimum))
    if not values:
        raise UsageError(f"{name} must list at least one integer >= {minimum}, got {text!r}")
    if len(set(values)) != len(values):
        raise UsageError(f"{name} lists a value twice: {text!r}")
    return tuple(values)


def _names(name: str, text, choices: Sequence[str], allow_all: bool = False) -> Tuple[str, ...]:
    text = joined(text)
    if allow_all and text.strip() == "all":
        return tuple(choices)
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UsageError(f"{name} must name at least one of {','.join(choices)}, got {text!r}")
    for n in names:
        _choice(name, n, choices)
    if len(set(names)) != len(names):
        raise UsageError(f"{name} names a value twice: {text!r}")
    return tuple(c for c in choices if c in names)


def parse_args(argv: Optional[List[str]] = None) -> StudyConfig:
    """Parse and validate ``argv``; raise :class:`UsageError` (one line) on a bad one."""
    a = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    scalings = ("strong",) if a.scaling is None else _names("--scaling", a.scaling, SCALINGS)
    replay = None if a.replay_sizes is None else _ints("--replay-sizes", a.replay_sizes, 0)
    batch = None if a.batch_size is None else _int("--batch-size", a.batch_size, 1)
    cfg = StudyConfig(**(QUICK if a.quick else {}), quick=a.quick, scalings=scalings,
                      batch_sizes={s: DEFAULT_BATCH[s] if batch is None else batch for s in scalings},
                      replay_sizes={s: DEFAULT_REPLAY[s] if replay is None else replay
                                    for s in scalings})
    if a.world_sizes is not None:
        cfg.world_sizes = tuple(sorted(_ints("--world-sizes", a.world_sizes, 1)))
    if a.models is not None:
        cfg.models = _names("--models", a.models, MODELS)
    if a.mem_sizes is not None:
        cfg.mem_sizes = _ints("--mem-sizes", a.mem_sizes, 1)
    if a.sampling is not None:
        cfg.samplings = _names("--sampling", a.sampling, SAMPLING)
    if a.rank_splits is not None:
        cfg.rank_splits = _names("--rank-splits", a.rank_splits, RANK_SPLITS)
    if a.skew is not None:
        cfg.skew = _fraction("--skew", a.skew)
    if a.methods is not None:
        cfg.methods = _names("--methods", a.methods, METHODS, allow_all=True)
    if a.seeds is not None:
        cfg.seeds = _ints("--seeds", a.seeds, 0)
    if a.dataset is not None:
        cfg.dataset = a.dataset
    if a.data_root is not None:
        cfg.data_root = a.data_root
    for name, attr in (("--epochs", "epochs"), ("--n-experiences", "n_experiences"),
                       ("--threads", "threads")):
        value = getattr(a, attr)
        if value is not None:
            setattr(cfg, attr, _int(name, value, 1))
    if a.lr is not None:
        cfg.lr = _float("--lr", a.lr, 0.0, strict=True)
    if a.run_timeout is not None:
        cfg.run_timeout = _float("--run-timeout", a.run_timeout, 0.0, strict=True)
    if a.output_dir is not None:
        cfg.output_dir = a.output_dir
    cfg.plots = not a.no_plots
    _check(cfg)
    return cfg


def _check(cfg: StudyConfig) -> None:
    """Every run's main-job arguments must be valid: checked here, before any rank starts."""
    from .cli import check_against_world, parse_args as main_args

    if "strong" in cfg.scalings:
        for name, values in (("--batch-size", (cfg.batch_sizes["strong"],)),
                             ("--replay-sizes", cfg.replay_sizes["strong"])):
            for v in values:
                bad = [w for w in cfg.world_sizes if v % w]
                if bad:
                    raise UsageError(f"{name} {v} must be divisible by every world size under "
                                     f"--scaling strong (not by {','.join(map(str, bad))})")
        if cfg.batch_sizes["strong"] < max(cfg.world_sizes):
            raise UsageError(f"--batch-size {cfg.batch_sizes['strong']} must be at least the "
                             f"largest world size ({max(cfg.world_sizes)}) under --scaling strong")
    split_methods = [m for m in cfg.methods if m in SPLIT_BUDGET_METHODS]
    if split_methods and min(cfg.mem_sizes) < max(cfg.world_sizes):
        raise UsageError(f"--mem-sizes ({min(cfg.mem_sizes)}) must be at least the largest "
                         f"world size ({max(cfg.world_sizes)}) for {', '.join(split_methods)}")
    for spec in plan(cfg):
        main_cfg = main_args(spec.argv(cfg, "x"))  # raises UsageError naming the option
        classes = N_CLASSES.get(main_cfg.dataset, main_cfg.synthetic_classes)
        check_against_world(main_cfg, classes, spec.world)


# ---------------------------------------------------------------------------- the ranks
def _rank_main(rank: int, world: int, todo: List[Tuple[str, List[str], dict]], root: str,
               device_kind: str) -> int:
    """Every rank of one world size: run the main job for each ``(run id, argv, spec)``
    in ``todo``, in order; rank 0 writes each run's ``run.json`` when it is done."""
    import random

    import numpy as np
    import torch

    from .cli import parse_args as main_args
    from .experiment import run

    if device_kind == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    for run_id, argv, spec in todo:
        cfg = main_args(argv)
        random.seed(cfg.seed)  # the same state whatever ran before in this process
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        start = time.perf_counter()
        results = run(cfg)
        if rank == 0:
            write_json_atomic(os.path.join(cfg.output_dir, "run.json"), {
                "id": run_id, "spec": spec, "settings": settings(argv), "argv": argv,
                "seconds": time.perf_counter() - start,
                "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                "load_average": load_average(), "results": results})
    return len(todo)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Progress:
    """Watches ``run.json`` files appear and prints one line per finished run with an
    ETA: the mean seconds of finished runs of the same world size; for a world size not
    yet seen, the largest seen world size's mean scaled by ``(N / N_seen) ** k``, where
    ``k`` fits the two largest world sizes seen (1 while only one is known)."""

    def __init__(self, root: str, pending: List[RunSpec], done_before: int, total: int,
                 stream=sys.stdout):
        self.root, self.pending, self.total = root, list(pending), total
        self.done = done_before
        self.seconds: Dict[int, List[float]] = {}
        self.start = time.monotonic()
        self.stream = stream
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.poll()

    def _mean(self, world: int) -> float:
        return sum(self.seconds[world]) / len(self.seconds[world])

    def _estimate(self, world: int) -> Optional[float]:
        if world in self.seconds:
            return self._mean(world)
        if not self.seconds:
            return None
        seen = sorted(self.seconds)
        k = 1.0
        if len(seen) >= 2 and self._mean(seen[-2]) > 0 and self._mean(seen[-1]) > 0:
            k = max(0.0, math.log(self._mean(seen[-1]) / self._mean(seen[-2]))
                    / math.log(seen[-1] / seen[-2]))
        return self._mean(seen[-1]) * (world / seen[-1]) ** k

    def poll(self) -> None:
        for spec in list(self.pending):
            path = os.path.join(run_dir(self.root, spec), "run.json")
            if not os.path.exists(path):
                continue
            try:
                with open(path) as f:
                    seconds = float(json.load(f)["seconds"])
            except (OSError, ValueError, KeyError):
                continue
            self.pending.remove(spec)
            self.done += 1
            self.seconds.setdefault(spec.world, []).append(seconds)
            left = [self._estimate(s.world) for s in self.pending]
            eta = "?" if None in left else _fmt_seconds(sum(left))
            print(f"[{self.done}/{self.total}] {spec.id} ({len(spec.methods)} methods): "
                  f"{seconds:.0f} s | elapsed {_fmt_seconds(time.monotonic() - self.start)} "
                  f"| ETA {eta}", file=self.stream, flush=True)

    def _loop(self):
        while not self._stop.wait(0.5):
            self.poll()


def _device_and_backend(world: int) -> Tuple[str, str]:
    import torch

    if torch.cuda.is_available():
        return "cuda", ("cpu:gloo,cuda:nccl" if torch.cuda.device_count() >= world
                        else "cpu:gloo,cuda:gloo")
    return "cpu", "gloo"


# ---------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    """Run the study with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    cfg, status = parse_or_status(parse_args, argv, PROG)
    if cfg is None:
        return status
    from . import launch
    from .study_report import write_study

    root = cfg.output_dir
    os.makedirs(os.path.join(root, "runs"), exist_ok=True)
    runs = plan(cfg)
    finished = {s.id for s in runs if load_run(root, s, cfg) is not None}
    todo = [s for s in runs if s.id not in finished]
    cores = os.cpu_count() or 1
    invocation = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "argv": list(sys.argv[1:] if argv is None else argv),
                  "load_average_start": load_average(), "skipped": sorted(finished), "executed": [],
                  "status": "running"}
    print(f"{PROG}: {len(runs)} runs ({len(finished)} already done, {len(todo)} to run) in "
          f"{root}; {cores} CPU cores, {cfg.threads} thread(s) per rank, load "
          f"{invocation['load_average_start']}", flush=True)
    over = [w for w in cfg.world_sizes if w * cfg.threads > cores]
    if over:
        print(f"note: {','.join(map(str, over))} rank(s) x {cfg.threads} thread(s) oversubscribe "
              f"{cores} cores: train times there measure a shared CPU, not scaling", flush=True)
    status, error_line = 0, None
    progress = _Progress(root, todo, len(finished), len(runs))
    try:
        with progress:
            for world in sorted({s.world for s in todo}):
                batch = [s for s in todo if s.world == world]
                work = [(s.id, s.argv(cfg, run_dir(root, s)), dataclasses.asdict(s)) for s in batch]
                for s in batch:
                    os.makedirs(run_dir(root, s), exist_ok=True)
                kind, backend = _device_and_backend(world)
                try:
                    launch.spawn(_rank_main, world, work, root, kind, backend=backend,
                                 threads=cfg.threads, timeout=cfg.run_timeout * len(batch) + 120,
                                 preimport=["avalanche.training"], start_method="forkserver")
                except (RuntimeError, TimeoutError) as e:
                    with open(os.path.join(root, "errors.log"), "a") as f:
                        f.write(f"--- {datetime.datetime.now().isoformat()} world size {world}\n{e}\n")
                    last = [ln for ln in str(e).strip().splitlines() if ln.strip()]
                    error_line = (f"a run on {world} rank(s) failed: "
                                  f"{last[-1] if last else type(e).__name__} "
                                  f"(traceback in {os.path.join(root, 'errors.log')})")
                    status = 1
                    break
    except KeyboardInterrupt:
        status = 130
    invocation["executed"] = sorted({s.id for s in todo} - {s.id for s in progress.pending})
    invocation["load_average_end"] = load_average()
    invocation["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    invocation["status"] = {0: "complete", 1: "failed", 130: "interrupted"}[status]
    paths = write_study(cfg, runs, root, invocation)
    done = len(runs) - len(progress.pending)
    if status == 130:
        print(f"{PROG}: interrupted: {done} of {len(runs)} runs finished and kept in {root}; "
              "run the same command again to continue", file=sys.stderr)
    elif status == 1:
        print(f"{PROG}: error: {error_line}", file=sys.stderr)
    print(f"{PROG}: {done}/{len(runs)} runs; wrote {', '.join(os.path.basename(p) for p in paths)} "
          f"in {root}", flush=True)
    return status

