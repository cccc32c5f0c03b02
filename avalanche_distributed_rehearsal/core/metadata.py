"""The per-step metadata: a header that proves the ranks agree, and this rank's candidate
keys, one int64 message per rank::

    [magic, kind, step, seq, config, layout, now, next, ledger,
     experience, epoch, iteration, epoch_length, error, count,  key_0, key_1, ...]

The ``count`` keys (the class labels of the candidates this rank offers at this step,
in offer order; 0 for every candidate of a plain reservoir) are what the replicated
per-class ledger (:mod:`~.ledger`) needs to update every rank's counts: ``O(c)`` words
per rank, whatever the number of classes held. Messages have a width agreed for the
channel (the largest number of candidates a step may offer).

The header carries what must be equal on every rank: the kind of call, the step, the
call's sequence number, the digests of the configuration, of the sample layout, of the
excluded classes used by this exchange's plan (``now``) and announced for the next
(``next``), of the replicated ledger, and the caller's position in training (experience,
epoch, iteration, iterations per epoch; -1 when unknown). Collectives pair up by call
count, so a rank that runs more steps than its peers, skips a step or draws twice would
otherwise silently follow another plan; here every rank raises the same error naming
both positions. ``error`` is non-zero when this rank rejected its candidates (NaN, bad
labels): every rank then raises and nobody inserts.

The header rides in the same collective as the payload (:mod:`~.exchange`), so it is
checked after the payload moved; the payload's sizes depend only on state agreed at
earlier exchanges (see :class:`~.buffer.ShardedRehearsalBuffer`), so a disagreement is
always detected, never a cause of mismatched transfers.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

#: Kinds of call: a pipeline step (one collective), a synchronising step (metadata first).
STEP, SYNC = 1, 2
KIND_NAMES = {STEP: "a step", SYNC: "a synchronised step"}
MAGIC = 0x5245484541525331  # constant first word: a misaligned message is caught
HEADER = 15
(_MAGIC, _KIND, _STEP, _SEQ, _CONFIG, _LAYOUT, _NOW, _NEXT, _LEDGER) = range(9)
_CONTEXT = slice(9, 13)
_ERROR, _COUNT = 13, 14

#: Codes of the ``error`` word.
NONFINITE, BAD_LABELS, BAD_VALUES = 1, 2, 3
ERROR_NAMES = {NONFINITE: "NaN or Inf in a floating-point field",
               BAD_LABELS: "labels outside [0, 2**63 - 1]",
               BAD_VALUES: "values its storage dtype cannot hold"}


def digest(obj) -> int:
    """A 62-bit digest of a JSON-able object (0 is reserved for "none")."""
    data = json.dumps(obj, sort_keys=True).encode()
    return (int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 2) or 1


@functools.lru_cache(maxsize=256)
def labels_digest(labels: Tuple[int, ...]) -> int:
    """:func:`digest` of a tuple of class labels as a list (an exclusion), remembered: a
    step's header carries two, and they rarely change from step to step."""
    return digest(list(labels))


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
class Header:
    """One rank's header words, decoded (see :func:`encode`)."""

    rank: int
    kind: int
    step: int
    seq: int
    config: int
    layout: int
    now: int
    next: int
    ledger: int
    context: StepContext
    error: int
    count: int

    def position(self) -> str:
        where = self.context.describe()
        call = KIND_NAMES.get(self.kind, f"call kind {self.kind}")
        return f"rank {self.rank} at step {self.step} ({call} #{self.seq}" + (f"; {where})" if where else ")")


class OutOfStepError(RuntimeError):
    """Ranks reached a collective from different points of training."""


class PeerError(RuntimeError):
    """Another rank rejected its part of the step (its own error names the cause)."""


def encode(kind: int, step: int, seq: int, config: int, layout: int, now: int, nxt: int,
           ledger: int, context: StepContext, error: int, keys: Sequence[int],
           width: int) -> torch.Tensor:
    """One rank's message: ``(HEADER + width,)`` int64, the header then ``keys`` (at most
    ``width``), zero-padded."""
    if len(keys) > width:
        raise ValueError(f"{len(keys)} candidate keys do not fit the agreed width {width}")
    words = [MAGIC, kind, step, seq, config, layout, now, nxt, ledger] + context.words() \
        + [error, len(keys)]
    message = torch.zeros(HEADER + width, dtype=torch.int64)
    message[:HEADER] = torch.tensor(words, dtype=torch.int64)
    if len(keys):
        message[HEADER: HEADER + len(keys)] = torch.as_tensor(keys, dtype=torch.int64)
    return message


