"""Save and resume a whole Avalanche training run without dill.

``save_training_checkpoint`` writes, into one atomically replaced directory, the buffer
checkpoint of :mod:`avalanche_distributed_rehearsal.core.checkpoint` (one shard per rank
and a manifest) plus ``training.pt``: the model's and optimizer's ``state_dict``, the
strategy clock's counters and the plugin's state (step counter, classes seen); and
``rng-<rank>.pt``: every rank's random number generator states (torch, CUDA, Python,
NumPy: data-loader shuffling, dropout and augmentations draw from them). All plain
tensors and ints.
"""

from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch

from ..core.checkpoint import (CheckpointError, load_buffer_checkpoint, rank_file_name,
                               read_manifest, save_buffer_checkpoint)
from .plugin import DistributedReplayPlugin

TRAINING_FILE = "training.pt"
RNG = "rng"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def _load(file: str):
    if not os.path.exists(file):
        raise CheckpointError(f"{file}: missing (not a training checkpoint?)")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{file}: unreadable ({exc})") from exc


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
                "clock": _clock_state(strategy), "plugin": plugin_state}
    save_buffer_checkpoint(core, path, step=plugin_state["pipeline"]["step"], extra=extra,
                           rank0_files={TRAINING_FILE: training}, rank_files={RNG: _rng_state()})


def load_training_checkpoint(path: str, strategy, plugin: DistributedReplayPlugin) -> dict:
    """Collective. Restore what :func:`save_training_checkpoint` saved; return its ``extra``.

    The number of ranks may differ from the saving run: the buffer is rebalanced (see
    :func:`~avalanche_distributed_rehearsal.core.checkpoint.load_buffer_checkpoint`), and
    a rank with no saved generator state of its own takes rank 0's. Raises
    :class:`CheckpointError` before changing anything when a file is missing or unreadable.
    """
    directory, manifest = read_manifest(path)
    training = _load(os.path.join(directory, TRAINING_FILE))
    rank = plugin._ensure_pipeline(strategy).buffer.rank
    rng_rank = rank if rank < manifest["world_size"] else 0
    rng = _load(os.path.join(directory, rank_file_name(RNG, rng_rank)))
    pipeline = plugin.pipeline
    pipeline.invalidate()
    load_buffer_checkpoint(pipeline.buffer, directory)
    _unwrap(strategy.model).load_state_dict(training["model"])
    if getattr(strategy, "optimized_param_id", False) is None:
        # Avalanche resets the optimizer the first time it sees it; do that now, so the
        # restored optimizer state (momentum...) survives the next train() call.
        strategy.make_optimizer(reset_optimizer_state=True)
    strategy.optimizer.load_state_dict(training["optimizer"])
    for key, value in training["clock"].items():
        setattr(strategy.clock, key, value)
    plugin.load_state_dict(training["plugin"], strategy)
    _set_rng_state(rng)
    return manifest.get("extra", {})
