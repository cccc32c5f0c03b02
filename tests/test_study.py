"""The trade-off study and the main job's fair baselines: the skewed rank split, the
study's outputs on a tiny grid (schema, plots, resume, Ctrl-C), the M / N stock
baseline, rank-local sampling without payload, and no DeprecationWarning in the output."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from avalanche_distributed_rehearsal.app.data import load_digits
from avalanche_distributed_rehearsal.app.split import histogram, home_ranks, skewed_split
from avalanche_distributed_rehearsal.app.study import main as study_main

ROOT = Path(__file__).resolve().parents[1]
ROW_BYTES = 64 * 4 + 8 + 8  # digits sample: 64 float32 + int64 label + int64 task label
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


# ---------------------------------------------------------------------------- the split
def _labels():
    # three classes of unequal sizes, interleaved
    return torch.tensor([0] * 50 + [1] * 37 + [2] * 64)[torch.randperm(151, generator=torch.Generator().manual_seed(3))]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("skew", [0.0, 0.5, 1.0])
def test_skewed_split_partitions_then_pads_to_equal_lengths(world, skew):
    labels = _labels()
    parts = skewed_split(labels, world, skew, seed=7, experience=2)
    assert len(parts) == world
    assert len({len(p) for p in parts}) == 1  # equal lengths: equal steps on every rank
    distinct = [torch.unique(p) for p in parts]
    every = torch.cat(distinct)
    assert len(torch.unique(every)) == len(labels) == len(every)  # a partition: each sample once
    for p, d in zip(parts, distinct):
        assert set(p.tolist()) == set(d.tolist())  # padding repeats the rank's own samples
    # deterministic in the seed, different with another seed
    again = skewed_split(labels, world, skew, seed=7, experience=2)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    if world > 1:
        other = skewed_split(labels, world, skew, seed=8, experience=2)
        assert any(not torch.equal(a, b) for a, b in zip(parts, other))


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_skewed_split_class_shares(world):
    labels = _labels()
    classes = [0, 1, 2]
    homes = home_ranks(3, world)
    assert all(homes) and {w for h in homes for w in h} == set(range(world))  # nobody homeless
    for skew in (0.0, 0.5, 1.0):
        parts = skewed_split(labels, world, skew, seed=1)
        for j, c in enumerate(classes):
            n = int((labels == c).sum())
            got = [histogram(labels, torch.unique(p)).get(c, 0) for p in parts]  # before padding
            want = [n * ((1 - skew) / world + (skew / len(homes[j]) if w in homes[j] else 0))
                    for w in range(world)]
            assert sum(got) == n
            assert all(abs(g - x) < 1 for g, x in zip(got, want)), (skew, c, got, want)
        if skew == 1.0:  # each rank holds only the classes it is home to
            for w, p in enumerate(parts):
                mine = {classes[j] for j in range(3) if w in homes[j]}
                assert set(histogram(labels, p)) <= mine


def test_skewed_split_bad_arguments():
    with pytest.raises(ValueError, match="skew"):
        skewed_split(_labels(), 2, 1.5, 0)
    with pytest.raises(ValueError, match="world"):
        skewed_split(_labels(), 0, 0.5, 0)


# ---------------------------------------------------------------------------- study CLI
@pytest.mark.parametrize("argv, needle", [
    (["--world-sizes", "0"], "--world-sizes"),
    (["--world-sizes", "2,2"], "--world-sizes"),
    (["--seeds", "x"], "--seeds"),
    (["--seeds", "3-1"], "--seeds"),
    (["--methods", "ours,magic"], "--methods"),
    (["--sampling", "local"], "--sampling"),
    (["--rank-splits", "federated"], "--rank-splits"),
    (["--scaling", "linear"], "--scaling"),
    (["--skew", "1.5"], "--skew"),
    (["--world-sizes", "1,2,4", "--batch-size", "30"], "--batch-size"),
    (["--world-sizes", "8", "--mem-sizes", "4"], "--mem-sizes"),
    (["--n-experiences", "3"], "--n-experiences"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "0"], "--lr"),
    (["--lr", "fast"], "--lr"),
    (["--bogus"], "unrecognized arguments"),
])
def test_study_bad_arguments_one_line_exit_2(argv, needle, capsys, tmp_path):
    assert study_main(["--output-dir", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert err.startswith("avalanche_distributed_rehearsal.study: error:")
    assert not (tmp_path / "runs").exists()  # nothing started


def test_study_list_options_take_spaces_or_commas():
    from avalanche_distributed_rehearsal.app.study import parse_args

    a = parse_args(["--world-sizes", "1", "2", "--methods", "ours", "ours_local", "--seeds", "0-2",
                    "--models", "cnn,", "cnn_gn", "--scaling", "strong", "weak"])
    b = parse_args(["--world-sizes", "1,2", "--methods", "ours,ours_local", "--seeds", "0,1,2",
                    "--models", "cnn,cnn_gn", "--scaling", "strong,weak"])
    assert a == b and a.world_sizes == (1, 2) and a.models == ("cnn", "cnn_gn")
    assert a.scalings == ("strong", "weak") and a.seeds == (0, 1, 2)


def test_study_passes_its_training_options_to_every_run():
    """--epochs, --n-experiences and --lr reach the main job's command line of every run
    (and so the settings a finished run must match to be skipped)."""
    from avalanche_distributed_rehearsal.app.cli import parse_args as main_args
    from avalanche_distributed_rehearsal.app.study import parse_args
    from avalanche_distributed_rehearsal.app.study_grid import plan

    cfg = parse_args(["--world-sizes", "1,2", "--rank-splits", "iid", "--seeds", "0",
                      "--epochs", "2", "--lr", "0.01", "--methods", "ours"])
    runs = plan(cfg)
    assert runs
    for spec in runs:
        main = main_args(spec.argv(cfg, "out"))
        assert (main.epochs, main.lr, main.n_experiences) == (2, 0.01, 5)
    default = parse_args(["--world-sizes", "1", "--rank-splits", "iid", "--seeds", "0"])
    assert main_args(plan(default)[0].argv(default, "out")).lr == 0.05


def test_study_grid_shares_runs_between_scalings():
    """Points of both scalings that give the main job the same per-rank settings share a
    run (defaults: strong b=32, r=64 over 2 ranks is weak b=16, r=32 per rank), and that
    run carries the union of their methods; every other point has its own run."""
    from avalanche_distributed_rehearsal.app.study import parse_args
    from avalanche_distributed_rehearsal.app.study_grid import plan, points

    cfg = parse_args(["--world-sizes", "1,2,4", "--rank-splits", "iid", "--seeds", "0",
                      "--scaling", "strong,weak", "--models", "mlp,cnn",
                      "--methods", "incremental,ours", "--mem-sizes", "50,100"])
    pts = list(points(cfg))
    assert len(pts) == 3 * 2 * 2 * 2  # worlds x models x scalings x M
    runs = plan(cfg)
    ids = [r.id for r in runs]
    assert len(ids) == len(set(ids))
    by_id = {r.id: r for r in runs}
    for p in pts:  # every point is measured by a planned run that has its methods
        spec = p.run(cfg)
        assert set(p.methods) <= set(by_id[spec.id].methods)
        assert spec.batch == (32 // p.world if p.scaling == "strong" else 16)
        assert spec.replay == (64 // p.world if p.scaling == "strong" else 32)
    shared = {p.run(cfg).id for p in pts if p.scaling == "strong" and p.world == 2}
    assert shared == {p.run(cfg).id for p in pts if p.scaling == "weak" and p.world == 2}
    assert len(runs) == len({p.run(cfg).id for p in pts}) == 3 * 2 * 2 * 2 - 2 * 2
    # incremental joins the first M of each scaling only: M=50 at N=2 for both, one run
    assert by_id["N2-iid-mlp-M50-b16-r32-uniform-seed0"].methods == ("incremental", "ours")
    assert by_id["N2-iid-mlp-M100-b16-r32-uniform-seed0"].methods == ("ours",)


def test_importing_the_report_does_not_import_the_runner():
    code = ("import sys, avalanche_distributed_rehearsal.app.study_report as r; "
            "print('avalanche_distributed_rehearsal.app.study' in sys.modules, "
            "'avalanche' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------------- tiny grid
TINY = ["--world-sizes", "1,2", "--seeds", "0", "--epochs", "1", "--mem-sizes", "50",
        "--methods", "stock_replay_equal,ours,ours_local", "--skew", "1"]


def _study(out, *extra, timeout=240):
    cmd = [sys.executable, "-m", "avalanche_distributed_rehearsal.study", "--output-dir", str(out),
           *TINY, *extra]
    return subprocess.run(cmd, cwd=out.parent, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _cell(doc, method, world, split):
    if world == 1:
        split = "iid"
    found = [c for c in doc["cells"] if (c["method"], c["world_size"], c["rank_split"])
             == (method, world, split)]
    assert len(found) == 1, (method, world, split)
    return found[0]


@pytest.mark.timeout(300)
def test_study_tiny_grid_schema_plots_and_resume(tmp_path):
    out = tmp_path / "study"
    proc = _study(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = ["N1-iid-mlp-M50-b32-r64-uniform-seed0", "N2-iid-mlp-M50-b16-r32-uniform-seed0",
           "N2-skewed-mlp-M50-b16-r32-uniform-seed0"]
    assert "3 runs (0 already done, 3 to run)" in proc.stdout
    assert [ln for ln in proc.stdout.splitlines() if ln.startswith("[")][-1].startswith("[3/3]")
    assert "ETA" in proc.stdout
    doc = json.loads((out / "study.json").read_text())

    # schema
    assert doc["schema"] == 2 and doc["complete"] is True
    assert {"config", "machine", "note", "invocations", "runs", "cells", "comparisons"} <= set(doc)
    assert doc["machine"]["cpu_count"] == os.cpu_count() and doc["machine"]["threads_per_rank"] == 1
    assert doc["config"]["scalings"] == ["strong"] and doc["config"]["world_sizes"] == [1, 2]
    assert doc["config"]["models"] == ["mlp"] and doc["config"]["batch_sizes"] == {"strong": 32}
    inv = doc["invocations"]
    assert len(inv) == 1 and inv[0]["status"] == "complete" and sorted(inv[0]["executed"]) == ids
    assert len(inv[0]["load_average_start"]) == 3
    assert sorted(doc["runs"]) == ids and all(r["status"] == "done" for r in doc["runs"].values())
    assert len(doc["cells"]) == 9  # 3 methods x (N=1, N=2 iid, N=2 skewed)
    for c in doc["cells"]:
        e = c["per_seed"]["0"]
        mat = e["accuracy_matrix"]
        assert len(mat) == 5 and all(len(r) == 5 and all(0 <= v <= 1 for v in r) for r in mat)
        assert e["final_average_accuracy"] == pytest.approx(sum(mat[-1]) / 5)
        assert e["train_seconds"] > 0
        s = c["summary"]["final_average_accuracy"]
        assert s["n"] == 1 and s["mean"] == e["final_average_accuracy"] and s["std"] == 0
        assert c["seeds"] == [0] and c["mem_size"] == 50 and c["replay_mb"] == 64
        assert c["scaling"] == "strong" and c["model"] == "mlp"
        assert c["replay_per_rank"] == 64 // c["world_size"] and c["batch_per_rank"] == 32 // c["world_size"]
    assert {c["sampling"] for c in doc["cells"] if c["method"] == "ours"} == {"uniform"}
    assert {c["sampling"] for c in doc["cells"] if c["method"] == "ours_local"} == {"local"}
    comps = doc["comparisons"]
    assert len(comps["global_minus_local"]) == 3 and len(comps["ours_minus_stock_replay_equal"]) == 3
    for comp in comps["global_minus_local"]:
        a = _cell(doc, "ours", comp["world_size"], comp["rank_split"])
        b = _cell(doc, "ours_local", comp["world_size"], comp["rank_split"])
        assert comp["per_seed"]["0"] == pytest.approx(a["per_seed"]["0"]["final_average_accuracy"]
                                                      - b["per_seed"]["0"]["final_average_accuracy"])
        assert comp["verdict"] == "n/a (one seed)"

    # memory and traffic: M / N rows per rank; payload crosses ranks only for global sampling
    for world, split in ((1, "iid"), (2, "iid"), (2, "skewed")):
        for method in ("stock_replay_equal", "ours", "ours_local"):
            e = _cell(doc, method, world, split)["per_seed"]["0"]
            assert e["buffer_bytes_per_rank"] == (50 // world) * ROW_BYTES, (method, world)
        # distinct samples over all ranks: the stock plugin's buffers are replicas under
        # Avalanche's distributed sampler (iid), the ranks' own samples when split
        distinct = {m: _cell(doc, m, world, split)["per_seed"]["0"]["distinct_samples"]
                    for m in ("stock_replay_equal", "ours", "ours_local")}
        assert distinct == {"stock_replay_equal": 25 if (world, split) == (2, "iid") else 50,
                            "ours": 50, "ours_local": 50}, (world, split, distinct)
        g = _cell(doc, "ours", world, split)["per_seed"]["0"]
        loc = _cell(doc, "ours_local", world, split)["per_seed"]["0"]
        stock = _cell(doc, "stock_replay_equal", world, split)["per_seed"]["0"]
        assert loc["payload_sent_per_step"] == loc["payload_received_per_step"] == 0
        assert stock["payload_sent_per_step"] == stock["metadata_received_per_step"] == 0
        if world == 1:
            assert g["payload_sent_per_step"] == g["metadata_received_per_step"] == 0
        else:
            assert 0 < g["payload_sent_per_step"] <= 32 * ROW_BYTES  # r / N rows, some to self
            assert g["metadata_received_per_step"] > 0 and loc["metadata_received_per_step"] > 0

    # the skewed split as documented (skew 1: each rank holds its home class of each
    # experience), and every rank trains exactly its own share: ceil(L / b) steps per epoch
    run = json.loads((out / "runs" / ids[2] / "run.json").read_text())["results"]
    split = run["rank_split"]
    assert split["mode"] == "skewed" and split["skew"] == 1.0 and split["world_size"] == 2
    for e, ranks in enumerate(split["experiences"]):
        assert ranks[0]["length"] == ranks[1]["length"]
        assert list(ranks[0]["classes"]) == [str(2 * e)] and list(ranks[1]["classes"]) == [str(2 * e + 1)]
    expected = sum(math.ceil(r[0]["length"] / 16) for r in split["experiences"])  # 1 epoch, b = 32 / 2
    for name in ("stock_replay_equal", "ours", "ours_local"):
        assert run["methods"][name]["train_steps"] == expected, name
    iid = json.loads((out / "runs" / ids[1] / "run.json").read_text())["results"]
    assert iid["rank_split"]["mode"] == "iid"  # Avalanche's sampler: ceil(n / 2) samples each
    y = load_digits(0)[0].tensors[1]
    expected = sum(math.ceil(math.ceil(int(((y == 2 * e) | (y == 2 * e + 1)).sum()) / 2) / 16)
                   for e in range(5))
    assert iid["methods"]["ours"]["train_steps"] == expected

    # report and plots
    md = (out / "study.md").read_text()
    for needle in ("Final average accuracy (%)", "Buffer memory per rank", "Q1:", "Q2:",
                   "| ours_local |", "Strong scaling"):
        assert needle in md, needle
    for name in ("accuracy_vs_world.png", "memory_traffic_vs_world.png",
                 "train_time_vs_world.png", "accuracy_vs_memory.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name

    # resume: a run that was interrupted (its results there, no run.json) runs again,
    # the finished ones are kept untouched, and the re-run gives the same numbers
    mtimes = {i: (out / "runs" / i / "run.json").stat().st_mtime_ns for i in ids}
    before = json.loads((out / "runs" / ids[0] / "run.json").read_text())["results"]
    (out / "runs" / ids[0] / "run.json").unlink()
    time.sleep(0.01)
    proc = _study(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 runs (2 already done, 1 to run)" in proc.stdout
    doc = json.loads((out / "study.json").read_text())
    assert len(doc["invocations"]) == 2
    assert doc["invocations"][-1]["executed"] == [ids[0]]
    assert sorted(doc["invocations"][-1]["skipped"]) == ids[1:]
    assert all((out / "runs" / i / "run.json").stat().st_mtime_ns == mtimes[i] for i in ids[1:])
    after = json.loads((out / "runs" / ids[0] / "run.json").read_text())["results"]
    for name in before["methods"]:
        assert after["methods"][name]["accuracy_matrix"] == before["methods"][name]["accuracy_matrix"]
    assert doc["complete"] is True and len(doc["cells"]) == 9


def _png_size(path):
    import struct

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path
    return struct.unpack(">II", data[16:24])  # IHDR: width, height


@pytest.mark.timeout(300)
def test_study_models_and_both_scalings_in_one_grid(tmp_path):
    """`--models cnn,cnn_gn --scaling strong,weak`: BatchNorm and GroupNorm nets through the
    main job on 1 and 2 ranks, the model and scaling axes in study.json, study.md and the
    plots (weak scaling as its own panel of the train-time and traffic plots)."""
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "avalanche_distributed_rehearsal.study", "--output-dir", str(out),
           "--world-sizes", "1,2", "--seeds", "0", "--epochs", "1", "--mem-sizes", "50",
           "--methods", "ours,ours_local", "--rank-splits", "iid", "--models", "cnn,cnn_gn",
           "--scaling", "strong,weak"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 runs (0 already done, 6 to run)" in proc.stdout  # N=2 shared by both scalings
    doc = json.loads((out / "study.json").read_text())
    assert doc["complete"] and doc["config"]["scalings"] == ["strong", "weak"]
    assert doc["config"]["batch_sizes"] == {"strong": 32, "weak": 16}
    assert doc["config"]["replay_sizes"] == {"strong": [64], "weak": [32]}
    assert len(doc["cells"]) == 2 * 2 * 2 * 2  # methods x models x scalings x N
    cells = {(c["method"], c["model"], c["scaling"], c["world_size"]): c for c in doc["cells"]}
    for model in ("cnn", "cnn_gn"):
        run = json.loads((out / "runs" / f"N1-iid-{model}-M50-b32-r64-uniform-seed0" / "run.json"
                          ).read_text())["results"]
        assert run["config"]["model"] == model
        for method in ("ours", "ours_local"):
            strong1, weak1 = cells[method, model, "strong", 1], cells[method, model, "weak", 1]
            assert (strong1["batch_per_rank"], weak1["batch_per_rank"]) == (32, 16)
            assert strong1["per_seed"]["0"]["run"] != weak1["per_seed"]["0"]["run"]
            strong2, weak2 = cells[method, model, "strong", 2], cells[method, model, "weak", 2]
            assert strong2["per_seed"]["0"] == weak2["per_seed"]["0"]  # one shared run
            assert strong2["replay_mb"] == 64 and weak2["replay_mb"] == 32
            assert weak2["replay_per_rank"] == strong2["replay_per_rank"] == 32
            assert strong1["per_seed"]["0"]["accuracy_matrix"][0][0] > 0.5  # it learns
    comps = doc["comparisons"]["global_minus_local"]
    assert sorted((c["model"], c["scaling"], c["world_size"]) for c in comps) == sorted(
        (m, s, w) for m in ("cnn", "cnn_gn") for s in ("strong", "weak") for w in (1, 2))
    md = (out / "study.md").read_text()
    for needle in ("Strong scaling: b = 32", "Weak scaling: b = 16", "cnn (BatchNorm)",
                   "cnn_gn (GroupNorm)", "no SyncBatchNorm", "| strong | cnn_gn | iid | 2 |",
                   "share one run"):
        assert needle in md, needle
    # panels: a row per (scaling, model), a column per split; traffic: memory + a scaling each
    w, h = _png_size(out / "train_time_vs_world.png")
    assert h > 2.5 * w  # 4 rows x 1 column
    w, h = _png_size(out / "memory_traffic_vs_world.png")
    assert w > 3 * h  # memory, strong traffic, weak traffic
    _png_size(out / "accuracy_vs_world.png")
    _png_size(out / "accuracy_vs_memory.png")


@pytest.mark.timeout(240)
def test_study_ctrl_c_keeps_finished_runs(tmp_path):
    """A real Ctrl-C (SIGINT to the whole process group, as a terminal sends it) stops the
    study with status 130, keeps the finished runs, and leaves no process behind."""
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "avalanche_distributed_rehearsal.study", "--output-dir", str(out),
           "--world-sizes", "1", "--seeds", "0-9", "--epochs", "2", "--mem-sizes", "50",
           "--methods", "ours", "--rank-splits", "iid", "--no-plots"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # as from a terminal, whatever SIGINT disposition pytest inherited
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 150
        while not list(out.glob("runs/*/run.json")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no run finished"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr and "run the same command again" in stderr
    doc = json.loads((out / "study.json").read_text())
    assert doc["invocations"][-1]["status"] == "interrupted" and doc["complete"] is False
    done = [i for i, r in doc["runs"].items() if r["status"] == "done"]
    assert 1 <= len(done) < 10 and sorted(doc["invocations"][-1]["executed"]) == sorted(done)
    deadline = time.monotonic() + 20  # the fork server reaps its children, then exits
    while True:
        alive = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout
        if not alive.strip() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not alive.strip(), f"processes left in the group: {alive}"


# ---------------------------------------------------------------------------- main job
@pytest.mark.timeout(240)
def test_main_job_stock_baselines_without_deprecation_warnings(tmp_path):
    """The main job prints no DeprecationWarning from Avalanche's stock plugin (whose
    decorator re-enables them), and stock_replay_equal holds M / N samples per rank."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "avalanche_distributed_rehearsal", "--output-dir", str(out),
           "--epochs", "1", "--mem-size", "50", "--no-progress", "--no-plots",
           "--methods", "stock_replay,stock_replay_equal"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DeprecationWarning" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert "deprecated" not in (proc.stdout + proc.stderr).lower()
    res = json.loads((out / "results.json").read_text())
    ms = res["methods"]
    assert ms["stock_replay_equal"]["buffer_bytes_per_rank"] == 50 * ROW_BYTES  # one rank: M
    assert ms["stock_replay"]["buffer_bytes_per_rank"] == 50 * ROW_BYTES
    assert "stock ReplayPlugin, M / N per rank" in proc.stdout


def test_seed_statistics():
    from avalanche_distributed_rehearsal.app.study_report import stats

    s = stats([0.1, 0.2, 0.3])
    assert s["mean"] == pytest.approx(0.2) and s["std"] == pytest.approx(0.1)
    assert (s["min"], s["max"], s["n"]) == (0.1, 0.3, 3)
    assert s["ci95"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    one = stats([0.5])
    assert one["std"] == 0 and one["ci95"] is None
    assert stats([])["mean"] is None
