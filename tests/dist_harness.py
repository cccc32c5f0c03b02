"""Run a function on N local ranks, from pytest, with a hard timeout.

A thin front for the package's launcher (``avalanche_distributed_rehearsal.app.launch``),
which the benchmarks and the study command use too; nothing imports the tests.
"""

from __future__ import annotations

from avalanche_distributed_rehearsal.app.launch import free_port, spawn

__all__ = ["free_port", "run_ranks"]


def run_ranks(fn, world: int, *args, timeout: float = 120.0, may_die=(), backend="gloo",
              preimport=(), group_timeout=None):
    """Run ``fn(rank, world, *args)`` on ``world`` spawned ranks; return results by rank.

    Every rank gets a default process group of ``backend`` (world size 1 included;
    ``"cuda:gloo"`` reproduces NCCL's refusal of CPU tensors on a CPU-only machine;
    ``group_timeout`` seconds) and one intra-op thread. ``preimport``: modules imported
    before the group exists.
    ``fn`` must be importable (module level). Ranks in ``may_die`` may exit without
    reporting (their result is None). Waits for every rank, then raises AssertionError
    with each failing rank's traceback; raises TimeoutError (after killing the ranks) on
    a hang.
    """
    return spawn(fn, world, *args, backend=backend, threads=1, timeout=timeout,
                 group_at_world_1=True, may_die=may_die, fail_fast=False,
                 error=AssertionError, preimport=preimport, group_timeout=group_timeout)
