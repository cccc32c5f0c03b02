"""What pyproject.toml promises a user who installs the package."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _requirement(name: str) -> str:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    found = [d for d in deps if re.match(rf"{re.escape(name)}\b", d)]
    assert len(found) == 1, (name, deps)
    return found[0]


def test_torch_has_a_lower_bound_and_no_upper_bound():
    """A user on a newer PyTorch installs without a downgrade (no known break)."""
    spec = _requirement("torch")
    assert ">=" in spec and "<" not in spec.replace(">=", ""), spec
    assert "torchvision" not in spec


def test_every_upper_bound_says_why():
    text = PYPROJECT.read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.search(r'"[A-Za-z_-]+[^"]*<[^"]*"', line) and "dependencies" not in line:
            assert lines[i - 1].lstrip().startswith("#"), f"no reason above {line.strip()}"
