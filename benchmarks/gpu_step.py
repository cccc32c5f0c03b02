"""Training steps on a GPU: ours against incremental training, and the host
synchronisations on the training thread. Torch only (no Avalanche), so it runs wherever
PyTorch runs, a GPU machine without Avalanche included.

A plain training loop (SGD, cross-entropy; the model, its batches and its optimiser on the
device) over a class-incremental stream of short experiences, for each model:

* ``incremental_b+r``: batches of ``b + r`` samples, no buffer (the cost to match);
* ``ours_<mode>@<shard>``: batches of ``b`` samples through
  :meth:`~avalanche_distributed_rehearsal.core.RehearsalPipeline.augment` (``r``
  representatives appended, ``c`` candidates offered), ``mode`` one of ``sync``, ``async``
  (always the worker), ``auto`` (the default), with the shard on ``shard``: ``"cuda"``
  (the shard on the GPU) or ``"cpu"`` (the shard in host memory beside a GPU model);
  ``ours_sync_again@<first shard>`` is ``ours_sync`` again, the run's A/A control.

Each experience's classes are new to the buffer and excluded from its draws while it
trains, as ``DistributedReplayPlugin`` does by default, so the boundaries' costs (a change
of excluded classes) are inside the figures. Timed: whole experiences of ``steps`` steps,
each ending with the pipeline's job drained and the device synchronised; variants
round-robin, the order rotating from round to round; the figure per step is the median
over rounds of an experience's time divided by its steps, after ``warmup_rounds`` rounds.

Traced: ``trace_steps`` steps of one more experience per variant under ``torch.profiler``
(every thread), which names the calls that make the host wait for the device
(:data:`HOST_SYNCS`: the CUDA runtime's waits, and the ATen ops that read values on the
host, which tell the cause), on the training thread (the thread that runs the steps: the
hot path) and on every other thread (the buffer's worker). On a GPU the same steps also
run under PyTorch's CUDA sync debug mode, whose warnings are counted by the thread that
raised them (:func:`cuda_sync_warnings`, checked by a probe): those counts are the
figures per step. On a CPU-only machine there is no device to wait for: the reads are
counted instead (each would wait on a GPU).
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
import warnings
from collections import Counter
from typing import Dict, List, Optional

import torch
from torch import nn

from .timing import summarize, synchronize, time_call
from .workloads import chooser_summary, make_model

#: CUDA runtime calls that make the host wait for the device (a synchronous copy included).
CUDA_WAITS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize",
              "cudaMemcpy")
#: ATen ops that read a tensor's values on the host: on a GPU tensor each waits for the
#: device (``item``, ``bool()``, ``tolist`` of one value go through the first); counted on
#: every device, so that a CPU run shows where a GPU run would wait.
HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero")
HOST_SYNCS = CUDA_WAITS + HOST_READS
#: What the warnings of ``torch.cuda.set_sync_debug_mode("warn")`` say ("called a
#: synchronizing CUDA operation").
SYNC_WARNING = "synchroniz"
#: The training thread's marker in a trace (one per traced step).
STEP_MARK = "gpu_step.step"
MODES = ("sync", "async", "auto")


def variant_names(shards: List[str]) -> List[str]:
    """Every variant of one model, in the order they are first run."""
    names = ["incremental_b+r"]
    for shard in shards:
        names += [f"ours_{mode}@{shard}" for mode in MODES]
    return names + [f"ours_sync_again@{shards[0]}"]


class _Variant:
    """One variant's model, optimiser and (for ours) rehearsal pipeline."""

    def __init__(self, name: str, base: nn.Module, device: torch.device, cfg: dict, spec: dict):
        self.name = name
        self.model = copy.deepcopy(base).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.rows = spec["b"] + spec["r"]
        self.pipeline = None
        self.seen: set = set()
        if name.startswith("ours_"):
            from avalanche_distributed_rehearsal.core import RehearsalPipeline, ShardedRehearsalBuffer

            mode, shard = name[len("ours_"):].split("@")
            mode = "sync" if mode == "sync_again" else mode
            buffer = ShardedRehearsalBuffer(cfg["mem_size"], seed=cfg.get("seed", 0),
                                            device=torch.device(shard))
            self.pipeline = RehearsalPipeline(
                buffer, batch_size_mem=spec["r"], num_candidates=spec.get("c") or spec["b"],
                async_mode={"sync": False, "async": True, "auto": "auto"}[mode])
            self.rows = spec["b"]

    def train_step(self, x, y, t, index: int, steps: int, experience: int) -> None:
        if self.pipeline is not None:
            from avalanche_distributed_rehearsal.core import StepContext

            x, y, t = self.pipeline.augment(
                x[: self.rows], y[: self.rows], t[: self.rows],
                context=StepContext(experience, 0, index, steps), steps_left=steps - index - 1)
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def experience(self, data, experience: int, classes: List[int],
                   mark: Optional[str] = None, drain: bool = True) -> None:
        """Train one experience on ``data`` (per step ``(x, y, t)`` of ``b + r`` rows); the
        pipeline's job drained at the end (``drain=False``: left running, see
        :meth:`drain`). ``mark``: a profiler label per step."""
        if self.pipeline is not None:
            self.pipeline.exclude(set(classes) - self.seen)
        for i, (x, y, t) in enumerate(data):
            if mark is None:
                self.train_step(x, y, t, i, len(data), experience)
            else:
                with torch.profiler.record_function(mark):
                    self.train_step(x, y, t, i, len(data), experience)
        self.seen |= set(classes)
        if drain:
            self.drain()

    def drain(self) -> None:
        """Wait for the pipeline's job in flight, if any."""
        if self.pipeline is not None:
            self.pipeline.drain()

    def chooser(self) -> Optional[Dict]:
        return chooser_summary(None if self.pipeline is None else self.pipeline.chooser)

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()


