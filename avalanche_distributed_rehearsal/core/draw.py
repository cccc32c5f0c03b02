"""The data side of a step: which stored records this rank serves (serve), the message
that carries them with the step's metadata (compose), and the representatives in draw
order once they arrived (assemble).

A step's one collective moves, from every rank ``w`` to every rank ``q``, the bytes::

    [ metadata of w (HEADER + width int64 words) | records w serves to q (rows of row_bytes) ]

so the receiver finds every rank's metadata at the start of its chunk and the records
after it. Nothing here is collective: :mod:`~.buffer` calls the exchange between
:func:`compose` and :func:`assemble`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch

from .layout import RecordLayout
from .ledger import CountsSnapshot
from .reservoir import LocalReservoir
from .sampling import SamplingPlan
from .storage import ShardStorage


@dataclass
class ExchangeStats:
    """Traffic of one step, in bytes, for this rank: the records of the representatives
    (``payload``) and the step's metadata (headers and candidate keys), this rank's own
    share included (``*_sent``, ``*_received``: what a rank "sends" itself with one rank or
    rank-local sampling) and to or from the other ranks only (``*_to_others``,
    ``*_from_others``)."""

    payload_sent: int = 0
    payload_received: int = 0
    metadata_sent: int = 0
    metadata_received: int = 0
    representatives: int = 0
    payload_to_others: int = 0
    payload_from_others: int = 0
    metadata_to_others: int = 0
    metadata_from_others: int = 0


@dataclass
class DrawRecord:
    """What one step's draw saw and moved, on this rank.

    Attributes:
        step: the step the draw was made for.
        table: every rank's stored samples per class when the draw was planned
            (:class:`~.ledger.CountsSnapshot`, excluded classes included).
    A record is never modified after the step that made it (a plain dataclass, not a
    frozen one, because one is made per step).
        excluded: the class labels left out of the draw.
        stats: this rank's traffic for the step.
        row_bytes: bytes of one stored record (0 before the first insert on any rank).
    """

    step: int
    table: CountsSnapshot
    excluded: tuple
    stats: ExchangeStats
    row_bytes: int = 0

    @property
    def counts(self) -> torch.Tensor:
        """``(world, L)`` int64: stored samples of ``table.labels[j]`` on rank ``w``."""
        return self.table.stored[:, : len(self.table.labels)]

    @property
    def global_size(self) -> int:
        return self.table.total

    def class_counts(self, rank: Optional[int] = None) -> Dict[int, int]:
        """``{label: stored}`` over all ranks, or on ``rank``."""
        return self.table.class_counts(rank)


@dataclass
class PreparedDraw:
    """A draw planned and served locally, its records not yet exchanged.

    Tensors are on the storage device and owned by this object (``send`` may be a reused
    scratch buffer of the storage: complete the draw before the next one is prepared).

    Attributes:
        record: the draw's :class:`DrawRecord`.
        fields: the representatives in draw order when no transport is needed (one rank,
            local sampling, nothing to draw), else None.
        send: ``(n, row_bytes)`` uint8, the records this rank serves, grouped by requester.
        send_splits, recv_splits: records sent to / received from each rank.
        where: ``(d,)`` int64, the received record of each draw, in draw order.
        step, excluded, table: the draw's step, excluded classes and the per-class counts
            its plan saw (the record is made from them once the step is agreed).
    """

    record: Optional[DrawRecord] = None
    fields: Optional[Dict[str, torch.Tensor]] = None
    send: Optional[torch.Tensor] = None
    send_splits: List[int] = field(default_factory=list)
    recv_splits: List[int] = field(default_factory=list)
    where: Optional[torch.Tensor] = None
    step: int = 0
    excluded: tuple = ()
    table: Optional[CountsSnapshot] = None

    @property
    def moves(self) -> bool:
        """Whether records must cross ranks (a payload collective)."""
        return self.fields is None

    def tensors(self) -> List[torch.Tensor]:
        """Every tensor the object holds (for CUDA stream bookkeeping)."""
        out = [t for t in (self.send, self.where) if t is not None]
        return out + list((self.fields or {}).values())


@dataclass
class Received:
    """Records that arrived inside a step's message, not copied out of it.

    Attributes:
        flat: ``(N,)`` uint8, the received message (metadata chunks and records).
        starts: ``(n,)`` int64 CPU, the byte offset in ``flat`` of received record ``k``
            (by source rank, as they arrived).
    ``flat`` is usually a scratch buffer of the storage: use the records before the next
    step's message arrives.
    """

    flat: torch.Tensor
    starts: torch.Tensor

    def __len__(self) -> int:
        return self.starts.numel()

    def fields(self, layout: RecordLayout, order: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Every field of the records ``order`` (``(d,)`` int64 indexes of received
        records), in that order: new contiguous tensors ``(d, *shape)``, one gather each."""
        base = self.starts.index_select(0, order.cpu()).to(self.flat.device)
        out = {}
        for name, spec in layout.fields.items():
            if spec.nbytes == 0:
                out[name] = torch.empty((order.numel(),) + spec.shape, dtype=spec.dtype,
                                        device=self.flat.device)
                continue
            at = base if spec.offset == 0 else base + spec.offset
            out[name] = spec.from_bytes(self.flat.unfold(0, spec.nbytes, 1).index_select(0, at))
        return out


