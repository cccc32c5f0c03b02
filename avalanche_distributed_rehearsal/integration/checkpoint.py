"""Save and resume a whole Avalanche training run without dill.

``save_training_checkpoint`` writes, into one atomically replaced directory, the buffer
checkpoint of :mod:`avalanche_distributed_rehearsal.core.checkpoint` (one shard per rank
and a manifest) plus ``training.pt``: the model's and optimizer's ``state_dict``, the
strategy clock's counters, the plugin's state (step counter, classes seen) and rank 0's random number generator
states (torch, Python, NumPy: data-loader shuffling draws from them), all plain tensors
and ints.
"""

from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch

from ..core.checkpoint import CheckpointError, load_buffer_checkpoint, save_buffer_checkpoint
from .plugin import DistributedReplayPlugin

TRAINING_FILE = "training.pt"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _clock_state(strategy) -> dict:
    return {k: v for k, v in vars(strategy.clock).items() if isinstance(v, (int, float))}


def save_training_checkpoint(path: str, strategy, plugin: DistributedReplayPlugin,
                             extra: Optional[dict] = None) -> None:
    """Collective. Save model, optimizer, strategy clock and the plugin's buffer to ``path``.

    Call it between ``train()`` calls on every rank. ``extra`` (JSON-able, e.g. the index
    of the next experience) is stored in the manifest and returned by the loader.
    """
    core = plugin._ensure_pipeline(strategy).buffer
    plugin_state = plugin.state_dict(include_buffer=False)  # shards go to their own files
    training = {"model": _unwrap(strategy.model).state_dict(),
                "optimizer": strategy.optimizer.state_dict(),
                "clock": _clock_state(strategy), "plugin": plugin_state,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "numpy": np.random.get_state()}}
    save_buffer_checkpoint(core, path, step=plugin_state["pipeline"]["step"], extra=extra,
                           rank0_files={TRAINING_FILE: training})


def load_training_checkpoint(path: str, strategy, plugin: DistributedReplayPlugin) -> dict:
    """Collective. Restore what :func:`save_training_checkpoint` saved; return its ``extra``.

    The number of ranks may differ from the saving run: the buffer is rebalanced (see
    :func:`~avalanche_distributed_rehearsal.core.checkpoint.load_buffer_checkpoint`).
    """
    pipeline = plugin._ensure_pipeline(strategy)
    pipeline.invalidate()
    manifest = load_buffer_checkpoint(pipeline.buffer, path)
    directory = path if os.path.exists(os.path.join(path, "manifest.json")) else path + ".old"
    file = os.path.join(directory, TRAINING_FILE)
    if not os.path.exists(file):
        raise CheckpointError(f"{file}: missing (not a training checkpoint?)")
    training = torch.load(file, map_location="cpu", weights_only=False)
    _unwrap(strategy.model).load_state_dict(training["model"])
    if getattr(strategy, "optimized_param_id", False) is None:
        # Avalanche resets the optimizer the first time it sees it; do that now, so the
        # restored optimizer state (momentum...) survives the next train() call.
        strategy.make_optimizer(reset_optimizer_state=True)
    strategy.optimizer.load_state_dict(training["optimizer"])
    for key, value in training["clock"].items():
        setattr(strategy.clock, key, value)
    plugin.load_state_dict(training["plugin"], strategy)
    torch.set_rng_state(training["rng"]["torch"])
    random.setstate(training["rng"]["python"])
    np.random.set_state(training["rng"]["numpy"])
    return manifest.get("extra", {})
