"""Avalanche integration: the storage policy, the strategy plugin and distributed DER."""

from .der import DistributedDER
from .plugin import DistributedReplayPlugin
from .storage_policy import DistributedRehearsalBuffer

__all__ = ["DistributedDER", "DistributedReplayPlugin", "DistributedRehearsalBuffer"]