def served_slots(reservoir: LocalReservoir, storage: ShardStorage, local: torch.Tensor,
                 labels: Optional[List[int]], excluded: tuple,
                 key_field: Optional[str]) -> torch.Tensor:
    """Storage slots of the draws this rank serves, as ``(n,)`` int64 CPU.

    ``local`` indexes as the plan says: within the class ``labels[i]`` (class-balanced
    plans), or among this rank's eligible samples in slot order (uniform and local plans;
    with ``excluded`` keys, the j-th slot whose key is not excluded). ``key_field``: the
    storage field that holds the keys (class labels), if any.
    """
    if labels is not None:
        by_class = reservoir.slots_by_class
        return torch.tensor([by_class[c][j] for c, j in zip(labels, local.tolist())],
                            dtype=torch.int64)
    if not excluded:
        return local
    if key_field is not None and storage.device.type == "cpu" and storage.allocated:
        slot_keys = storage.columns()[key_field][: storage.size]  # no Python list on CPU
    else:
        slot_keys = torch.tensor(reservoir.label_of_slot, dtype=torch.int64)
    eligible = ~torch.isin(slot_keys, torch.tensor(excluded, dtype=torch.int64))
    return torch.nonzero(eligible).flatten()[local]


def serve_own(slots: torch.Tensor, storage: ShardStorage, stats: ExchangeStats) -> PreparedDraw:
    """:func:`serve` when this rank serves all its own draws (one rank): the records at
    ``slots`` ``(d,)``, in draw order."""
    d = slots.numel()
    stats.representatives = d
    stats.payload_to_others = stats.payload_from_others = 0
    if d == 0 or storage.layout is None:
        stats.payload_sent = stats.payload_received = 0
        return PreparedDraw(fields={})
    stats.payload_sent = stats.payload_received = d * storage.layout.row_bytes
    return PreparedDraw(fields=storage.gather_fields(slots))


def serve(plan: SamplingPlan, rank: int, world_size: int, exchanges: bool,
          storage: ShardStorage, slots_of, stats: ExchangeStats) -> PreparedDraw:
    """Gather the records this rank serves for ``plan``; fill ``stats``' payload bytes.

    ``slots_of(local, label_columns)`` maps the plan's indexes to storage slots
    (:func:`served_slots` bound to the buffer). ``exchanges``: False when every rank
    serves its own draws (one rank, or a local sampler).
    """
    mine = plan.num_draws(rank)
    stats.representatives = mine
    stats.payload_to_others = stats.payload_from_others = 0
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
    routes = plan.routes(rank, world_size)
    slots = slots_of(routes.local, routes.label)
    send = storage.gather(slots, out=storage.scratch("send", slots.numel()))
    send_splits, recv_splits = routes.send_splits, routes.recv_splits
    where = routes.where.to(storage.device)
    stats.payload_sent = send.numel()
    stats.payload_received = sum(recv_splits) * layout.row_bytes
    stats.payload_to_others = (sum(send_splits) - send_splits[rank]) * layout.row_bytes
    stats.payload_from_others = (sum(recv_splits) - recv_splits[rank]) * layout.row_bytes
    return PreparedDraw(send=send, send_splits=send_splits, recv_splits=recv_splits,
                        where=where)