def _experience_data(spec: dict, classes: List[int], steps: int, device, seed: int):
    """``steps`` batches ``(x (b + r, *shape) float32, y (b + r,) int64, t zeros)`` on
    ``device``, labels drawn from ``classes``."""
    g = torch.Generator().manual_seed(seed)
    rows = spec["b"] + spec["r"]
    labels = torch.tensor(classes)[torch.randint(0, len(classes), (steps, rows), generator=g)]
    labels = labels.to(device)
    on_device = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((steps, rows, *spec["shape"]), generator=on_device, device=device)
    t = torch.zeros(rows, dtype=torch.int64, device=device)
    return [(x[i], labels[i], t) for i in range(steps)]


def _classes_of(experience: int, cfg: dict) -> List[int]:
    k, total = cfg["classes_per_exp"], cfg["classes"]
    return [(experience * k + j) % total for j in range(k)]


def host_syncs(prof, mark: str = STEP_MARK) -> Dict[str, Dict[str, int]]:
    """``{"training_thread": {name: count}, "other_threads": {...}}`` of the
    :data:`HOST_SYNCS` calls in a finished ``torch.profiler`` trace; the training thread
    is the one whose events include ``mark``."""
    events = list(prof.events())
    training = {e.thread for e in events if e.name == mark}
    out: Dict[str, Counter] = {"training_thread": Counter(), "other_threads": Counter()}
    for e in events:
        if e.name in HOST_SYNCS:
            out["training_thread" if e.thread in training else "other_threads"][e.name] += 1
    return {k: dict(v) for k, v in out.items()}


