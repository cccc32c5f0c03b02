"""Save and resume a whole Avalanche training run without dill.

``save_training_checkpoint`` writes, into one atomically replaced directory, the buffer
checkpoint of :mod:`avalanche_distributed_rehearsal.core.checkpoint` (one shard per rank
and a manifest) plus ``training.pt``: the model's and optimizer's ``state_dict``, the
strategy clock's counters and the plugin's state (step counter, classes seen); and
``rng-<rank>.pt``: every rank's random number generator states (torch, CUDA, Python,
NumPy: data-loader shuffling, dropout and augmentations draw from them). All plain
tensors and Python data, except NumPy's state, which holds a NumPy array.

Loading runs no code from the files: each is read with ``torch.load(...,
weights_only=True)`` (:func:`~avalanche_distributed_rehearsal.core.checkpoint.safe_load`);
``training.pt`` may hold tensors and plain data only, ``rng-<rank>.pt`` also the four
NumPy names NumPy's uint32 state array needs (:data:`NUMPY_ARRAY_GLOBALS`); a file holding anything else is
refused with ``CheckpointError`` before anything in it is called.

Resuming on more ranks than saved: a rank with no saved generator state of its own seeds
every generator from :func:`~avalanche_distributed_rehearsal.core.seeding.derive_seed` of
a digest of rank 0's saved torch state and its own rank, so new ranks draw different
streams from each other and from the saved ranks, and the same checkpoint always resumes
to the same streams.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Optional

import numpy as np
import torch

from ..core.checkpoint import (CheckpointError, load_buffer_checkpoint, rank_file_name,
                               read_manifest, safe_load, save_buffer_checkpoint)
from ..core.seeding import derive_seed
from .plugin import DistributedReplayPlugin

TRAINING_FILE = "training.pt"
RNG = "rng"
READY = "ready"  # each rank's representatives prepared for the next step


def _numpy_array_globals() -> tuple:
    """What unpickling NumPy's generator state (a uint32 array) names: ``ndarray``,
    ``dtype``, the array rebuilder (``numpy._core`` in NumPy 2, ``numpy.core`` before)
    and the uint32 dtype class."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import _reconstruct
    # ndarray, dtype, the array rebuilder, and the class of the MT19937 key's dtype
    return (np.ndarray, np.dtype, _reconstruct, type(np.dtype(np.uint32)))


#: The only non-plain names a generator-state file may hold (NumPy's MT19937 key array).
NUMPY_ARRAY_GLOBALS = _numpy_array_globals()


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
    if "cuda_seed" in state and torch.cuda.is_available():
        torch.cuda.manual_seed_all(state["cuda_seed"])


_NEW_RANK_STREAMS = 0x4E455752  # derive_seed's domain for ranks with no saved state
_TORCH, _PYTHON, _NUMPY, _CUDA = range(4)  # one stream per generator


def _fresh_rng_state(rank0_state: dict, rank: int) -> dict:
    """Generator states for a rank that did not exist when the checkpoint was saved.

    ``rank0_state``: rank 0's saved states (its ``"torch"`` entry, a uint8 CPU tensor, is
    hashed; nothing is modified). Returns states in :func:`_rng_state`'s form, except for
    CUDA: ``"cuda_seed"``, an int that :func:`_set_rng_state` hands to
    ``torch.cuda.manual_seed_all`` (lazily: it creates no CUDA context). Each generator is
    seeded with ``derive_seed(digest, rank, generator)``: a function of the checkpoint and
    ``rank`` alone, different for every rank and generator. The caller's generators are
    left as they were.
    """
    torch_state = rank0_state.get("torch") if isinstance(rank0_state, dict) else None
    if not isinstance(torch_state, torch.Tensor) or torch_state.dtype != torch.uint8:
        raise CheckpointError("rank 0's generator state holds no torch state to derive "
                              f"rank {rank}'s from")
    data = torch_state.detach().to("cpu").contiguous().numpy().tobytes()
    digest = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1

    def seed(generator: int) -> int:
        return derive_seed(digest, rank, _NEW_RANK_STREAMS, generator)

    return {"torch": torch.Generator().manual_seed(seed(_TORCH)).get_state(),
            "python": random.Random(seed(_PYTHON)).getstate(),
            "numpy": np.random.RandomState(seed(_NUMPY) % 2 ** 32).get_state(),
            "cuda_seed": seed(_CUDA)}


def _load(file: str, allowed=()):
    if not os.path.exists(file):
        raise CheckpointError(f"{file}: missing (not a training checkpoint?)")
    return safe_load(file, "training checkpoint file", allowed)


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
    # this rank's own pipeline state: the prepared draw and the candidate picker's generator
    own = {k: plugin_state["pipeline"].pop(k, None) for k in ("ready", "candidates_rng")}
    training = {"model": _unwrap(strategy.model).state_dict(),
                "optimizer": strategy.optimizer.state_dict(),
                "clock": _clock_state(strategy), "plugin": plugin_state}
    save_buffer_checkpoint(core, path, step=plugin_state["pipeline"]["step"], extra=extra,
                           rank0_files={TRAINING_FILE: training},
                           rank_files={RNG: _rng_state(), READY: own})


def load_training_checkpoint(path: str, strategy, plugin: DistributedReplayPlugin) -> dict:
    """Collective. Restore what :func:`save_training_checkpoint` saved; return its ``extra``.

    The number of ranks may differ from the saving run: the buffer is rebalanced (see
    :func:`~avalanche_distributed_rehearsal.core.checkpoint.load_buffer_checkpoint`). A
    rank that saved gets its own generator states (torch, CUDA, Python, NumPy) back; a
    rank that did not exist then gets fresh states seeded from ``derive_seed`` of a digest
    of rank 0's saved torch state and its own rank: different on every rank (no two ranks
    share dropout, augmentation or shuffling streams), the same every time this checkpoint
    is loaded. Raises :class:`CheckpointError` before changing anything when a file is
    missing or unreadable.
    """
    directory, manifest = read_manifest(path)
    training = _load(os.path.join(directory, TRAINING_FILE))
    rank = plugin._ensure_pipeline(strategy).buffer.rank
    if rank < manifest["world_size"]:
        rng = _load(os.path.join(directory, rank_file_name(RNG, rank)), NUMPY_ARRAY_GLOBALS)
    else:
        rng = _fresh_rng_state(_load(os.path.join(directory, rank_file_name(RNG, 0)),
                                     NUMPY_ARRAY_GLOBALS), rank)
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
    plugin_state = dict(training["plugin"], pipeline=dict(training["plugin"]["pipeline"]))
    if manifest["world_size"] == pipeline.buffer.world_size and READY in manifest.get("rank_files", ()):
        # the same ranks: the representatives prepared before the save and the candidate
        # picker's state, so that the next step is the one the interrupted run would have
        # made (otherwise the representatives are drawn anew)
        plugin_state["pipeline"].update(_load(os.path.join(directory, rank_file_name(READY, rank))))
    plugin.load_state_dict(plugin_state, strategy)
    _set_rng_state(rng)
    return manifest.get("extra", {})