def compose(meta: torch.Tensor, prepared: PreparedDraw, world_size: int,
            row_bytes: int, storage: Optional[ShardStorage] = None
            ) -> Tuple[torch.Tensor, List[int], List[int]]:
    """The flat uint8 message of a step (see the module doc) and its byte splits.

    ``meta``: ``(m,)`` int64 CPU, this rank's metadata (the same for every destination).
    Returns ``(send, send_splits, recv_splits)``; ``send`` is the ``"message"`` scratch
    buffer of a CPU ``storage`` (valid until the next step's message; a fresh multi-megabyte
    tensor would be page-faulted in at every step), else new.
    """
    meta_bytes = meta.view(torch.uint8)
    m = meta_bytes.numel()
    if not prepared.moves:
        parts = [meta_bytes] * world_size
        send_splits = [m] * world_size
        recv_splits = list(send_splits)
    else:
        rows = prepared.send.reshape(-1)
        parts, start = [], 0
        for n in prepared.send_splits:
            parts.append(meta_bytes)
            parts.append(rows[start * row_bytes: (start + n) * row_bytes])
            start += n
        send_splits = [m + n * row_bytes for n in prepared.send_splits]
        recv_splits = [m + n * row_bytes for n in prepared.recv_splits]
    out = None if storage is None else storage.scratch_bytes("message", sum(send_splits))
    message = torch.cat(parts) if out is None else torch.cat(parts, out=out)
    return message, send_splits, recv_splits


def split_message(recv: torch.Tensor, recv_splits: List[int], meta_words: int,
                  row_bytes: int) -> Tuple[torch.Tensor, Optional[Received]]:
    """``(metadata (W, meta_words) int64 (new), records)`` of a received step message:
    the records a :class:`Received` view of ``recv`` (no copy: valid as long as ``recv``
    is), or None when no record arrived."""
    m = meta_words * 8
    offsets, starts = [], []
    at = 0
    for s in recv_splits:
        offsets.append(at)
        if s > m:
            starts.extend(range(at + m, at + s, row_bytes))
        at += s
    metas = recv.unfold(0, m, 1).index_select(0, torch.tensor(offsets)).view(torch.int64)
    if not starts:
        return metas, None
    return metas, Received(recv, torch.tensor(starts, dtype=torch.int64))


def assemble(prepared: PreparedDraw, storage: ShardStorage,
             records: Optional[Union[torch.Tensor, Received]],
             out_device: Optional[torch.device]) -> Dict[str, torch.Tensor]:
    """Every stored field of the representatives, in draw order, on ``out_device``
    (default: the storage device), in the storage dtypes; new tensors, the caller's.

    ``records``: the received records, by source rank, when the draw moved records
    (``(d, row_bytes)`` uint8, or a :class:`Received` view of the step's message), else
    None (``prepared.fields`` holds them). Each field is gathered straight from them in
    draw order: one copy."""
    fields = prepared.fields
    if fields is None:
        layout = storage.layout
        if isinstance(records, Received):
            fields = records.fields(layout, prepared.where)
        else:
            fields = {name: view.index_select(0, prepared.where)
                      for name, view in layout.unpack(records).items()}
    if out_device is None or torch.device(out_device) == storage.device or not fields:
        return fields
    out_device = torch.device(out_device)
    if out_device.type == "cuda" and storage.device.type == "cpu":
        return {name: storage.staging.to_device(f"draw-{name}", t, out_device)
                for name, t in fields.items()}
    return {name: t.to(out_device, non_blocking=out_device.type == "cuda")
            for name, t in fields.items()}


def exchange_records(prepared: PreparedDraw, storage: ShardStorage, exchange) -> torch.Tensor:
    """The records of a draw whose metadata already travelled (a payload collective)."""
    return exchange.all_to_all(prepared.send, prepared.send_splits, prepared.recv_splits,
                               out=storage.scratch("recv", sum(prepared.recv_splits)))
