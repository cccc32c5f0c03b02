"""A distributed rehearsal buffer for Avalanche: sharded storage, exact global sampling,
buffer work hidden behind the model's compute.

``DistributedReplayPlugin``, ``DistributedRehearsalBuffer``, ``DistributedDER`` and
``DistributedERACE`` need Avalanche and are imported on first use, so
``import avalanche_distributed_rehearsal.core`` stays torch-only.
"""

__version__ = "0.1.0"

_LAZY = {
    "DistributedReplayPlugin": "avalanche_distributed_rehearsal.integration.plugin",
    "DistributedRehearsalBuffer": "avalanche_distributed_rehearsal.integration.storage_policy",
    "DistributedDER": "avalanche_distributed_rehearsal.integration.der",
    "DistributedERACE": "avalanche_distributed_rehearsal.integration.er_ace",
}

__all__ = ["DistributedDER", "DistributedERACE", "DistributedReplayPlugin",
           "DistributedRehearsalBuffer", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
