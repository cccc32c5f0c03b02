"""Every Python block of docs/guide-replay-features.md runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide-replay-features.md"
BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_the_guide_has_its_examples():
    assert len(BLOCKS) == 4


@pytest.mark.timeout(200)
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_guide_block_runs(index, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    if "ShardedRehearsalBuffer(100" in BLOCKS[index]:
        assert "torch.uint8 64" in out and "not integers in [0, 255]" in out
        assert out.strip().splitlines()[-1] == "8"
    if "Payload" in BLOCKS[index]:
        assert "refused" in out and out.strip().splitlines()[-1] == "False"
    if "random_crop_flip" in BLOCKS[index]:
        assert "torch.uint8 (60, 3, 16, 16)" in out
    if "DistributedERACE" in BLOCKS[index]:
        assert out.startswith("offline") and "\nonline" in out
