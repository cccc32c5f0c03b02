"""Entry point: parse the arguments, run, print the table; the exit status says how it went.

0: success. 2: a bad argument (one line on stderr naming it). 1: the data is unavailable
or another error (one line on stderr; the traceback too with ``ADR_DEBUG=1``).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import List, Optional

from .cli import PROG, UsageError, parse_args, parse_or_status


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _quiet_known_warnings() -> None:
    """Silence third-party noise that says nothing about this run."""
    warnings.filterwarnings("ignore", message="no QP solver found")  # qpsolvers, via avalanche
    warnings.filterwarnings("ignore", message="Call to deprecated function update")  # ReplayPlugin
    warnings.filterwarnings("ignore", message="No loggers specified")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the main job with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    _quiet_known_warnings()
    cfg, status = parse_or_status(parse_args, argv, PROG)
    if cfg is None:
        return status
    from .data import DataUnavailableError
    from .experiment import run
    from .report import markdown_report

    try:
        results = run(cfg)
    except UsageError as e:
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
