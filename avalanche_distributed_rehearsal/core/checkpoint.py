"""Checkpoints of a sharded buffer: one file per rank plus a manifest, saved atomically,
loadable on a different number of ranks.

Directory format (``FORMAT_VERSION`` 2)::

    <path>/manifest.json     {"format": "avalanche_distributed_rehearsal.buffer", "version": 2,
                              "world_size": N, "config": {...}, "layout": [...] | null,
                              "step": S, "shards": [{"file": "shard-00000.pt", "rank": 0,
                              "size": n0, "bytes": b0}, ...]}
    <path>/shard-<rank>.pt   torch.save of ShardedRehearsalBuffer.state_dict() on that rank
    <path>/<name>            rank 0's extra files (``rank0_files``), e.g. training.pt
    <path>/<name>-<rank>.pt  every rank's extra files (``rank_files``), e.g. rng-00001.pt

A save writes everything into ``<path>.tmp``, then swaps it in with renames; a crash at any
point leaves the previous checkpoint whole, at ``<path>`` or (between the two renames)
at ``<path>.old``, where :func:`load_buffer_checkpoint` also looks.

Loading never runs code from a file: every ``.pt`` file is read with
``torch.load(..., weights_only=True)`` (:func:`safe_load`), which rebuilds tensors and
plain data (dicts, lists, tuples, strings, numbers, None) and refuses any other object
with :class:`CheckpointError`, before calling anything the file names.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from typing import Iterable, Optional

import torch

from .buffer import ShardedRehearsalBuffer

FORMAT = "avalanche_distributed_rehearsal.buffer"
FORMAT_VERSION = 2


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, of another version or of another configuration."""


def _barrier(buffer: ShardedRehearsalBuffer) -> None:
    buffer.exchange.barrier()  # the buffer's gloo group: serves CPU whatever the default is


def _shard_name(rank: int) -> str:
    return f"shard-{rank:05d}.pt"


def rank_file_name(name: str, rank: int) -> str:
    """The file that holds rank ``rank``'s object ``name`` of ``rank_files``."""
    return f"{name}-{rank:05d}.pt"


def _save(obj, file: str) -> None:
    with open(file, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_buffer_checkpoint(buffer: ShardedRehearsalBuffer, path: str, step: int = 0,
                           extra: Optional[dict] = None,
                           rank0_files: Optional[dict] = None,
                           rank_files: Optional[dict] = None) -> None:
    """Collective. Write every rank's shard and a manifest to directory ``path``.

    ``path`` must be on a file system every rank sees. ``step`` and ``extra`` (JSON-able)
    are stored in the manifest; ``rank0_files`` maps file names to objects that rank 0
    writes with ``torch.save`` inside the same atomic directory (model, optimizer...);
    ``rank_files`` maps names to objects every rank writes, to
    :func:`rank_file_name` ``(name, rank)`` (random number generator states...). Every
    rank must pass the same names.
    """
    path = os.path.abspath(path)
    tmp, old = path + ".tmp", path + ".old"
    if buffer.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(buffer)
    state = buffer.state_dict()
    _save(state, os.path.join(tmp, _shard_name(buffer.rank)))
    for name, obj in (rank_files or {}).items():
        _save(obj, os.path.join(tmp, rank_file_name(name, buffer.rank)))
    if buffer.rank == 0:
        for name, obj in (rank0_files or {}).items():
            _save(obj, os.path.join(tmp, name))
    _barrier(buffer)
    if buffer.rank == 0:
        shards = []
        for r in range(buffer.world_size):
            name = _shard_name(r)
            shards.append({"file": name, "rank": r,
                           "bytes": os.path.getsize(os.path.join(tmp, name))})
        manifest = {"format": FORMAT, "version": FORMAT_VERSION,
                    "world_size": buffer.world_size, "config": buffer.public_config(),
                    "layout": state["layout"], "step": int(step), "extra": extra or {},
                    "shards": shards, "files": sorted(rank0_files or {}),
                    "rank_files": sorted(rank_files or {})}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))
        shutil.rmtree(old, ignore_errors=True)
    _barrier(buffer)


def read_manifest(path: str) -> tuple[str, dict]:
    """Return ``(directory, manifest)`` of the checkpoint at ``path`` (or its ``.old`` twin)."""
    path = os.path.abspath(path)
    for candidate in (path, path + ".old"):
        manifest_file = os.path.join(candidate, "manifest.json")
        if os.path.exists(manifest_file):
            try:
                with open(manifest_file) as f:
                    manifest = json.load(f)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{manifest_file}: unreadable manifest ({exc})") from exc
            if manifest.get("format") != FORMAT:
                raise CheckpointError(f"{manifest_file}: not a rehearsal buffer checkpoint")
            if manifest.get("version") != FORMAT_VERSION:
                raise CheckpointError(f"{manifest_file}: format version {manifest.get('version')}, "
                                      f"this release reads version {FORMAT_VERSION}")
            return candidate, manifest
    raise CheckpointError(f"no checkpoint at {path} (no manifest.json)")


def safe_load(file: str, what: str = "file", allowed: Iterable = ()):
    """``torch.load(file, map_location="cpu", weights_only=True)``: tensors (on the CPU)
    and plain data only, plus the classes and functions in ``allowed`` (e.g. what NumPy
    needs to rebuild an array). A file that names anything else is refused with
    :class:`CheckpointError` before anything it names is called: loading a crafted
    file runs no code. Any other unreadable file is a :class:`CheckpointError` too.
    """
    try:
        with open(file, "rb") as f, torch.serialization.safe_globals(list(allowed)):
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+) was not", str(exc)) or re.search(r"but got (<[^>]*>)", str(exc))
        named = f" (it names {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{file}: refused: this {what} holds objects other than tensors and plain data"
            f"{named}, and loading it could run code") from exc
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{file}: unreadable {what} ({exc})") from exc


def _load_shard(directory: str, entry: dict) -> dict:
    file = os.path.join(directory, entry["file"])
    if not os.path.exists(file) or os.path.getsize(file) != entry["bytes"]:
        raise CheckpointError(f"{file}: missing or truncated (expected {entry['bytes']} bytes)")
    return safe_load(file, "shard")


def load_buffer_checkpoint(buffer: ShardedRehearsalBuffer, path: str) -> dict:
    """Restore ``buffer`` (on any number of ranks) from the checkpoint at ``path``.

    Same world size: every rank gets its own shard back exactly (bit-identical resume).
    Different world size: the union of all saved shards is dealt out class by class over
    the new ranks, so no sample is lost or duplicated while the union fits the budget
    (beyond it, each rank evicts class-balanced). Returns the manifest.

    Raises :class:`CheckpointError` before modifying ``buffer`` if the checkpoint is
    missing, truncated, of another version or of another configuration.
    """
    directory, manifest = read_manifest(path)
    mine = buffer.public_config()
    theirs = manifest["config"]
    differing = sorted(k for k in set(mine) | set(theirs)
                       if k != "mem_size" and mine.get(k) != theirs.get(k))
    if differing:
        raise CheckpointError(f"checkpoint configuration differs in {differing}: saved "
                              f"{ {k: theirs.get(k) for k in differing} }, "
                              f"running { {k: mine.get(k) for k in differing} }")
    if manifest["world_size"] == buffer.world_size and theirs.get("mem_size") == buffer.mem_size:
        state = _load_shard(directory, manifest["shards"][buffer.rank])
        buffer.load_state_dict(state)
    else:
        states = [_load_shard(directory, e) for e in manifest["shards"]]
        buffer.load_union(states)
    return manifest
