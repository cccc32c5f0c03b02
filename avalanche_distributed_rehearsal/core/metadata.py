"""The per-step metadata every rank all-gathers: a header that proves the ranks agree, and
each rank's per-class counts as sparse ``(label, stored)`` pairs.

One message per rank, one int64 CPU tensor::

    [entries, kind, step, seq, config, layout, excluded,
     experience, epoch, iteration, epoch_length,  label_0, stored_0, label_1, stored_1, ...]

``entries`` pairs follow the header: one per class this rank has seen (``stored`` may be
0), so the message grows with the classes present on the rank, never with the largest
label value (labels may be any int64 >= 0). Messages are padded to a common width; when
a rank needs more room than the last width, every rank sees it in the gathered headers
and the gather is repeated once, wider (rare: only when a rank sees new classes).

The header carries what must be equal on every rank at every gather: the kind of call
(a draw or a quota refresh), the step, the call's sequence number on this channel, the
digests of the configuration, sample layout and excluded classes, and the caller's
position in training (experience, epoch, iteration, iterations per epoch; -1 when
unknown). Collectives pair up by call count, so a rank that runs more steps than its
peers, skips a draw or draws twice would otherwise silently follow another plan; here
every rank raises the same ``RuntimeError`` naming both positions, before any payload
moves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DRAW, REFRESH = 1, 2
KIND_NAMES = {DRAW: "a draw", REFRESH: "a quota refresh"}
HEADER = 11
_ENTRIES, _KIND, _STEP, _SEQ, _CONFIG, _LAYOUT, _EXCLUDED = range(7)
_CONTEXT = slice(7, 11)


def digest(obj) -> int:
    """A 62-bit digest of a JSON-able object (0 is reserved for "none")."""
    data = json.dumps(obj, sort_keys=True).encode()
    return (int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 2) or 1


@dataclass(frozen=True)
class StepContext:
    """Where a rank is in training when it calls a collective (-1: unknown).

    The plugin fills it from Avalanche's clock: every rank must be at the same
    experience, epoch and iteration, with the same number of iterations per epoch.
    """

    experience: int = -1
    epoch: int = -1
    iteration: int = -1
    epoch_length: int = -1

    def words(self) -> List[int]:
        return [int(self.experience), int(self.epoch), int(self.iteration), int(self.epoch_length)]

    def describe(self) -> str:
        parts = []
        if self.experience >= 0:
            parts.append(f"experience {self.experience}")
        if self.epoch >= 0:
            parts.append(f"epoch {self.epoch}")
        if self.iteration >= 0:
            total = f" of {self.epoch_length}" if self.epoch_length >= 0 else ""
            parts.append(f"iteration {self.iteration}{total}")
        return ", ".join(parts)


@dataclass(frozen=True)
class ClassTable:
    """What every rank stores, per class, at one gather (identical on every rank).

    Attributes:
        labels: ``(L,)`` int64, the class labels any rank has seen, ascending.
        stored: ``(W, L)`` int64 CPU, samples of ``labels[j]`` stored on rank ``w``.
        seen: ``(W, L)`` bool CPU, whether rank ``w`` has seen ``labels[j]``.

    Owned by the table: never modified after creation.
    """

    labels: torch.Tensor
    stored: torch.Tensor
    seen: torch.Tensor

    @property
    def world_size(self) -> int:
        return self.stored.shape[0]

    def columns(self, labels: Sequence[int]) -> List[int]:
        """Column indexes of those of ``labels`` present in the table."""
        index = {int(c): j for j, c in enumerate(self.labels.tolist())}
        return [index[int(c)] for c in labels if int(c) in index]

    def class_counts(self, rank: Optional[int] = None) -> Dict[int, int]:
        """``{label: stored}`` over all ranks (or one rank), classes with samples only."""
        row = self.stored.sum(0) if rank is None else self.stored[rank]
        return {int(c): int(n) for c, n in zip(self.labels.tolist(), row.tolist()) if n}

    def same_as(self, other: Optional["ClassTable"]) -> bool:
        return (other is not None and torch.equal(self.labels, other.labels)
                and torch.equal(self.stored, other.stored) and torch.equal(self.seen, other.seen))


def empty_table(world_size: int) -> ClassTable:
    return ClassTable(torch.zeros(0, dtype=torch.int64),
                      torch.zeros((world_size, 0), dtype=torch.int64),
                      torch.zeros((world_size, 0), dtype=torch.bool))


@dataclass(frozen=True)
class Header:
    """One rank's header words, decoded."""

    rank: int
    kind: int
    step: int
    seq: int
    config: int
    layout: int
    excluded: int
    context: StepContext

    def position(self) -> str:
        where = self.context.describe()
        call = KIND_NAMES.get(self.kind, f"call kind {self.kind}")
        return f"rank {self.rank} at step {self.step} ({call} #{self.seq}" + (f"; {where})" if where else ")")


class OutOfStepError(RuntimeError):
    """Ranks reached a collective from different points of training."""


def encode(kind: int, step: int, seq: int, config: int, layout: int, excluded: int,
           context: StepContext, counts: Sequence[Tuple[int, int]], width: int) -> torch.Tensor:
    """One rank's message: ``(HEADER + 2 * width,)`` int64, the same size on every rank.

    The header says how many entries the rank has; only the first ``width`` fit. When
    some rank has more, every rank sees it (:func:`needed_width`) and gathers again wider.
    """
    message = torch.zeros(HEADER + 2 * width, dtype=torch.int64)
    message[:HEADER] = torch.tensor([len(counts), kind, step, seq, config, layout, excluded]
                                    + context.words(), dtype=torch.int64)
    fit = min(width, len(counts))
    if fit:
        message[HEADER: HEADER + 2 * fit] = torch.tensor(counts[:fit], dtype=torch.int64).flatten()
    return message


