"""One run of the main job: set up the world, load the data, run every method, summarise.

Works in one process or under ``torchrun --nproc-per-node=N`` (gloo on CPU, NCCL with one
GPU per rank). Every rank runs every method; rank 0 alone shows progress and writes files.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Dict, Optional, Tuple

import torch

from .cli import Config, check_against_world
from .data import load_data, make_benchmark
from .evaluation import accuracy_curve, average_accuracy, average_forgetting
from .methods import BUFFER_METHODS, METHODS, Context, MethodResult


def _dist():
    import torch.distributed as dist

    return dist


def setup_world(backend: str = "auto") -> Tuple[int, int, int, torch.device, bool]:
    """``(rank, world, local_world, device, created)``: joins torchrun's process group if
    launched by torchrun (``WORLD_SIZE > 1``) and none exists yet (``created`` is then True).

    ``backend="auto"``: ``"cpu:gloo,cuda:nccl"`` with GPUs (NCCL for the model, gloo for
    CPU tensors), ``"gloo"`` without.
    """
    dist = _dist()
    created = False
    cuda = torch.cuda.is_available()
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if cuda:  # ranks beyond the GPUs share them (e.g. two ranks on one GPU over gloo)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        if backend == "auto":
            backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        dist.init_process_group(backend)
        created = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world if dist.is_initialized() else 1)))
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if cuda else torch.device("cpu")
    return rank, world, local_world, device, created


def group_for(device: torch.device):
    """Collective when it creates a group. A process group that serves tensors of
    ``device``: the default group when its backend does (gloo, ``cpu:gloo,cuda:nccl``,
    NCCL for CUDA), else a new gloo group (e.g. a CPU model beside a default group that
    serves CUDA only). Every collective of the main job runs on it, with tensors on
    ``device``. None without a process group."""
    from ..core import serves

    dist = _dist()
    if not dist.is_initialized():
        return None
    if serves(None, device.type):
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def _reduce(values, ctx_group, device: torch.device, world: int, op: str = "max"):
    """Collective: ``values`` (floats) reduced over ranks by ``op`` (``"max"`` or ``"mean"``)."""
    if world == 1:
        return [float(v) for v in values]
    dist = _dist()
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=ctx_group)
    return t.tolist() if op == "max" else (t / world).tolist()


#: keys of ``MethodResult.traffic``, averaged over ranks into ``results.json``
TRAFFIC_KEYS = ("payload_sent", "payload_received", "metadata_sent", "metadata_received")


def machine_info(world: int) -> Dict[str, object]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "world_size": world,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def summarise(result: MethodResult, incremental_seconds: Optional[float]) -> Dict[str, object]:
    """The JSON record of one method (accuracies are fractions; seconds are the slowest rank's)."""
    overhead = None
    if incremental_seconds and result.name != "incremental":
        overhead = result.train_seconds / incremental_seconds - 1.0
    elif result.name == "incremental":
        overhead = 0.0
    return {"final_average_accuracy": average_accuracy(result.accuracy),
            "average_forgetting": average_forgetting(result.accuracy),
            "accuracy_curve": accuracy_curve(result.accuracy),
            "accuracy_matrix": result.accuracy,
            "train_seconds": result.train_seconds,
            "train_steps": result.steps,
            "overhead_vs_incremental": overhead,
            "buffer_bytes_per_rank": result.buffer_bytes_per_rank,
            "distinct_samples_all_ranks": result.distinct_samples,
            "exchanged_bytes_per_step": result.traffic,
            "buffer_metrics": result.metrics}


def run(cfg: Config) -> Dict[str, object]:
    """Run the experiment; return the results (the same dict on every rank). Rank 0 also
    writes ``results.json``, ``results.md`` and the plots to ``cfg.output_dir``."""
    start = time.perf_counter()
    # Avalanche creates an InteractiveLogger at import time, which it refuses to do on a
    # non-main rank once the process group exists: import it before joining the group.
    import avalanche.training  # noqa: F401

    rank, world, local_world, device, created = setup_world(cfg.backend)
    try:
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // max(1, local_world)))
        group = group_for(device)
        barrier = (lambda: _dist().barrier(group=group)) if world > 1 else None
        train, test, n_classes = load_data(cfg, rank, barrier)
        check_against_world(cfg, n_classes, world)
        benchmark = make_benchmark(train, test, n_classes, cfg.n_experiences, cfg.seed)
        rank_split: Dict[str, object] = {"mode": "iid", "sampler": "avalanche DistributedSampler"}
        rank_local = cfg.rank_split == "skewed" and world > 1
        if rank_local:
            from .split import rank_benchmark

            benchmark = rank_benchmark(benchmark, rank, world, cfg.skew, cfg.seed)
            rank_split = benchmark.split
        elif cfg.rank_split == "skewed":  # one rank: nothing to split, the iid path
            rank_split = {"mode": "skewed", "skew": cfg.skew, "world_size": 1,
                          "note": "one rank trains on the whole stream (the iid path)"}
        sample_shape = tuple(train.tensors[0].shape[1:])
        from .augment import transforms_for

        transform, eval_transform = transforms_for(
            cfg.dataset, sample_shape, cfg.augment, not train.tensors[0].is_floating_point())
        if rank == 0:
            os.makedirs(cfg.output_dir, exist_ok=True)
        units = sum(cfg.n_experiences for _ in cfg.methods)
        bar = None
        if rank == 0 and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=units, desc="experiences", unit="exp", dynamic_ncols=True)

        def on_experience(method: str, exp: int) -> None:
            if bar is not None:
                bar.set_postfix_str(f"{method} exp {exp + 1}/{cfg.n_experiences}")
                bar.update(1)

        ctx = Context(cfg, benchmark, sample_shape, n_classes, world, rank, device,
                      on_experience, None, group, rank_local=rank_local, transform=transform,
                      eval_transform=eval_transform, input_dtype=train.tensors[0].dtype)
        results: Dict[str, MethodResult] = {}
        try:
            for name in cfg.methods:
                if rank == 0 and name in BUFFER_METHODS:  # one buffer-metrics log each
                    ctx.log_file = open(os.path.join(cfg.output_dir, f"{name}_buffer_metrics.log"), "w")
                try:
                    res = METHODS[name](ctx)
                finally:
                    if ctx.log_file is not None:
                        ctx.log_file.close()
                        ctx.log_file = None
                res.train_seconds, bytes_max = _reduce(
                    [res.train_seconds, res.buffer_bytes_per_rank], group, device, world)
                res.buffer_bytes_per_rank = int(bytes_max)
                # every method, every rank (traffic or not): der meters its buffer too
                t = res.traffic or {}
                mean = _reduce([t.get(k, 0.0) for k in TRAFFIC_KEYS] + [float(bool(t))],
                               group, device, world, op="mean")
                res.traffic = (dict(zip(TRAFFIC_KEYS, mean[:-1]), steps=t.get("steps"))
                               if mean[-1] == 1.0 else None)
                results[name] = res
        finally:
            if bar is not None:
                bar.close()
        inc = results["incremental"].train_seconds if "incremental" in results else None
        out = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
               "machine": machine_info(world), "world_size": world, "n_classes": n_classes,
               "n_experiences": cfg.n_experiences, "sample_shape": list(sample_shape),
               "train_samples": len(train), "test_samples": len(test), "rank_split": rank_split,
               "methods": {n: summarise(r, inc) for n, r in results.items()}}
        out["total_seconds"] = _reduce([time.perf_counter() - start], group, device, world)[0]
        if rank == 0:
            from .report import write_report

            write_report(out, cfg.output_dir, plots=cfg.plots)
        return out
    finally:
        if created:
            _dist().destroy_process_group()
