"""Avalanche integration: the storage policy, the strategy plugin, distributed DER and ER-ACE.

Importing it imports Avalanche, which must happen before the process group exists: at
import time Avalanche builds loggers, and on any rank but 0 of an existing group it
refuses to ("You are creating a logger in a non-main process"). :func:`_check_import_order`
turns that into an ``ImportError`` that says what to do.
"""

import sys


def _check_import_order() -> None:
    """Raise ``ImportError`` if Avalanche is about to be imported for the first time on a
    rank other than 0 of an existing process group (its import would fail there)."""
    if "avalanche.training" in sys.modules or "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        raise ImportError(
            "avalanche_distributed_rehearsal imports Avalanche, which cannot be imported on "
            "rank {} once torch.distributed's process group exists (Avalanche builds loggers "
            "at import time and refuses to on ranks other than 0): import "
            "avalanche.training, or avalanche_distributed_rehearsal's plugin, before "
            "init_process_group (or use avalanche.distributed.DistributedHelper."
            "init_distributed, which imports it first)".format(dist.get_rank()))


_check_import_order()

from .der import DistributedDER  # noqa: E402
from .er_ace import DistributedERACE  # noqa: E402
from .plugin import DistributedReplayPlugin  # noqa: E402
from .storage_policy import DistributedRehearsalBuffer  # noqa: E402

__all__ = ["DistributedDER", "DistributedERACE", "DistributedReplayPlugin",
           "DistributedRehearsalBuffer"]
