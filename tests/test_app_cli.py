"""The main job: argument errors, a tiny in-process run, determinism, and 2 ranks via torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from avalanche_distributed_rehearsal.app.cli import DEFAULT_METHODS as METHODS, parse_args
from avalanche_distributed_rehearsal.app.main import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--mem-size", "50", "--no-progress"]
ROW_BYTES = 64 * 4 + 8 + 8  # digits sample: 64 float32 + int64 label + int64 task label


@pytest.mark.parametrize("argv, needle", [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "two"], "--epochs"),
    (["--methods", "ours,magic"], "--methods"),
    (["--methods", "ours,ours"], "--methods"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--model", "resnet18"], "--model resnet18"),
    (["--model", "resnet18_gn"], "--model resnet18_gn"),
    (["--model", "cnn", "--dataset", "synthetic", "--synthetic-shape", "10"], "--model cnn"),
    (["--model", "vgg"], "--model"),
    (["--mem-size", "0"], "--mem-size"),
    (["--synthetic-shape", "1,2,3,4"], "--synthetic-shape"),
    (["--mem-size", "abc"], "--mem-size"),
    (["--lr", "-1"], "--lr"),
    (["--momentum", "1"], "--momentum"),
    (["--sampling", "greedy"], "--sampling"),
    (["--bogus"], "unrecognized arguments"),
    (["--backend", "cuda:magic"], "--backend"),
    (["--n-experiences", "3"], "--n-experiences"),  # needs the data: checked at run time
    (["--rank-split", "federated"], "--rank-split"),
    (["--skew", "1.5"], "--skew"),
    (["--skew", "-0.1"], "--skew"),
    (["--store-dtype", "float16"], "--store-dtype"),
    (["--dataset", "synthetic", "--store-dtype", "uint8"], "--store-dtype uint8"),
    (["--dataset", "synthetic", "--synthetic-shape", "64", "--augment"], "--augment"),
    (["--methods", "er_ace,magic"], "--methods"),
])
def test_bad_arguments_one_line_exit_2(argv, needle, capsys, tmp_path):
    assert main(TINY + ["--output-dir", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert err.startswith("avalanche_distributed_rehearsal: error:")


@pytest.mark.parametrize("words", [["ours", "der"], ["ours,der"], ["ours,", "der"], ["der", "ours"]])
def test_methods_take_commas_or_spaces(words):
    assert parse_args(["--methods", *words]).methods == ("ours", "der")


def test_models_on_the_data_they_fit():
    assert parse_args(["--model", "cnn"]).model == "cnn"  # the digits are 8x8 images
    assert parse_args(["--model", "cnn_gn", "--dataset", "synthetic", "--synthetic-shape", "3,8,8"]).model == "cnn_gn"
    assert parse_args(["--model", "resnet18_gn", "--dataset", "cifar10"]).model == "resnet18_gn"


def test_missing_torchvision_data_is_a_clear_error(capsys, tmp_path):
    assert main(["--dataset", "mnist", "--data-root", str(tmp_path), "--output-dir", str(tmp_path)] + TINY) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--download" in err and "MNIST" in err


def test_defaults():
    cfg = parse_args([])
    assert cfg.dataset == "digits" and cfg.methods == METHODS and cfg.n_experiences == 5
    assert cfg.replay_mb == 2 * cfg.batch_size


def _check_results(res, world, mem=50, epochs=1):
    assert res["world_size"] == world
    assert list(res["methods"]) == list(METHODS)
    for name, m in res["methods"].items():
        mat = m["accuracy_matrix"]
        assert len(mat) == 5 and all(len(r) == 5 and all(0 <= v <= 1 for v in r) for r in mat)
        assert m["final_average_accuracy"] == pytest.approx(sum(mat[-1]) / 5)
        assert m["average_forgetting"] == pytest.approx(
            sum(max(mat[i][j] for i in range(j, 4)) - mat[4][j] for j in range(4)) / 4)
        assert m["train_seconds"] > 0
    ms = res["methods"]
    assert ms["incremental"]["overhead_vs_incremental"] == 0.0
    assert ms["incremental"]["buffer_bytes_per_rank"] == ms["from_scratch"]["buffer_bytes_per_rank"] == 0
    assert ms["ours"]["buffer_bytes_per_rank"] == (mem // world) * ROW_BYTES  # M / N rows per rank
    assert ms["ours_local"]["buffer_bytes_per_rank"] == (mem // world) * ROW_BYTES
    assert ms["stock_replay_equal"]["buffer_bytes_per_rank"] == (mem // world) * ROW_BYTES
    assert ms["stock_replay"]["buffer_bytes_per_rank"] == mem * ROW_BYTES     # M on every rank
    # bytes to other ranks: none for rank-local sampling, r / N rows at most for global
    local, glob = ms["ours_local"]["exchanged_bytes_per_step"], ms["ours"]["exchanged_bytes_per_step"]
    assert local["payload_sent"] == local["payload_received"] == 0
    assert (glob["payload_sent"] > 0) == (world > 1) and (glob["metadata_received"] > 0) == (world > 1)
    assert res["rank_split"]["mode"] == "iid"
    steps = {m["train_steps"] for n, m in ms.items() if n != "from_scratch"}
    assert len(steps) == 1 and steps.pop() > 0  # the same steps for every method
    bm = ms["ours"]["buffer_metrics"]
    assert bm["Buffer_GlobalSize_Exp/train_phase/train_stream"] == mem
    assert bm["Buffer_LocalSize_Exp/train_phase/train_stream"] == mem // world
    assert res["config"]["epochs"] == epochs
    # every method learns the first experience (even one epoch, before any replay)
    assert all(m["accuracy_matrix"][0][0] > 0.5 for m in ms.values())


@pytest.mark.timeout(300)
def test_in_process_run_writes_everything(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--output-dir", str(out)] + TINY) == 0
    stdout = capsys.readouterr().out
    assert "| method | final avg. accuracy (%)" in stdout and "ours (DistributedReplayPlugin)" in stdout
    res = json.loads((out / "results.json").read_text())
    _check_results(res, 1)
    for f in ("results.md", "accuracy_curves.png", "accuracy_matrix.png", "ours_buffer_metrics.log"):
        assert (out / f).stat().st_size > 0
    assert "Buffer_GlobalSize_Epoch" in (out / "ours_buffer_metrics.log").read_text()
    # the same seed gives the same numbers
    out2 = tmp_path / "again"
    assert main(["--output-dir", str(out2), "--methods", "ours,stock_replay", "--no-plots"] + TINY) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    for name in ("ours", "stock_replay"):
        assert res2["methods"][name]["accuracy_matrix"] == res["methods"][name]["accuracy_matrix"]


@pytest.mark.timeout(300)
def test_synthetic_images_with_resnet18(tmp_path):
    argv = ["--dataset", "synthetic", "--synthetic-size", "60", "--synthetic-shape", "3,8,8",
            "--synthetic-classes", "4", "--n-experiences", "2", "--model", "resnet18",
            "--methods", "incremental,ours", "--batch-size", "8", "--no-plots",
            "--output-dir", str(tmp_path)] + TINY
    assert main(argv) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["sample_shape"] == [3, 8, 8] and res["n_classes"] == 4
    assert res["methods"]["ours"]["buffer_bytes_per_rank"] == 50 * (3 * 8 * 8 * 4 + 16)


@pytest.mark.timeout(300)
def test_default_main_job_on_two_ranks_with_torchrun(tmp_path):
    """The README's first command (the defaults, 2 ranks) and the accuracy it claims."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
           "-m", "avalanche_distributed_rehearsal", "--output-dir", str(out), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| method | final avg. accuracy") == 1  # rank 0 only
    res = json.loads((out / "results.json").read_text())
    _check_results(res, 2, mem=200, epochs=10)
    acc = {name: m["final_average_accuracy"] for name, m in res["methods"].items()}
    assert acc["ours"] >= acc["incremental"] + 0.50
    assert acc["ours"] >= acc["stock_replay"] - 0.02
    assert acc["from_scratch"] >= acc["ours"] - 0.01