def decode(messages: torch.Tensor) -> Tuple[List[Header], torch.Tensor, torch.Tensor]:
    """``(headers, keys (W, width), counts (W,))`` of gathered messages ``(W, HEADER + width)``."""
    rows = messages[:, :HEADER].tolist()
    heads = []
    for w, r in enumerate(rows):
        if r[_MAGIC] != MAGIC:
            raise RuntimeError(f"rank {w}'s step metadata is corrupt (ranks disagree on the "
                               "size of the exchange: they are out of step)")
        heads.append(Header(w, r[_KIND], r[_STEP], r[_SEQ], r[_CONFIG], r[_LAYOUT], r[_NOW],
                            r[_NEXT], r[_LEDGER], StepContext(*r[_CONTEXT]), r[_ERROR],
                            r[_COUNT]))
    return heads, messages[:, HEADER:], messages[:, _COUNT]


#: header words that must be equal on every rank (all but the magic word, the ledger
#: digest is among them; ``error`` and ``count`` may differ)
_AGREED = slice(_KIND, _ERROR)
#: Up to this many ranks, :func:`agree` compares the headers as Python lists (a handful
#: of small tensor operations cost more); above, as tensors.
_LIST_AGREE = 32


def _clean(head: torch.Tensor) -> bool:
    """Whether every gathered header (``(W, HEADER)``) is intact, agrees with rank 0's
    and reports no error."""
    if head.shape[0] <= _LIST_AGREE:
        rows = head.tolist()
        first = rows[0][_AGREED]
        return all(r[_MAGIC] == MAGIC and not r[_ERROR] and r[_AGREED] == first for r in rows)
    return (bool((head[:, _AGREED] == head[0, _AGREED]).all())
            and bool((head[:, _MAGIC] == MAGIC).all()) and not bool(head[:, _ERROR].any()))


def agree(messages: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Check gathered messages ``(W, HEADER + width)``; return ``(keys (W, width), counts
    (W,))``. Fast in the common case (every rank agrees, nobody reports an error): a
    comparison of lists on a few ranks, ``O(W)`` tensor work and no per-rank Python on
    many; otherwise :func:`check_agreement` names the disagreement (raising on every
    rank)."""
    head = messages[:, :HEADER]
    if not _clean(head):
        heads, _, _ = decode(messages)
        check_agreement(heads, rank)
    return messages[:, HEADER:], head[:, _COUNT]


def layouts_of(messages: torch.Tensor) -> set:
    """The distinct layout digests of gathered messages (0: a rank without a layout)."""
    return set(messages[:, _LAYOUT].unique().tolist())


def check_agreement(heads: List[Header], rank: int) -> None:
    """Raise the same kind of error on every rank when the gathered headers disagree.

    Order: position (out of step), configuration, excluded classes, sample layout, the
    replicated per-class state, then errors another rank reported for its candidates
    (this rank's own error is raised by the caller, with its details).
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
                           "sampling, seed, batch_size_mem, num_candidates, nonfinite, or "
                           "async_mode='auto' on some ranks only, differ between ranks); "
                           "every rank must use the same ones")
    if len({(h.now, h.next) for h in heads}) > 1:
        raise RuntimeError("ranks excluded different classes from the draw; every rank "
                           "must pass the same excluded labels at the same step")
    if len({h.layout for h in heads if h.layout != 0}) > 1:
        raise RuntimeError("ranks store samples of different shapes or dtypes; every "
                           "rank must insert inputs of the same per-sample shape and dtype")
    if len({h.ledger for h in heads}) > 1:
        raise RuntimeError("the ranks' replicated per-class counts differ (a rank loaded "
                           "another checkpoint or state, or changed the buffer alone); "
                           "every rank must load, resize and insert together")
    failed = [h for h in heads if h.error and h.rank != rank]
    if failed and not heads[rank].error:
        h = failed[0]
        raise PeerError(f"rank {h.rank} rejected its candidates at step {h.step} "
                        f"({ERROR_NAMES.get(h.error, 'error')}); nothing was inserted on any rank")
