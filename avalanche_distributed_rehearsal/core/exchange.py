"""Every collective the buffer makes, for a single process or over process groups of its own.

Device rules (NCCL serves CUDA tensors only, gloo serves CPU and CUDA tensors):

* **Metadata** (per-step headers and counts, checkpoint agreement, global metrics) are
  small CPU tensors or objects. They travel on a gloo group of the buffer's own, created
  with ``new_group(backend="gloo")`` whatever the default group's backend is (NCCL under
  torchrun on GPUs), so a CPU tensor never meets a group that cannot serve it.
* **Payload** (the representatives' records) lives where the shard lives. CPU shards
  use a second gloo group, which also carries the step's metadata in the same message
  (one collective per step); CUDA shards use a group of ``payload_backend``
  (default ``"nccl"``). Such device collectives must be launched from one thread at one
  fixed point of every step, in the same order on every rank, or two NCCL communicators
  (ours and DDP's) can deadlock: :attr:`ProcessGroupExchange.device_payload` tells the
  pipeline to launch them from the training thread (see
  :class:`~avalanche_distributed_rehearsal.core.pipeline.RehearsalPipeline`).

Groups are created with the default group's timeout unless one is given, so a rank
that evaluates or checkpoints for long is not cut short by the buffer.
"""

from __future__ import annotations

import datetime
from typing import Any, List, Optional

import torch
import torch.distributed as dist


#: ``all_gather_single`` where this torch has it (``all_gather_into_tensor`` is deprecated).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def process_group_timeout(group=None) -> float:
    """Seconds after which collectives on ``group`` (default: the default group) fail.

    Read from the group's backends; torch's default (30 minutes) without a process group.
    """
    fallback = dist.default_pg_timeout.total_seconds()
    if not (dist.is_available() and dist.is_initialized()):
        return fallback
    from torch.distributed import distributed_c10d as c10d

    pg = group if group is not None else c10d._get_default_group()
    seconds = []
    for device_type in getattr(pg, "_device_types", ()):
        try:
            timeout = pg._get_backend(torch.device(device_type)).options._timeout
        except (AttributeError, RuntimeError):
            continue
        seconds.append(timeout.total_seconds())
    return max(seconds) if seconds else fallback


def serves(group, device_type: str) -> bool:
    """Whether ``group`` (a process group, or None for the default one) has a backend
    for tensors of ``device_type`` (``"cpu"`` or ``"cuda"``)."""
    config = dist.get_backend_config(group)
    served = set()
    for part in config.split(","):
        if ":" in part:
            served.add(part.split(":", 1)[0].strip())
        else:  # a plain backend name serves the device types it supports
            name = part.strip().lower()
            served |= {"cuda"} if name == "nccl" else {"cpu", "cuda"}
    return device_type in served


def backend_for(device_type: str, group=None) -> str:
    """The backend ``group`` (default: the default group) uses for ``device_type``
    tensors, e.g. ``"nccl"`` for ``"cuda"`` under ``"cpu:gloo,cuda:nccl"``."""
    for part in dist.get_backend_config(group).split(","):
        if ":" in part:
            device, backend = (p.strip() for p in part.split(":", 1))
            if device == device_type:
                return backend
        else:
            return part.strip()
    return "gloo"