@pytest.mark.timeout(120)
@pytest.mark.parametrize("argv, needle", [
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),  # found while parsing
    (["--mem-size", "1"], "--mem-size (1) must be at least the number of ranks (2)"),  # needs N
])
def test_argument_error_under_torchrun_printed_once_every_rank_exits_2(tmp_path, argv, needle):
    """Every rank finds the bad argument; rank 0 alone prints it, before any process group
    or Avalanche import; every rank exits 2 (none is killed by torchrun first), which
    torchrun's own failure summary lists per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
           "-m", "avalanche_distributed_rehearsal", "--output-dir", str(tmp_path / "out"), *argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode != 0
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("avalanche_distributed_rehearsal: error:")]
    assert len(ours) == 1 and needle in ours[0], proc.stderr[-3000:]
    codes = [ln.split(":", 1)[1].split()[0] for ln in proc.stderr.splitlines()
             if ln.strip().startswith("exitcode  :")]
    assert codes == ["2", "2"], proc.stderr[-3000:]  # one summary entry per rank
    # the one traceback is torchrun's own (its ChildFailedError); none comes from a rank
    assert proc.stderr.count("Traceback (most recent call last)") == 1
    assert "ChildFailedError" in proc.stderr and "avalanche_distributed_rehearsal/app" not in proc.stderr
    assert not (tmp_path / "out").exists()


def _torchrun_main(tmp_path, name, *args):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
           "-m", "avalanche_distributed_rehearsal", "--output-dir", str(out), "--no-progress",
           "--no-plots", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.timeout(300)
def test_main_job_when_the_default_group_refuses_cpu_tensors(tmp_path):
    """`--backend cuda:gloo` makes the run's default group serve CUDA tensors only, as NCCL
    does: the model, DDP, evaluation and the buffer must use a group that serves their
    device. Same numbers as over plain gloo."""
    args = ("--epochs", "2", "--methods", "incremental,stock_replay,ours")
    simulated = _torchrun_main(tmp_path, "cuda-gloo", "--backend", "cuda:gloo", *args)
    plain = _torchrun_main(tmp_path, "gloo", "--backend", "gloo", *args)
    for name in ("incremental", "stock_replay", "ours"):
        assert (simulated["methods"][name]["accuracy_matrix"]
                == plain["methods"][name]["accuracy_matrix"])
    assert simulated["config"]["backend"] == "cuda:gloo"


def _run(tmp_path, name, *args):
    out = tmp_path / name
    assert main(["--output-dir", str(out), "--no-plots"] + TINY + list(args)) == 0
    return json.loads((out / "results.json").read_text())


UINT8_ROW = 64 + 8 + 8  # digits sample as uint8 pixel counts + int64 label + int64 task label


@pytest.mark.timeout(300)
def test_uint8_storage_trains_the_same_in_a_quarter_of_the_input_bytes(tmp_path, capsys):
    """Digits are integer counts 0..16: stored as uint8 and divided by 16 on the device, the
    model sees the very values of the float32 path, so every method trains identically."""
    methods = ("--methods", "ours,stock_replay,er_ace,stock_er_ace")
    floats = _run(tmp_path, "f32", *methods)
    small = _run(tmp_path, "u8", *methods, "--store-dtype", "uint8")
    assert "uint8 inputs" in capsys.readouterr().out
    assert small["config"]["store_dtype"] == "uint8" and floats["config"]["store_dtype"] == "float32"
    for name in ("ours", "stock_replay", "er_ace", "stock_er_ace"):
        assert small["methods"][name]["accuracy_matrix"] == floats["methods"][name]["accuracy_matrix"]
        assert floats["methods"][name]["buffer_bytes_per_rank"] == 50 * ROW_BYTES
        assert small["methods"][name]["buffer_bytes_per_rank"] == 50 * UINT8_ROW
    assert small["methods"]["er_ace"]["accuracy_matrix"][0][0] > 0.5


@pytest.mark.timeout(300)
def test_augment_runs_every_method_family_and_changes_training(tmp_path):
    methods = ("--methods", "ours,stock_replay,er_ace,stock_er_ace")
    plain = _run(tmp_path, "plain", *methods)
    augmented = _run(tmp_path, "aug", *methods, "--augment")
    again = _run(tmp_path, "aug2", *methods, "--augment")
    assert augmented["config"]["augment"] is True
    for name in ("ours", "stock_replay", "er_ace", "stock_er_ace"):
        m = augmented["methods"][name]
        assert m["accuracy_matrix"] != plain["methods"][name]["accuracy_matrix"]  # it augmented
        assert m["accuracy_matrix"] == again["methods"][name]["accuracy_matrix"]  # seeded
        assert m["accuracy_matrix"][0][0] > 0.5  # and still learns


@pytest.mark.timeout(300)
def test_er_ace_pair_with_uint8_and_augmentation_on_two_ranks_with_torchrun(tmp_path):
    res = _torchrun_main(tmp_path, "er_ace", "--epochs", "1", "--mem-size", "50",
                         "--methods", "er_ace,stock_er_ace", "--store-dtype", "uint8", "--augment")
    ms = res["methods"]
    assert res["world_size"] == 2 and list(ms) == ["stock_er_ace", "er_ace"]
    assert ms["er_ace"]["buffer_bytes_per_rank"] == 25 * UINT8_ROW  # M / N uint8 rows per rank
    assert ms["stock_er_ace"]["buffer_bytes_per_rank"] == 50 * UINT8_ROW  # M on every rank
    assert ms["er_ace"]["exchanged_bytes_per_step"]["payload_sent"] > 0
    assert ms["er_ace"]["train_steps"] == ms["stock_er_ace"]["train_steps"] > 0
    assert all(m["accuracy_matrix"][0][0] > 0.5 for m in ms.values())
