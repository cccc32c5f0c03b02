"""Deterministic seed derivation: one user seed, many independent, named streams.

Every random decision of the buffer draws from a stream named here, derived from the
user's seed, so that no two decisions share a generator by accident and a run is
reproducible from its seed alone:

* :data:`INSERTION`: the reservoir's eviction and replacement choices, per rank
  (``derive_seed(seed, rank, INSERTION)``).
* :data:`PLAN`: the global sampling plan of a step, the same on every rank
  (``generator(seed, step, PLAN)``).
* :data:`CANDIDATES`: which rows of a mini-batch are offered to the shard, per rank and
  step (``derive_seed(seed, rank, step, CANDIDATES)``).
* :data:`CLASS_PRIORITY`: each class label's fixed priority, the same on every rank,
  which decides the classes that get the extra slot of an uneven budget, and the
  classes kept when classes outnumber the budget (``derive_seed(seed, CLASS_PRIORITY, label)``).
* :data:`ELASTIC`: the reservoir generator of a shard rebuilt on another number of ranks
  (``derive_seed(seed, rank, INSERTION, ELASTIC, saved_world)``).
"""

from __future__ import annotations

import hashlib

import torch

INSERTION = 0x5EED
PLAN = 0xD1A
CANDIDATES = 0xCA
CLASS_PRIORITY = 0xC1A55
ELASTIC = 0xE1A5


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part, e.g. ``derive_seed(seed, rank, step)``.

    Unlike ``seed + rank`` it never makes two streams collide by accident
    (``(0, 1)`` and ``(1, 0)`` give unrelated seeds).
    """
    data = b"".join(int(p).to_bytes(16, "little", signed=True) for p in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def generator(*parts: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))
