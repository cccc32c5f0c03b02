"""Persistent page-locked (pinned) host buffers for copies between a CPU shard and a GPU.

A copy from pageable host memory to the GPU is synchronous and slow; from pinned memory it
is asynchronous on the current stream. The shard itself is not pinned: pinning a large
tensor through PyTorch's caching host allocator rounds it up to a power of two and keeps
the freed blocks (a 1.2 GB shard would pin 2 GB). Only the small per-step traffic goes
through these buffers: the representatives on their way to the GPU (``r`` rows) and the
candidates on their way from it (``c`` rows).

Each named buffer is reused from step to step and grows to the largest size asked for.
Before a buffer is handed out again, the host waits for the last asynchronous copy that
read or wrote it (a CUDA event), so reuse never races with a copy still in flight. The
waits happen in the calling thread (the background worker's), never on the training
thread's stream.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch


class PinnedStaging:
    """Named pinned uint8 buffers plus the event of their last asynchronous copy."""

    def __init__(self):
        self._buffers: Dict[str, torch.Tensor] = {}
        self._events: Dict[str, torch.cuda.Event] = {}

    def buffer(self, name: str, nbytes: int) -> torch.Tensor:
        """A pinned ``(nbytes,)`` uint8 tensor named ``name``, free to overwrite now.

        The memory stays the staging's; the contents are the caller's until the next call
        with the same name.
        """
        event = self._events.pop(name, None)
        if event is not None:
            event.synchronize()
        held = self._buffers.get(name)
        if held is None or held.numel() < nbytes:
            held = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
            self._buffers[name] = held
        return held[:nbytes]

    def record(self, name: str, stream: Optional[torch.cuda.Stream] = None) -> None:
        """Mark that an asynchronous copy involving buffer ``name`` was just enqueued on
        ``stream`` (default: the current stream)."""
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream())
        self._events[name] = event

    def view(self, name: str, like: torch.Tensor, rows: int) -> torch.Tensor:
        """A pinned tensor of ``like``'s per-row shape and dtype with ``rows`` rows."""
        per_row = math.prod(like.shape[1:]) * like.element_size()
        raw = self.buffer(name, rows * per_row)
        return raw.view(like.dtype).view((rows,) + tuple(like.shape[1:]))

    def to_device(self, name: str, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Copy CPU ``host`` to ``device`` through pinned buffer ``name``, asynchronously on
        the current stream; return the new device tensor (the caller's)."""
        staged = self.view(name, host, host.shape[0])
        staged.copy_(host)
        out = staged.to(device, non_blocking=True)
        self.record(name)
        return out

    def to_host(self, name: str, device_tensor: torch.Tensor) -> torch.Tensor:
        """Copy CUDA ``device_tensor`` into pinned buffer ``name`` and wait for it (on the
        current stream only); return the pinned view (valid until the next call with
        ``name``: copy it out before then)."""
        staged = self.view(name, device_tensor, device_tensor.shape[0])
        staged.copy_(device_tensor, non_blocking=True)
        torch.cuda.current_stream(device_tensor.device).synchronize()
        return staged
