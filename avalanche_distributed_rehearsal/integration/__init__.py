"""Avalanche integration: the storage policy, the strategy plugin, distributed DER and ER-ACE."""

from .der import DistributedDER
from .er_ace import DistributedERACE
from .plugin import DistributedReplayPlugin
from .storage_policy import DistributedRehearsalBuffer

__all__ = ["DistributedDER", "DistributedERACE", "DistributedReplayPlugin",
           "DistributedRehearsalBuffer"]
