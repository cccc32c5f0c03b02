"""One collective draw, in two halves: prepare (plan, gather the records this rank
serves) and complete (move them, restore the draw order, hand them to the caller's
device). Between the halves nothing collective happens, so a CUDA shard's payload
collective can be launched from another thread than its metadata gather."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .metadata import ClassTable
from .reservoir import ClassBalancedReservoir
from .sampling import SamplingPlan
from .storage import ShardStorage


@dataclass
class ExchangeStats:
    """Traffic of the last draw, in bytes, for this rank."""

    payload_sent: int = 0
    payload_received: int = 0
    metadata_sent: int = 0
    metadata_received: int = 0
    representatives: int = 0


@dataclass(frozen=True)
class DrawRecord:
    """What one collective draw saw and moved, on this rank.

    Attributes:
        step: the step the draw was made for.
        table: the per-class counts of every rank at the time of the draw
            (:class:`~.metadata.ClassTable`; excluded classes included). Owned by the
            record: never modified afterwards.
        excluded: the class labels left out of the draw.
        stats: this rank's traffic for the draw.
        row_bytes: bytes of one stored record (0 before the first insert on any rank).
    """

    step: int
    table: ClassTable
    excluded: tuple
    stats: ExchangeStats
    row_bytes: int = 0

    @property
    def counts(self) -> torch.Tensor:
        """``(world, L)`` int64: stored samples of ``table.labels[j]`` on rank ``w``."""
        return self.table.stored

    @property
    def global_size(self) -> int:
        return int(self.table.stored.sum())

    def class_counts(self, rank: Optional[int] = None) -> Dict[int, int]:
        """``{label: stored}`` over all ranks, or on ``rank``."""
        return self.table.class_counts(rank)


@dataclass
class PreparedDraw:
    """A draw planned and gathered locally, its payload not yet exchanged.

    Tensors are on the storage device and owned by this object (``send`` may be a reused
    scratch buffer of the storage: complete the draw before the next one is prepared).

    Attributes:
        record: the draw's :class:`DrawRecord`.
        fields: the representatives in draw order when no transport is needed (one rank,
            local sampling, nothing to draw), else None.
        send: ``(n, row_bytes)`` uint8, the records this rank serves, grouped by requester.
        send_splits, recv_splits: rows sent to / received from each rank.
        where: ``(d,)`` int64, the received row of each draw, in draw order.
    """

    record: Optional[DrawRecord] = None
    fields: Optional[Dict[str, torch.Tensor]] = None
    send: Optional[torch.Tensor] = None
    send_splits: List[int] = field(default_factory=list)
    recv_splits: List[int] = field(default_factory=list)
    where: Optional[torch.Tensor] = None

    def tensors(self) -> List[torch.Tensor]:
        """Every tensor the object holds (for CUDA stream bookkeeping)."""
        out = [t for t in (self.send, self.where) if t is not None]
        return out + list((self.fields or {}).values())


def served_slots(reservoir: ClassBalancedReservoir, storage: ShardStorage, local: torch.Tensor,
                 label_columns: Optional[torch.Tensor], excluded: tuple, table: ClassTable,
                 key_field: Optional[str]) -> torch.Tensor:
    """Storage slots of the draws this rank serves, as ``(n,)`` int64 CPU.

    ``local`` indexes as the plan says: within the class ``table.labels[label_columns]``
    (class-balanced plans), or among this rank's eligible samples in slot order
    (uniform and local plans; with ``excluded`` keys, the j-th slot whose key is not
    excluded). ``key_field``: the storage field that holds the keys (class labels), if any.
    """
    if label_columns is not None:
        by_class = reservoir.slots_by_class
        keys = table.labels[label_columns].tolist()
        return torch.tensor([by_class[c][j] for c, j in zip(keys, local.tolist())],
                            dtype=torch.int64)
    if not excluded:
        return local
    if key_field is not None and storage.device.type == "cpu" and storage.allocated:
        slot_keys = storage.columns()[key_field][: storage.size]  # no Python list on CPU
    else:
        slot_keys = torch.tensor(reservoir.label_of_slot, dtype=torch.int64)
    eligible = ~torch.isin(slot_keys, torch.tensor(excluded, dtype=torch.int64))
    return torch.nonzero(eligible).flatten()[local]


def prepare(plan: SamplingPlan, rank: int, world_size: int, exchanges: bool,
            storage: ShardStorage, slots_of, stats: ExchangeStats) -> PreparedDraw:
    """Gather the records this rank serves for ``plan``; fill ``stats``' payload bytes.

    ``slots_of(local, label_columns)`` maps the plan's indexes to storage slots
    (:func:`served_slots` bound to the buffer). ``exchanges``: False when every rank
    serves its own draws (one rank, or a local sampler).
    """
    mine = plan.num_draws(rank)
    stats.representatives = mine
    layout = storage.layout
    if plan.d == 0 or layout is None:
        stats.payload_sent = stats.payload_received = 0
        return PreparedDraw(fields={})
    if world_size == 1 or not exchanges:
        # Every draw of this rank is served here, in draw order: the rank "sends" its
        # records to itself, no other rank is involved.
        label = None if plan.label is None else plan.label[rank, :mine]
        slots = slots_of(plan.local[rank, :mine], label)
        stats.payload_sent = stats.payload_received = slots.numel() * layout.row_bytes
        return PreparedDraw(fields=storage.gather_fields(slots) if mine else {})
    splits, local, label = plan.sends(rank)
    slots = slots_of(local, label)
    send = storage.gather(slots, out=storage.scratch("send", slots.numel()))
    recv_splits = plan.receive_splits(rank, world_size).tolist()
    # Received row k is draw receive_order[k], so draw j is received row where[j].
    where = torch.argsort(plan.receive_order(rank)).to(storage.device)
    stats.payload_sent = send.numel()
    stats.payload_received = sum(recv_splits) * layout.row_bytes
    return PreparedDraw(send=send, send_splits=splits.tolist(), recv_splits=recv_splits,
                        where=where)


def complete(prepared: PreparedDraw, storage: ShardStorage, exchange,
             out_device: Optional[torch.device]) -> Dict[str, torch.Tensor]:
    """Exchange ``prepared``'s records (a payload collective, unless nothing moves) and
    return every stored field of the representatives, in draw order, on ``out_device``
    (default: the storage device), in the storage dtypes. The tensors are new: the caller
    owns them.

    Copies of the payload: one gather into the send buffer (in :func:`prepare`), the
    transport, one ``index_select`` per field that restores the draw order and compacts
    the field, and, from a CPU shard to a GPU, one staged asynchronous copy.
    """
    fields = prepared.fields
    if fields is None:
        recv = exchange.all_to_all(prepared.send, prepared.send_splits, prepared.recv_splits,
                                   out=storage.scratch("recv", sum(prepared.recv_splits)))
        fields = {name: view.index_select(0, prepared.where)
                  for name, view in storage.layout.unpack(recv).items()}
    if out_device is None or torch.device(out_device) == storage.device or not fields:
        return fields
    out_device = torch.device(out_device)
    if out_device.type == "cuda" and storage.device.type == "cpu":
        return {name: storage.staging.to_device(f"draw-{name}", t, out_device)
                for name, t in fields.items()}
    return {name: t.to(out_device, non_blocking=out_device.type == "cuda")
            for name, t in fields.items()}