class LocalExchange:
    """World size 1: no process group, every collective is the identity."""

    rank = 0
    world_size = 1
    backend = "none"
    device_payload = False

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(1, *tensor.shape)``: this rank's tensor (shares memory)."""
        return tensor.unsqueeze(0)

    def all_gather_object(self, obj: Any) -> List[Any]:
        return [obj]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def all_to_all(self, send: torch.Tensor, send_splits: List[int],
                   recv_splits: List[int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``send`` itself (or a copy in ``out`` when given)."""
        return send if out is None else out.copy_(send)

    def close(self) -> None:
        pass


class ProcessGroupExchange:
    """Collectives on process groups of the buffer's own, so buffer traffic never
    interleaves with the model's gradient all-reduce on the default group.

    Args:
        device: where the payload lives (the shard's device).
        timeout: seconds after which any collective fails instead of hanging; default
            the default group's timeout (:func:`process_group_timeout`).
        payload_backend: backend of the payload group. Default: the metadata group for
            a CPU shard; for a CUDA shard, the backend the default group uses for CUDA
            tensors (NCCL under ``"nccl"`` or ``"cpu:gloo,cuda:nccl"``, gloo under
            ``"gloo"`` or ``"cuda:gloo"``, e.g. several ranks sharing one GPU). Given, the
            payload gets a group of its own. Payload collectives on a group of their own
            are launched from the training thread (:attr:`device_payload`).

    Creating the groups is itself collective: every rank of the default group must
    construct a ``ProcessGroupExchange`` at the same point of its program.
    """

    def __init__(self, device: torch.device | str = "cpu", timeout: Optional[float] = None,
                 payload_backend: Optional[str] = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ProcessGroupExchange needs an initialised default process group "
                               "(torch.distributed.init_process_group)")
        device = torch.device(device)
        seconds = process_group_timeout() if timeout is None else float(timeout)
        delta = datetime.timedelta(seconds=seconds)
        self.timeout = seconds
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.meta_group: Optional[dist.ProcessGroup] = dist.new_group(backend="gloo", timeout=delta)
        if device.type == "cpu" and payload_backend is None:
            # A group of its own for the per-step exchange: a rank that synchronises (on the
            # metadata group) while another exchanges can never pair the two calls.
            self.backend = "gloo"
            self.payload_group = dist.new_group(backend="gloo", timeout=delta)
            #: True: payload collectives are launched by the training thread (see module doc)
            self.device_payload = False
        else:
            self.backend = payload_backend or backend_for(device.type)
            self.payload_group = dist.new_group(backend=self.backend, timeout=delta)
            self.device_payload = True

    # ------------------------------------------------------------------ metadata (CPU, gloo)
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(world, *tensor.shape)``: every rank's CPU ``tensor``, stacked in rank order."""
        tensor = tensor.contiguous()
        out = tensor.new_empty((self.world_size * tensor.numel(),))
        _all_gather_single(out, tensor.view(-1), group=self.meta_group)
        return out.view((self.world_size,) + tuple(tensor.shape))

    def all_gather_object(self, obj: Any) -> List[Any]:
        """Every rank's picklable ``obj``, in rank order."""
        everyone: List[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, obj, group=self.meta_group)
        return everyone

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a CPU tensor over ranks, in place; return it."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.meta_group)
        return tensor

    def barrier(self) -> None:
        dist.barrier(group=self.meta_group)

    # ------------------------------------------------------------------ payload (shard device)
    def all_to_all(self, send: torch.Tensor, send_splits: List[int],
                   recv_splits: List[int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Send ``send[rows of split q]`` to rank ``q``; return the rows received, by source rank.

        ``send`` is ``(sum(send_splits), *row)`` on the shard's device (uint8 records
        ``(n, row_bytes)``, or a flat uint8 message of metadata and records, split in
        bytes); the result is ``(sum(recv_splits), *row)``: ``out`` when given
        (contiguous, that shape), else newly allocated. Payload group.
        """
        shape = (sum(recv_splits),) + tuple(send.shape[1:])
        if out is not None and (tuple(out.shape) != shape or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous tensor of shape {shape}, got "
                             f"{tuple(out.shape)}")
        recv = send.new_empty(shape) if out is None else out
        dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=recv_splits,
                               input_split_sizes=send_splits, group=self.payload_group)
        return recv

    def close(self) -> None:
        if dist.is_initialized():
            groups = {id(g): g for g in (self.payload_group, self.meta_group) if g is not None}
            for group in groups.values():
                try:
                    dist.destroy_process_group(group)
                except (RuntimeError, ValueError):
                    pass
        self.meta_group = self.payload_group = None


def default_exchange(storage_device: torch.device, timeout: Optional[float] = None,
                     payload_backend: Optional[str] = None):
    """The exchange that fits the current process: local without a process group (or
    with one rank), else :class:`ProcessGroupExchange` for ``storage_device``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return LocalExchange()
    return ProcessGroupExchange(storage_device, timeout=timeout, payload_backend=payload_backend)
