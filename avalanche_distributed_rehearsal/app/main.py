"""Entry point: parse the arguments, run, print the table; the exit status says how it went.

0: success. 2: a bad argument (one line on stderr naming it). 1: the data is unavailable
or another error (one line on stderr; the traceback too with ``ADR_DEBUG=1``).

Under torchrun every rank parses the same arguments, so a bad one is found by every rank
before any process group or import of Avalanche: rank 0 alone prints the line, and every
rank exits with status 2 (:func:`_fail_together`). torchrun then prints its own summary of
the failed ranks (``ChildFailedError``, its exit status 1).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import List, Optional

from .cli import PROG, UsageError, check_against_world, n_classes_of, parse_args, parse_or_status


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _launched_world() -> int:
    """The world size torchrun launched (1 in a plain process)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _quiet_known_warnings() -> None:
    """Silence third-party noise that says nothing about this run."""
    warnings.filterwarnings("ignore", message="no QP solver found")  # qpsolvers, via avalanche
    warnings.filterwarnings("ignore", message="Call to deprecated function update")  # ReplayPlugin
    warnings.filterwarnings("ignore", message="No loggers specified")


def _fail_together(status: int, timeout: float = 60.0) -> int:
    """Under torchrun: return ``status`` on every rank, none killed by the launcher first.

    torchrun terminates the other ranks (SIGTERM, exit status -15) as soon as one exits
    with an error. So each rank first makes SIGTERM exit with ``status``, then waits at a
    barrier (a gloo group of its own, at most ``timeout`` seconds) until every rank has
    done the same; after it, whichever rank exits first, the others exit with ``status``.
    The process then ends at once (``os._exit``): Python restores the default SIGTERM
    action while it shuts down, so a rank still finalising when the first one's exit
    makes torchrun signal it would die with -15. (Under torchrun this never returns.)
    """
    import signal

    def leave(signum, frame):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    signal.signal(signal.SIGTERM, leave)
    try:
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a rank that never came: exit anyway
        pass
    leave(signal.SIGTERM, None)
    return status  # not reached


def _usage_error(message: str, world: int) -> int:
    if _is_rank0():
        print(f"{PROG}: error: {message} (see --help)", file=sys.stderr)
    return _fail_together(2) if world > 1 else 2


def main(argv: Optional[List[str]] = None) -> int:
    """Run the main job with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    _quiet_known_warnings()
    world = _launched_world()
    cfg, status = parse_or_status(parse_args, argv, PROG, quiet=not _is_rank0())
    if cfg is None:
        return _fail_together(status) if status and world > 1 else status
    try:  # what needs the world size: before any process group exists
        check_against_world(cfg, n_classes_of(cfg), world)
    except UsageError as e:
        return _usage_error(str(e), world)
    from .data import DataUnavailableError
    from .experiment import run
    from .report import markdown_report

    try:
        results = run(cfg)
    except UsageError as e:
        if _is_rank0():
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except DataUnavailableError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one line for the user, details on request
        if os.environ.get("ADR_DEBUG"):
            raise
        print(f"{PROG}: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        return 1
    if _is_rank0():
        print(markdown_report(results))
        print(f"(results.json, results.md and plots in {cfg.output_dir})")
    return 0
