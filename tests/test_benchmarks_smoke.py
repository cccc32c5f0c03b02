"""The benchmark suite at smoke sizes: every part runs, the files exist, the values are sane.

The full suite (``python -m benchmarks.run --out results/``) runs outside CI; this keeps it
from rotting. It spawns 1, 2 and 4 local gloo ranks and takes some tens of seconds.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--device", "cpu",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        return out, json.load(f), proc.stdout


def _positive(summary):
    return summary["n"] > 0 and math.isfinite(summary["median"]) and summary["median"] > 0


@pytest.mark.timeout(180)
def test_files_written(smoke):
    out, results, stdout = smoke
    for name in ("results.json", "results.md", "scaling.png", "metadata_scaling.png"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "results.md").read_text()
    for heading in ("## Targets", "## 1. Training-step overhead", "## Online continual",
                    "## Buffer memory per rank", "## 2. Buffer operations", "## 3. A whole step",
                    "## 4. Scaling", "## 5. Host time per step", "## 6. Metadata and host time",
                    "## 7. Training steps on the CPU (mlp, 1 rank)"):
        assert heading in text
    assert str(out) in stdout  # it says where it wrote
    assert results["meta"]["smoke"] and results["meta"]["machine"]["device"] == "cpu"


@pytest.mark.timeout(180)
def test_step_overhead_and_online_times_positive(smoke):
    _, results, _ = smoke
    variants = {"incremental_b", "incremental_b+r", "stock_replay", "ours_sync", "ours_async",
                "ours_auto", "ours_sync_again"}
    assert set(results["step_overhead"]) == {"1", "2"}
    for per_model in results["step_overhead"].values():
        assert set(per_model) == {"mlp", "resnet18"}
        for v in per_model.values():
            assert set(v) == variants
            assert all(_positive(s["step"]) and _positive(s["amortised"]) for s in v.values())
    online = results["online"]["1"]
    assert set(online["train_call"]) == variants
    assert all(_positive(s) for s in online["train_call"].values())
    mem = results["meta"]["sizes"]["online"]["mem_size"]
    assert online["buffer_samples"] == {"stock_replay": mem, "ours_sync": mem, "ours_async": mem,
                                        "ours_auto": mem, "ours_sync_again": mem}
    for chooser in [v["ours_auto"]["chooser"] for pm in results["step_overhead"].values()
                    for v in pm.values()] + [online["auto_chooser"]]:
        assert set(chooser) == {"choices", "early_ends", "chosen", "held"}
        assert chooser["chosen"] in ("worker", "inline") and 0 <= chooser["early_ends"] <= chooser["choices"]
    notes = [t["note"] for t in results["targets"]
             if t["target"].startswith(("step: ours a", "online CL: ours a"))]
    assert notes and all(note.startswith("2 SE of the ratio = ")
                         and "; A/A: (g) sync again / (d) sync = " in note for note in notes)


def test_the_relative_error_of_a_median_matches_the_spread_of_medians():
    """The report's error of a median (from a summary's quartiles) is, on average, within
    15 % of the observed spread of the median over many samples (normal steps, n = 40)."""
    import random

    from benchmarks.report import _relative_error
    from benchmarks.timing import summarize

    rng = random.Random(3)
    medians, errors = [], []
    for _ in range(1000):
        s = summarize([rng.gauss(10.0, 1.0) for _ in range(40)])
        medians.append(s["median"])
        errors.append(_relative_error(s) * s["median"])
    mean = sum(medians) / len(medians)
    observed = (sum((m - mean) ** 2 for m in medians) / (len(medians) - 1)) ** 0.5
    assert abs(sum(errors) / len(errors) / observed - 1) < 0.15
    assert math.isnan(_relative_error(summarize([1.0])))


@pytest.mark.timeout(180)
def test_memory_ours_sharded_stock_replicated(smoke):
    _, results, _ = smoke
    mem = results["meta"]["sizes"]["memory"]["mem_size"]
    for world, ranks in results["memory"].items():
        w = int(world)
        assert len(ranks) == w
        assert sum(r["ours_samples"] for r in ranks) == mem
        assert all(r["ours_capacity"] <= math.ceil(mem / w) for r in ranks)
        assert all(r["stock_samples"] == mem for r in ranks)
        assert all(r["ours_bytes"] > 0 for r in ranks)


@pytest.mark.timeout(180)
def test_buffer_ops_and_exchange_times_positive(smoke):
    _, results, _ = smoke
    assert set(results["buffer_ops"]) == {"1", "2", "4"}
    for rows in results["buffer_ops"].values():
        for row in rows:
            for op in ("insert", "plan", "local_draw", "exchange"):
                assert _positive(row[op]), (row["world"], op)
    assert set(results["exchange"]) == {"2", "4"}
    for rows in results["exchange"].values():
        for row in rows:
            assert all(_positive(row[k])
                       for k in ("step", "exchange", "aligned", "aligned_bare", "bare"))
            assert row["step_over_bare"] > 0 and row["exchange_over_bare"] > 0
            assert row["aligned_over_bare"] > 0
            assert row["metadata_bytes_per_rank"] > 0


@pytest.mark.timeout(180)
def test_bytes_per_rank_constant_in_world_size(smoke):
    _, results, _ = smoke
    rows = [row for rows in results["scaling"].values() for row in rows]
    assert {row["world"] for row in rows} == {1, 2, 4}
    r, row_bytes = rows[0]["r"], rows[0]["row_bytes"]
    for row in rows:
        assert row["records_received_all"] == r * row_bytes  # exactly, at every world size
        assert 0 <= row["payload_received"] <= r * row_bytes  # from other ranks only
        assert _positive(row["step"])
    one = next(row for row in rows if row["world"] == 1)
    assert one["payload_sent"] == one["metadata_sent"] == 0  # one rank: nothing leaves it
    for row in rows:  # metadata: one header + c keys to (and from) every other rank
        from avalanche_distributed_rehearsal.core.metadata import HEADER
        assert row["metadata_sent"] == (row["world"] - 1) * (HEADER + row["c"]) * 8


@pytest.mark.timeout(180)
def test_host_cost_and_metadata_scaling(smoke):
    _, results, _ = smoke
    hc = results["host_cost"]["1"]
    assert {"ours_sync", "ours_async", "floor"} <= set(hc["step"])
    assert all(_positive(s) for s in hc["step"].values())
    assert sum(hc["phases"].values()) > 0
    paused = hc["paused"]
    assert paused["pause_ms"] == 1.0 and set(paused["step"]) == set(hc["step"]) - {"ours_async"}
    assert all(_positive(s) and s["n"] == 4 for s in paused["step"].values())
    rows = results["metadata_scaling"]["1"]
    from avalanche_distributed_rehearsal.core.metadata import HEADER
    for row in rows:  # flat in the classes, linear in the other ranks
        c = row["c"]
        assert row["metadata_bytes_sent"] == (row["world"] - 1) * (HEADER + c) * 8
        assert all(_positive(row[k]) for k in ("agree", "ledger", "plan"))
    assert any("deal_seconds" in row for row in rows)


@pytest.mark.timeout(180)
def test_gpu_step_times_and_where_the_host_reads_values(smoke):
    """The GPU part at smoke sizes on CPU: every variant timed and traced; synchronous,
    the buffer reads values on the training thread; always on the worker, only there."""
    _, results, _ = smoke
    from benchmarks.gpu_step import variant_names

    run = results["gpu_step"]["1"]
    v = run["models"]["mlp"]
    assert list(v["step"]) == variant_names(["cpu"])
    assert all(_positive(s) for s in v["step"].values())
    trace = v["trace"]
    assert all(t["all_threads"] and t["steps"] == 3 for t in trace.values())
    assert trace["incremental_b+r"]["training_thread_per_step"] == 0
    assert trace["ours_sync@cpu"]["training_thread_per_step"] > 0
    assert trace["ours_async@cpu"]["training_thread_per_step"] == 0
    assert trace["ours_async@cpu"]["other_threads_per_step"] > 0
    names = [t["target"] for t in results["targets"] if t["target"].startswith("gpu_step:")]
    assert len(names) == 4 and any("host waits" in n for n in names)
    assert set(v["auto_chooser"]) == {"ours_auto@cpu"}


def test_gpu_step_is_skipped_on_cpu_at_full_sizes():
    from benchmarks import run

    by_world, skipped = run.plan(run.FULL, ["gpu_step", "host_cost"], "cpu")
    assert [p for p, _ in by_world[1]] == ["host_cost"]
    assert "--device cuda" in skipped["gpu_step"]


def test_host_syncs_counts_each_thread_apart():
    """Reads of values on the marked (training) thread and on another thread land in their
    own counts, one per read."""
    import threading

    import torch

    from benchmarks.gpu_step import STEP_MARK, _profiler, host_syncs

    x = torch.ones(4)

    def reads(k):
        for _ in range(k):
            x.sum().item()

    other = threading.Thread(target=reads, args=(3,))
    prof, all_threads = _profiler(torch.device("cpu"))
    with prof:
        with torch.profiler.record_function(STEP_MARK):
            reads(2)
        other.start()
        other.join()
    counts = host_syncs(prof)
    assert counts["training_thread"] == {"aten::_local_scalar_dense": 2}
    assert counts["other_threads"] == ({"aten::_local_scalar_dense": 3} if all_threads else {})


def test_warnings_by_thread_counts_every_warning_on_its_own_thread():
    """What counts the CUDA sync debug mode's warnings on a GPU, with plain warnings: each
    one counted (the same line repeated too) under the thread that raised it."""
    import threading
    import warnings

    from benchmarks.gpu_step import SYNC_WARNING, warnings_by_thread

    def warn(k):
        for _ in range(k):
            warnings.warn("called a synchronizing CUDA operation")

    other = threading.Thread(target=warn, args=(3,))
    with warnings_by_thread(SYNC_WARNING) as counts:
        warn(2)
        other.start()
        other.join()
        with pytest.warns(UserWarning, match="unrelated"):
            warnings.warn("unrelated")
    assert counts == {threading.get_ident(): 2, other.ident: 3}


def test_cuda_paths_skip_cleanly_without_a_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA suite runs for real")
    from benchmarks import run

    by_world, skipped = run.plan(run.SMOKE, list(run.PARTS), "cuda")
    assert by_world == {} and skipped and all("GPU" in why for why in skipped.values())
    with pytest.raises(SystemExit):
        run.main(["--device", "cuda", "--smoke"])