def _profiler(device: torch.device):
    """A ``torch.profiler.profile`` of every thread (the worker's included) where this
    PyTorch can, and whether it does."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    try:
        from torch._C._profiler import _ExperimentalConfig

        config = _ExperimentalConfig(profile_all_threads=True)
        return profile(activities=activities, experimental_config=config), True
    except (ImportError, TypeError):  # an older PyTorch: the calling thread only
        return profile(activities=activities), False


@contextlib.contextmanager
def warnings_by_thread(match: str):
    """Within the block, count the warnings whose message contains ``match``, on every
    thread, by ``threading.get_ident()`` of the thread that raised them (each one, none
    deduplicated); yields the ``Counter``. Other warnings are shown as usual."""
    counts: Counter = Counter()
    lock = threading.Lock()
    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if match in str(message):
                with lock:
                    counts[threading.get_ident()] += 1
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield counts


@contextlib.contextmanager
def cuda_sync_warnings(device: torch.device):
    """PyTorch's CUDA sync debug mode (``torch.cuda.set_sync_debug_mode("warn")``: a
    warning at each synchronising CUDA operation, raised on the thread that calls it)
    within the block, counted by thread (:func:`warnings_by_thread`). A probe, one
    ``item()`` on the calling thread, checks first that the warnings are seen: the
    counter yielded holds it, under the key ``"probe"``."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings_by_thread(SYNC_WARNING) as counts:
            torch.ones(1, device=device).item()
            counts["probe"] = counts.pop(threading.get_ident(), 0)
            yield counts
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _trace(variant: _Variant, data, experience: int, classes, device) -> Dict:
    prof, all_threads = _profiler(device)
    cuda = device.type == "cuda"
    with prof:
        # the steps alone: the drain at the end is the benchmark's, not the training loop's
        with cuda_sync_warnings(device) if cuda else contextlib.nullcontext(Counter()) as syncs:
            variant.experience(data, experience, classes, mark=STEP_MARK, drain=False)
        variant.drain()
        synchronize(device)
    counts = host_syncs(prof)
    steps = len(data)
    out = {"steps": steps, "all_threads": all_threads, **counts}
    if cuda and syncs.get("probe"):
        # On a GPU the sync debug mode's warnings name their thread for sure (the
        # profiler's runtime events are counted by name above).
        mine = syncs.pop(threading.get_ident(), 0)
        syncs.pop("probe")
        return {**out, "counted": ["synchronising CUDA operations (sync debug mode)"],
                "training_thread_per_step": mine / steps,
                "other_threads_per_step": sum(syncs.values()) / steps}
    # On a CPU only the reads exist (and where the probe saw no warning, they stand in).
    return {**out, "counted": list(HOST_READS), "sync_debug_seen": False if cuda else None,
            **{f"{where}_per_step": sum(counts[where].get(n, 0) for n in HOST_READS) / steps
               for where in ("training_thread", "other_threads")}}


def _model_rows(model_name: str, spec: dict, cfg: dict, device: torch.device) -> Dict:
    shards = cfg["shards"]
    base = make_model(model_name, spec["shape"], cfg["classes"])
    names = variant_names(shards)
    variants = {n: _Variant(n, base, device, cfg, spec) for n in names}
    samples: Dict[str, List[float]] = {n: [] for n in names}
    steps = cfg["steps"]
    try:
        for k in range(cfg["warmup_rounds"] + cfg["rounds"]):
            classes = _classes_of(k, cfg)
            data = _experience_data(spec, classes, steps, device, seed=k)
            order = names[k % len(names):] + names[:k % len(names)]
            for n in order:
                seconds = time_call(lambda: variants[n].experience(data, k, classes), device)
                if k >= cfg["warmup_rounds"]:
                    samples[n].append(seconds / steps)
        k = cfg["warmup_rounds"] + cfg["rounds"]
        classes = _classes_of(k, cfg)
        data = _experience_data(spec, classes, cfg["trace_steps"], device, seed=k)
        traces = {n: _trace(v, data, k, classes, device) for n, v in variants.items()}
        return {"workload": {"shape": list(spec["shape"]), "b": spec["b"], "r": spec["r"],
                             "c": spec.get("c") or spec["b"], "target": spec["target"]},
                "step": {n: summarize(s) for n, s in samples.items()},
                "trace": traces,
                "auto_chooser": {n: variants[n].chooser() for n in names if "_auto@" in n}}
    finally:
        for v in variants.values():
            v.close()


def gpu_step(rank: int, world: int, cfg: dict) -> Dict:
    """One rank: per-step times and host-sync counts of every variant, per model (see the
    module doc)."""
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.cuda.set_device(rank)
        torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    out = {"models": {m: _model_rows(m, spec, cfg, device) for m, spec in cfg["models"].items()}}
    out["seconds"] = time.perf_counter() - start
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out
