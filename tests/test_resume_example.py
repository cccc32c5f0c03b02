"""examples/resume_training.py: stopped after 2 experiences and rerun, it ends with the same
model, bit for bit, as a run that was never interrupted."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("avalanche")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples",
                      "resume_training.py")


def run(nproc, checkpoint_dir, *args):
    if nproc == 1:
        cmd = [sys.executable, SCRIPT]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", SCRIPT]
    cmd += ["--checkpoint-dir", str(checkpoint_dir), "--epochs", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=100, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


@pytest.mark.timeout(200)
@pytest.mark.parametrize("nproc", [1, 2], ids=["1-process", "2-ranks"])
def test_stop_and_rerun_equals_an_uninterrupted_run(tmp_path, nproc):
    run(nproc, tmp_path / "straight", "--out", str(tmp_path / "straight.json"))
    straight = json.loads((tmp_path / "straight.json").read_text())
    assert straight["resumed_at_experience"] == 0 and straight["trained_in_this_run"] == 5

    out = run(nproc, tmp_path / "preempted", "--stop-after", "2", "--out",
              str(tmp_path / "resumed.json"))
    assert "stopping after 2 experience(s)" in out
    assert not (tmp_path / "resumed.json").exists(), "no result before the stream is done"
    manifest = json.loads((tmp_path / "preempted" / "latest" / "manifest.json").read_text())
    assert manifest["extra"]["next_experience"] == 2 and manifest["world_size"] == nproc

    out = run(nproc, tmp_path / "preempted", "--out", str(tmp_path / "resumed.json"))
    assert "resumed from" in out
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["resumed_at_experience"] == 2 and resumed["trained_in_this_run"] == 3
    assert resumed["parameters_sha256"] == straight["parameters_sha256"]
    assert resumed["accuracy"] == straight["accuracy"]
    assert resumed["buffer_size"] == straight["buffer_size"] == 200