def headers(gathered: torch.Tensor) -> List[Header]:
    rows = gathered[:, :HEADER].tolist()
    return [Header(w, r[_KIND], r[_STEP], r[_SEQ], r[_CONFIG], r[_LAYOUT], r[_EXCLUDED],
                   StepContext(*r[_CONTEXT])) for w, r in enumerate(rows)]


def check_agreement(heads: List[Header]) -> None:
    """Raise the same error on every rank when the gathered headers disagree.

    Order: position (out of step), then configuration, excluded classes, sample layout.
    """
    first = heads[0]
    for h in heads[1:]:
        if (h.kind, h.step, h.seq, h.context) != (first.kind, first.step, first.seq, first.context):
            raise OutOfStepError(
                f"ranks are out of step: {first.position()}, {h.position()}. Every rank must "
                "run the same number of training steps, with the same number of iterations "
                "per epoch (Avalanche's distributed sampler pads every rank's share to the "
                "same length; a custom data loader must do the same)")
    if len({h.config for h in heads}) > 1:
        raise RuntimeError("ranks passed different buffer configurations (mem_size, "
                           "sampling, seed, batch_size_mem, num_candidates or nonfinite "
                           "differ between ranks); every rank must use the same ones")
    if len({h.excluded for h in heads}) > 1:
        raise RuntimeError("ranks excluded different classes from the draw; every rank "
                           "must pass the same excluded labels at the same step")
    if len({h.layout for h in heads if h.layout != 0}) > 1:
        raise RuntimeError("ranks store samples of different shapes or dtypes; every "
                           "rank must insert inputs of the same per-sample shape and dtype")


def needed_width(gathered: torch.Tensor) -> int:
    """The largest number of entries any rank had to send."""
    return int(gathered[:, _ENTRIES].max())


def decode_table(gathered: torch.Tensor) -> ClassTable:
    """The :class:`ClassTable` of a gather whose width fitted every rank's entries."""
    world = gathered.shape[0]
    width = (gathered.shape[1] - HEADER) // 2
    pairs = gathered[:, HEADER:].view(world, width, 2)
    valid = torch.arange(width).unsqueeze(0) < gathered[:, _ENTRIES].unsqueeze(1)
    labels_all, counts_all = pairs[..., 0][valid], pairs[..., 1][valid]
    ranks_all = torch.arange(world).unsqueeze(1).expand(world, width)[valid]
    labels = torch.unique(labels_all)
    column = torch.searchsorted(labels, labels_all)
    stored = torch.zeros((world, labels.numel()), dtype=torch.int64)
    seen = torch.zeros((world, labels.numel()), dtype=torch.bool)
    stored[ranks_all, column] = counts_all
    seen[ranks_all, column] = True
    return ClassTable(labels, stored, seen)


_WIDTH_STEP = 8  # message widths grow in steps of this many classes (fewer re-gathers)


def local_table(counts: Sequence[Tuple[int, int]]) -> ClassTable:
    """The table of one rank alone (world size 1): every listed class seen."""
    labels = torch.tensor([c for c, _ in counts], dtype=torch.int64)
    stored = torch.tensor([[n for _, n in counts]], dtype=torch.int64).view(1, -1)
    return ClassTable(labels, stored, torch.ones_like(stored, dtype=torch.bool))


class MetadataChannel:
    """The per-step all-gather of every rank's header and per-class counts.

    Owns the call sequence number and the agreed message width; the collectives go
    through the exchange passed to each call (the buffer's: its gloo metadata group;
    whoever replaces the buffer's exchange, e.g. to meter it, replaces it here too). One
    all-gather per call in
    the steady state; a second when some rank sees new classes (wider messages) or the
    sample layout must be learnt from another rank (``adopt_layout``, itself collective).
    """

    def __init__(self):
        self.seq = 0
        self.width = 0

    def reset(self, width: int = 0) -> None:
        """After a load, every rank restarts its sequence together."""
        self.seq = 0
        self.width = int(width)

    def gather(self, exchange, kind: int, step: int, counts: Sequence[Tuple[int, int]],
               config: int, layout_digest, excluded: int, context: StepContext, adopt_layout
               ) -> Tuple[ClassTable, int, int]:
        """Collective. ``(table, bytes sent, bytes received)``.

        ``counts``: this rank's ``(label, stored)`` pairs, ascending labels.
        ``layout_digest()``: this rank's layout digest (0: none yet). ``adopt_layout()``:
        collective, called on every rank when some ranks have a layout and others not.
        Raises :class:`OutOfStepError` or ``RuntimeError`` on every rank when the headers
        disagree (see :func:`check_agreement`).
        """
        if exchange.world_size == 1:  # nothing to agree on: the table without checks
            size = (HEADER + 2 * len(counts)) * 8  # what the rank "sends" itself
            return local_table(counts), size, size
        sent = received = 0
        while True:
            message = encode(kind, step, self.seq, config, layout_digest(), excluded, context,
                             counts, self.width)
            gathered = exchange.all_gather(message)
            self.seq += 1
            sent += message.numel() * 8
            received += gathered.numel() * 8
            heads = headers(gathered)
            check_agreement(heads)
            layouts = {h.layout for h in heads}
            if 0 in layouts and len(layouts) > 1:  # every rank sees it: all take part
                adopt_layout()
                continue
            need = needed_width(gathered)
            if need > self.width:
                self.width = -(-need // _WIDTH_STEP) * _WIDTH_STEP
                continue
            return decode_table(gathered), sent, received
