"""Fixed-width binary records: several tensors per sample packed into one uint8 row.

A shard stores every sample as one row of a ``(capacity, row_bytes)`` uint8 matrix.
Each *field* (label, task label, input, ...) occupies a byte range of the row, aligned
to 8 bytes so that a column slice can be reinterpreted as its own dtype without a copy.
Packing the fields into one row means that gathering samples is a single
``index_select`` and that moving them between ranks is a single ``all_to_all``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch

_ALIGN = 8


def _element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


@dataclass(frozen=True)
class FieldSpec:
    """One field of a record: per-sample ``shape`` and ``dtype``, stored at ``offset``."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _element_size(self.dtype)

    def from_bytes(self, raw: torch.Tensor) -> torch.Tensor:
        """``raw`` (``(n, nbytes)`` uint8, each row's bytes contiguous) seen as ``(n,
        *shape)`` of this field's dtype: a view, sharing memory with ``raw``."""
        if self.dtype != torch.uint8:
            raw = raw.view(self.dtype)
        return raw.view((raw.shape[0],) + self.shape)


class RecordLayout:
    """The byte layout of one sample.

    Args:
        fields: ordered ``(name, per-sample shape, dtype)`` triples. Bool fields are not
            supported (store them as uint8).

    ``row_bytes`` is a multiple of 8; every field starts on an 8-byte boundary.
    """

    def __init__(self, fields: Sequence[Tuple[str, Sequence[int], torch.dtype]]):
        specs: Dict[str, FieldSpec] = {}
        offset = 0
        for name, shape, dtype in fields:
            if name in specs:
                raise ValueError(f"duplicate field name {name!r}")
            if dtype == torch.bool or dtype.is_complex:
                raise TypeError(f"field {name!r}: dtype {dtype} is not supported")
            spec = FieldSpec(name, tuple(int(s) for s in shape), dtype, offset)
            specs[name] = spec
            offset += -(-spec.nbytes // _ALIGN) * _ALIGN
        self.fields: Dict[str, FieldSpec] = specs
        self.row_bytes: int = max(offset, _ALIGN)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecordLayout) and self.describe() == other.describe()

    def describe(self) -> list:
        """A JSON-friendly description: ``[[name, shape, dtype-name], ...]``."""
        return [[f.name, list(f.shape), str(f.dtype).replace("torch.", "")]
                for f in self.fields.values()]

    @classmethod
    def from_description(cls, description: Sequence) -> "RecordLayout":
        return cls([(name, tuple(shape), getattr(torch, dtype))
                    for name, shape, dtype in description])

    def field_view(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        """A zero-copy view of field ``name`` inside ``rows`` (``(n, row_bytes)`` uint8).

        The view shares memory with ``rows``: writing to it writes the records.
        Returns shape ``(n, *field.shape)`` and the field's dtype.
        """
        spec = self.fields[name]
        return spec.from_bytes(rows[:, spec.offset: spec.offset + spec.nbytes])

    def unpack(self, rows: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Zero-copy views of every field of ``rows``; they share memory with ``rows``."""
        return {name: self.field_view(rows, name) for name in self.fields}
