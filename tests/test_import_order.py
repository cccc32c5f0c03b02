"""Avalanche must be imported before the process group exists; importing the plugin too
late says so (an ImportError naming the fix) instead of Avalanche's logger error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
try:
    from avalanche_distributed_rehearsal import DistributedReplayPlugin  # too late on rank 1
    print(f"rank {rank}: imported {DistributedReplayPlugin.__name__}", flush=True)
except ImportError as e:
    print(f"rank {rank}: ImportError: {e}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.timeout(120)
def test_importing_the_plugin_after_the_process_group_names_the_fix(tmp_path):
    script = tmp_path / "late_import.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", str(script)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted(ln for ln in proc.stdout.splitlines() if ln.startswith("rank "))
    assert lines[0] == "rank 0: imported DistributedReplayPlugin", proc.stdout
    assert lines[1].startswith("rank 1: ImportError:") and "before init_process_group" in lines[1]
