"""Run a function on N local ranks over gloo, from pytest, with a hard timeout.

A thin front for the launcher the benchmarks use (``benchmarks/launch.py``): tests
import the application-layer tooling, nothing imports the tests.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `pytest` (not `python -m pytest`) leaves the repo root out
    sys.path.insert(0, _ROOT)

from benchmarks.launch import free_port, spawn  # noqa: E402

__all__ = ["free_port", "run_ranks"]


def run_ranks(fn, world: int, *args, timeout: float = 120.0, may_die=()):
    """Run ``fn(rank, world, *args)`` on ``world`` spawned ranks; return results by rank.

    Every rank gets a gloo process group (world size 1 included) and one intra-op thread.
    ``fn`` must be importable (module level). Ranks in ``may_die`` may exit without
    reporting (their result is None). Waits for every rank, then raises AssertionError
    with each failing rank's traceback; raises TimeoutError (after killing the ranks) on
    a hang.
    """
    return spawn(fn, world, *args, backend="gloo", threads=1, timeout=timeout,
                 group_at_world_1=True, may_die=may_die, fail_fast=False,
                 error=AssertionError)
