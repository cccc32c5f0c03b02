"""Run the whole benchmark suite: ``python -m benchmarks.run --out results/`` (from the repo root).

Writes ``results.json`` (every figure, the machine, the command), ``results.md`` (the
tables and the targets) and ``scaling.png`` into ``--out``. ``--smoke`` runs every part at
tiny sizes in seconds (the test suite does that so the suite never rots). All ranks of a
world size run in one spawned group of processes, each part in turn.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import os
import platform
import sys
import time
from typing import Dict, List

import torch

from avalanche_distributed_rehearsal.app import launch

from . import report

SIZES_224 = "3x224x224"
SIZES_32 = "3x32x32"

FULL = {
    "step_overhead": {"worlds": [1, 2], "models": ["mlp", "resnet18"], "shape": [3, 32, 32],
                      "classes": 10, "b": 32, "r": 8, "c": 32, "mem_size": 2000,
                      "steps": 10, "rounds": {"mlp": 60, "resnet18": 12}, "experiences": 5},
    "online": {"worlds": [1], "model": "mlp", "shape": [3, 32, 32], "classes": 10, "b": 32,
               "r": 8, "c": 32, "mem_size": 1000, "samples_per_exp": 1280, "experiences": 5,
               "warmup": 20, "block": 8},
    "memory": {"worlds": [1, 2, 4], "shape": [3, 32, 32], "classes": 10, "mem_size": 2000,
               "samples_per_exp": 1000, "experiences": 5},
    "buffer_ops": {"worlds": [1, 2, 4], "cases": [[SIZES_32, "float32"], [SIZES_32, "uint8"],
                                                  [SIZES_224, "float32"], [SIZES_224, "uint8"]],
                   "per_rank": {SIZES_32: 2000, SIZES_224: 200}, "classes": 10, "c": 32,
                   "r": 8, "warmup": 5, "repeats": 50},
    "exchange": {"worlds": [2, 4], "cases": [[SIZES_32, "float32"], [SIZES_32, "uint8"],
                                             [SIZES_224, "float32"], [SIZES_224, "uint8"]],
                 "per_rank": {SIZES_32: 2000, SIZES_224: 200}, "classes": 10, "b": 32, "c": 16,
                 "r_values": [8, 64], "warmup": 10, "repeats": 60},
    "scaling": {"worlds": [1, 2, 4, 8], "cases": [[SIZES_32, "float32"], [SIZES_224, "uint8"]],
                "per_rank": {SIZES_32: 2000, SIZES_224: 200}, "classes": 10, "b": 32, "c": 16,
                "r": 8, "warmup": 3, "repeats": 20},
    "host_cost": {"worlds": [1], "b": 32, "c": 16, "r": 8, "dim": 64, "mem_size": 500,
                  "classes": 10, "steps": 3000, "pause_steps": 600, "pause_ms": 1.0},
    "metadata_scaling": {"worlds": [1], "sim_worlds": [8, 32, 128, 512, 1024],
                         "classes": [100, 1000, 21841], "per_rank": 2000, "c": 16, "r": 8,
                         "steps": 30, "deal_max": 128 * 1000},
    "gpu_step": {"worlds": [1], "classes": 100, "classes_per_exp": 10, "mem_size": 2000,
                 "steps": 10, "rounds": 12, "warmup_rounds": 2, "trace_steps": 10,
                 "shards": ["cuda", "cpu"],
                 "models": {"resnet18": {"shape": [3, 32, 32], "b": 128, "r": 32, "target": 1.05},
                            "resnet50": {"shape": [3, 224, 224], "b": 64, "r": 16,
                                         "target": 1.03}}},
}

TINY = "3x8x8"
SMOKE = {
    "step_overhead": {"worlds": [1, 2], "models": ["mlp", "resnet18"], "shape": [3, 16, 16],
                      "classes": 4, "b": 4, "r": 2, "c": 4, "mem_size": 40, "steps": 2,
                      "rounds": 1, "experiences": 2},
    "online": {"worlds": [1], "model": "mlp", "shape": [3, 8, 8], "classes": 4, "b": 4, "r": 2,
               "c": 4, "mem_size": 20, "samples_per_exp": 24, "experiences": 2, "warmup": 1,
               "block": 2},
    "memory": {"worlds": [1, 2], "shape": [3, 8, 8], "classes": 4, "mem_size": 20,
               "samples_per_exp": 24, "experiences": 2},
    "buffer_ops": {"worlds": [1, 2, 4], "cases": [[TINY, "float32"], [TINY, "uint8"]],
                   "per_rank": {TINY: 16}, "classes": 4, "c": 4, "r": 2, "warmup": 1,
                   "repeats": 3},
    "exchange": {"worlds": [2, 4], "cases": [[TINY, "float32"]], "per_rank": {TINY: 16},
                 "classes": 4, "b": 6, "c": 4, "r_values": [2], "warmup": 1, "repeats": 3},
    "scaling": {"worlds": [1, 2, 4], "cases": [[TINY, "float32"]], "per_rank": {TINY: 16},
                "classes": 4, "b": 6, "c": 4, "r": 2, "warmup": 1, "repeats": 4},
    "host_cost": {"worlds": [1], "b": 8, "c": 4, "r": 2, "dim": 4, "mem_size": 20,
                  "classes": 3, "steps": 20, "pause_steps": 4, "pause_ms": 1.0},
    "metadata_scaling": {"worlds": [1], "sim_worlds": [2, 8], "classes": [10, 50],
                         "per_rank": 20, "c": 4, "r": 2, "steps": 3, "deal_max": 1000},
    "gpu_step": {"worlds": [1], "classes": 4, "classes_per_exp": 2, "mem_size": 20, "steps": 3,
                 "rounds": 2, "warmup_rounds": 1, "trace_steps": 3, "shards": ["cpu"],
                 "models": {"mlp": {"shape": [3, 8, 8], "b": 4, "r": 2, "target": 1.05}}},
}

#: part -> (module, function) run on every rank of each of the part's world sizes.
AVALANCHE_PARTS = ("step_overhead", "online", "memory")

PARTS = {
    "step_overhead": ("benchmarks.step_overhead", "step_overhead"),
    "online": ("benchmarks.step_overhead", "online"),
    "memory": ("benchmarks.memory", "memory"),
    "buffer_ops": ("benchmarks.buffer_ops", "buffer_ops"),
    "exchange": ("benchmarks.exchange", "exchange"),
    "scaling": ("benchmarks.scaling", "scaling"),
    "host_cost": ("benchmarks.host_cost", "host_cost"),
    "metadata_scaling": ("benchmarks.metadata_scaling", "metadata_scaling"),
    "gpu_step": ("benchmarks.gpu_step", "gpu_step"),
}
#: Parts for a GPU: skipped on CPU at full sizes (they run on CPU at smoke sizes, so that
#: the suite keeps them working).
GPU_PARTS = ("gpu_step",)


def run_tasks(rank: int, world: int, tasks: List) -> Dict:
    """Rank entry point: run ``(part, cfg)`` tasks in order; return ``{part: result}``."""
    out = {}
    for part, cfg in tasks:
        module, name = PARTS[part]
        start = time.perf_counter()
        out[part] = getattr(importlib.import_module(module), name)(rank, world, cfg)
        if rank == 0:
            print(f"  [{world} rank(s)] {part}: {time.perf_counter() - start:.1f} s", flush=True)
    return out


def machine(device: str) -> Dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "device": device}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    try:
        import avalanche
        info["avalanche"] = avalanche.__version__
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


def load_average() -> List[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def plan(sizes: Dict, parts: List[str], device: str, smoke: bool = False):
    """``{world: [(part, cfg), ...]}`` and ``{part: reason}`` for parts skipped on this machine."""
    by_world, skipped = {}, {}
    gpus = torch.cuda.device_count() if device == "cuda" else None
    for part in parts:
        if part in GPU_PARTS and device != "cuda" and not smoke:
            skipped[part] = "needs --device cuda (runs on CPU with --smoke only)"
            continue
        cfg = dict(sizes[part], device=device, cores=os.cpu_count())
        for w in cfg.pop("worlds"):
            if gpus is not None and w > gpus:
                skipped[f"{part}@{w}"] = f"needs {w} GPUs for NCCL, {gpus} present"
                continue
            by_world.setdefault(w, []).append((part, cfg))
    return dict(sorted(by_world.items())), skipped


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results", help="output folder (created)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="buffer storage and model device; auto = cuda when available. "
                             "cuda uses NCCL and only world sizes <= the GPU count")
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per world size")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads per rank (default: the cores shared out over the "
                             "ranks); fewer leaves the buffer's worker a core of its own")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    sizes = copy.deepcopy(SMOKE if args.smoke else FULL)
    by_world, skipped = plan(sizes, args.parts, device, args.smoke)
    os.makedirs(args.out, exist_ok=True)
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {"meta": {"command": command.strip(), "smoke": args.smoke,
                        "date": datetime.datetime.now().isoformat(timespec="seconds"),
                        "machine": machine(device), "load_average_start": load_average(),
                        "skipped": skipped, "sizes": sizes,
                        "threads_per_rank": args.threads}}  # None: cores // world
    start = time.perf_counter()
    for world, tasks in by_world.items():
        print(f"world size {world}: {', '.join(p for p, _ in tasks)}", flush=True)
        t0 = time.perf_counter()
        backend = "nccl" if device == "cuda" else "gloo"
        needs_avalanche = any(p in AVALANCHE_PARTS for p, _ in tasks)
        per_rank = launch.spawn(run_tasks, world, tasks, backend=backend, timeout=args.timeout,
                                threads=args.threads,
                                preimport=["avalanche.training"] if needs_avalanche else [])
        for part, _ in tasks:
            # Timed figures are already maxima/means over ranks; memory is kept per rank.
            value = [r[part] for r in per_rank] if part == "memory" else per_rank[0][part]
            results.setdefault(part, {})[str(world)] = value
        print(f"  [{world} rank(s)] total with start-up: {time.perf_counter() - t0:.1f} s", flush=True)
    results["meta"]["seconds"] = round(time.perf_counter() - start, 1)
    results["meta"]["load_average_end"] = load_average()
    results["targets"] = report.targets(results)
    paths = report.write(results, args.out)
    print(f"wrote {', '.join(paths)} in {results['meta']['seconds']:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
