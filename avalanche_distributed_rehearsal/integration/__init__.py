"""Avalanche integration: the storage policy and the strategy plugin."""

from .plugin import DistributedReplayPlugin
from .storage_policy import DistributedRehearsalBuffer

__all__ = ["DistributedReplayPlugin", "DistributedRehearsalBuffer"]
