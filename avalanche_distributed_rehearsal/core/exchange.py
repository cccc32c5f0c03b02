"""Collectives the buffer needs, for a single process or over a dedicated process group."""

from __future__ import annotations

import datetime
from typing import List, Optional

import torch
import torch.distributed as dist


class LocalExchange:
    """World size 1: no process group, every collective is the identity."""

    rank = 0
    world_size = 1
    backend = "none"

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(1, *tensor.shape)``: this rank's tensor (shares memory)."""
        return tensor.unsqueeze(0)

    def all_to_all(self, send: torch.Tensor, send_splits: List[int],
                   recv_splits: List[int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``send`` itself (or a copy in ``out`` when given)."""
        return send if out is None else out.copy_(send)

    def close(self) -> None:
        pass


class ProcessGroupExchange:
    """Collectives on a process group of their own, so buffer traffic from the background
    thread never interleaves with the model's gradient all-reduce on the default group.

    Args:
        backend: ``"gloo"`` for CPU storage, ``"nccl"`` for CUDA storage.
        timeout: every collective on the group fails after this long instead of hanging.

    Creating the group is itself collective: every rank of the default group must
    construct a ``ProcessGroupExchange`` at the same point of its program.
    """

    def __init__(self, backend: str = "gloo", timeout: float = 300.0):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ProcessGroupExchange needs an initialised default process group "
                               "(torch.distributed.init_process_group)")
        self.backend = backend
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.group: Optional[dist.ProcessGroup] = dist.new_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout))

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(world, *tensor.shape)``: every rank's ``tensor``, stacked in rank order."""
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.stack(parts)

    def all_to_all(self, send: torch.Tensor, send_splits: List[int],
                   recv_splits: List[int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Send ``send[rows of split q]`` to rank ``q``; return the rows received, by source rank.

        ``send`` is ``(sum(send_splits), row_bytes)`` uint8; the result is
        ``(sum(recv_splits), row_bytes)`` uint8: ``out`` when given (contiguous, that
        shape), else newly allocated.
        """
        shape = (sum(recv_splits),) + tuple(send.shape[1:])
        if out is not None and (tuple(out.shape) != shape or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous tensor of shape {shape}, got "
                             f"{tuple(out.shape)}")
        recv = send.new_empty(shape) if out is None else out
        dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=recv_splits,
                               input_split_sizes=send_splits, group=self.group)
        return recv

    def close(self) -> None:
        if self.group is not None and dist.is_initialized():
            try:
                dist.destroy_process_group(self.group)
            except (RuntimeError, ValueError):
                pass
        self.group = None


def default_exchange(storage_device: torch.device, timeout: float = 300.0):
    """The exchange that fits the current process: local without a process group,
    gloo for CPU storage, NCCL for CUDA storage (gloo if NCCL is unavailable)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return LocalExchange()
    backend = "gloo"
    if storage_device.type == "cuda" and dist.is_nccl_available():
        backend = "nccl"
    return ProcessGroupExchange(backend=backend, timeout=timeout)
