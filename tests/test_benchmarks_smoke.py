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
    for name in ("results.json", "results.md", "scaling.png"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "results.md").read_text()
    for heading in ("## Targets", "## 1. Training-step overhead", "## Online continual",
                    "## Buffer memory per rank", "## 2. Buffer operations", "## 3. Exchange",
                    "## 4. Scaling"):
        assert heading in text
    assert str(out) in stdout  # it says where it wrote
    assert results["meta"]["smoke"] and results["meta"]["machine"]["device"] == "cpu"


@pytest.mark.timeout(180)
def test_step_overhead_and_online_times_positive(smoke):
    _, results, _ = smoke
    variants = {"incremental_b", "incremental_b+r", "stock_replay", "ours_sync", "ours_async"}
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
    assert online["buffer_samples"] == {"stock_replay": mem, "ours_sync": mem, "ours_async": mem}


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
            assert row["splits_match"], "bare all-to-all must move exactly draw()'s bytes"
            assert _positive(row["ours"]) and _positive(row["bare"]) and row["ratio"] > 0


@pytest.mark.timeout(180)
def test_bytes_per_rank_constant_in_world_size(smoke):
    _, results, _ = smoke
    rows = [row for rows in results["scaling"].values() for row in rows]
    assert {row["world"] for row in rows} == {1, 2, 4}
    r, row_bytes = rows[0]["r"], rows[0]["row_bytes"]
    for row in rows:
        assert row["payload_received"] == r * row_bytes  # exactly, at every world size
        assert row["payload_sent"] == pytest.approx(r * row_bytes)  # mean over ranks
        assert 0 <= row["off_rank_sent"] <= row["payload_sent"]
        assert _positive(row["exchange"])
    assert next(row for row in rows if row["world"] == 1)["off_rank_sent"] == 0
    names = {t["target"] for t in results["targets"]}
    assert any("payload_received" in n for n in names)
    assert all(t["met"] for t in results["targets"] if "payload_received" in t["target"])


def test_cuda_paths_skip_cleanly_without_a_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA suite runs for real")
    from benchmarks import run

    by_world, skipped = run.plan(run.SMOKE, list(run.PARTS), "cuda")
    assert by_world == {} and skipped and all("GPU" in why for why in skipped.values())
    with pytest.raises(SystemExit):
        run.main(["--device", "cuda", "--smoke"])
