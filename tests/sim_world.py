"""Simulated shards: N ranks as N threads of one process, with an in-memory exchange.

Large world sizes and long statistical runs are cheap this way (no process start, no
sockets), and the buffer under test is the real ``ShardedRehearsalBuffer``: only the
transport is replaced. Every collective is a rendezvous of all rank threads on a barrier
with a timeout, so a rank that skips a collective fails the run instead of hanging it.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, List, Optional

import torch


class SimulatedWorld:
    """The shared state of ``world`` rank threads."""

    def __init__(self, world: int, timeout: float = 60.0):
        self.world = world
        self.timeout = timeout
        self.barrier = threading.Barrier(world)
        self.slots: List[Any] = [None] * world

    def exchange(self, rank: int) -> "SimulatedExchange":
        return SimulatedExchange(self, rank)

    def rendezvous(self, rank: int, value: Any) -> List[Any]:
        """Every rank's ``value``, in rank order (a collective)."""
        self.slots[rank] = value
        self.barrier.wait(self.timeout)
        out = list(self.slots)
        self.barrier.wait(self.timeout)
        return out


class SimulatedExchange:
    """The exchange protocol of ``core.exchange`` over a :class:`SimulatedWorld`.

    ``device_payload`` may be set to True to make the pipeline launch payload
    collectives from the training thread, as for a CUDA shard.
    """

    backend = "simulated"

    def __init__(self, world: SimulatedWorld, rank: int, device_payload: bool = False):
        self.world = world
        self.rank = rank
        self.world_size = world.world
        self.device_payload = device_payload
        self.timeout = world.timeout
        self.calls: List[tuple] = []  # (collective, thread name)

    def _log(self, name: str) -> None:
        self.calls.append((name, threading.current_thread().name))

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self._log("all_gather")
        return torch.stack(self.world.rendezvous(self.rank, tensor.clone()))

    def all_gather_object(self, obj: Any) -> List[Any]:
        self._log("all_gather_object")
        return self.world.rendezvous(self.rank, obj)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self._log("all_reduce_sum")
        total = torch.stack(self.world.rendezvous(self.rank, tensor.clone())).sum(0)
        return tensor.copy_(total)

    def barrier(self) -> None:
        self._log("barrier")
        self.world.rendezvous(self.rank, None)

    def all_to_all(self, send: torch.Tensor, send_splits: List[int], recv_splits: List[int],
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._log("all_to_all")
        everyone = self.world.rendezvous(self.rank, (send.clone(), list(send_splits)))
        parts = []
        for sent, splits in everyone:
            start = sum(splits[: self.rank])
            parts.append(sent[start: start + splits[self.rank]])
        recv = torch.cat(parts) if parts else send.new_empty((0,) + tuple(send.shape[1:]))
        if recv.shape[0] != sum(recv_splits):
            raise RuntimeError(f"rank {self.rank} expected {sum(recv_splits)} rows, got {recv.shape[0]}")
        return recv if out is None else out.copy_(recv)

    def close(self) -> None:
        pass


def run_threads(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 60.0) -> List[Any]:
    """Run ``fn(rank, world, sim, *args)`` on ``world`` threads sharing one
    :class:`SimulatedWorld` ``sim``; return the results by rank, or raise the first
    rank's exception (with the others' rank numbers in the message)."""
    sim = SimulatedWorld(world, timeout)
    results: List[Any] = [None] * world
    errors: List[Optional[BaseException]] = [None] * world

    def body(rank: int) -> None:
        try:
            results[rank] = fn(rank, world, sim, *args)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[rank] = exc
            sim.barrier.abort()  # wake the others instead of letting them wait

    threads = [threading.Thread(target=body, args=(r,), name=f"sim-rank-{r}", daemon=True)
               for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    failed = [r for r, e in enumerate(errors) if e is not None
              and not isinstance(e, threading.BrokenBarrierError)]
    if failed:
        raise errors[failed[0]]
    if any(t.is_alive() for t in threads) or any(e is not None for e in errors):
        raise TimeoutError(f"{fn.__name__} on {world} simulated ranks did not finish")
    return results
