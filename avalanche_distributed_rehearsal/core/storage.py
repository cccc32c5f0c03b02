"""Preallocated, lazily shaped storage for one rank's shard of the buffer."""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch

from .layout import RecordLayout
from .staging import PinnedStaging

#: Field size from which :meth:`ShardStorage.write_fields` copies a partial batch row by
#: row instead of gathering it first (a gathered temporary costs more than the loop).
_ROW_COPY_BYTES = 64 * 1024
#: Up to this many rows, :meth:`ShardStorage.write_fields` copies row by row into CPU storage.
_FEW_ROWS = 2


def _fit_range(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` clamped to the finite range of a narrower floating storage ``dtype``, so
    that a finite value (e.g. a logit above 65504 kept as float16) stays finite."""
    if (dtype.is_floating_point and value.is_floating_point() and value.dtype != dtype
            and torch.finfo(dtype).max < torch.finfo(value.dtype).max):
        info = torch.finfo(dtype)
        return value.clamp(info.min, info.max)
    return value


def _by_row(slots: Sequence[int], rows: Sequence[int]):
    """``(slots, rows, start)`` for writing row ``rows[k]`` at ``slots[k]``. When the rows
    are ``start .. start + n - 1`` in any order, ``rows`` comes back None and the slots in
    row order: the rows are then a slice of the batch, nothing to gather (the slots are
    distinct, so the order of the writes does not matter). Otherwise unchanged."""
    n, start = len(rows), min(rows)
    if max(rows) - start != n - 1 or len(set(rows)) != n:
        return slots, rows, 0
    ordered = [0] * n
    for row, slot in zip(rows, slots):
        ordered[row - start] = slot
    return ordered, None, start


class ShardStorage:
    """A fixed-capacity table of records, one row per stored sample.

    Memory is allocated once, on the first :meth:`write`, when the record layout (the
    shapes and dtypes of a sample's fields) becomes known. Rows ``0 .. size - 1`` are
    occupied; the storage never holds gaps, so a row index is a valid *slot* as long as
    it is smaller than :attr:`size`.

    Args:
        capacity: maximum number of rows (samples) this shard holds; ``>= 0``.
        device: where the rows live.
        pin_memory: allocate CPU rows in page-locked memory (default False). Not needed
            for asynchronous copies: the per-step traffic between a CPU shard and a GPU
            goes through small persistent pinned buffers (:attr:`staging`), and pinning a
            large shard through PyTorch's caching host allocator rounds it up to a power
            of two.

    The storage owns its memory. :meth:`gather` returns new tensors (copies); only
    :meth:`fields` and :meth:`columns` return views into the storage.
    """

    def __init__(self, capacity: int, device: torch.device | str = "cpu",
                 pin_memory: Optional[bool] = None):
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be a non-negative int, got {capacity!r}")
        self.device = torch.device(device)
        self.pin_memory = bool(pin_memory) and self.device.type == "cpu"
        self._staging: Optional[PinnedStaging] = None
        self.capacity = capacity
        self.size = 0
        self.layout: Optional[RecordLayout] = None
        self.rows: Optional[torch.Tensor] = None
        self._scratch: Dict[str, torch.Tensor] = {}
        self._columns: Optional[tuple] = None  # (rows, {name: view of rows})

    @property
    def allocated(self) -> bool:
        return self.rows is not None

    @property
    def staging(self) -> PinnedStaging:
        """The pinned buffers for copies between this (CPU) storage and a GPU."""
        if self._staging is None:
            self._staging = PinnedStaging()
        return self._staging

    @property
    def nbytes(self) -> int:
        """Bytes held by the preallocated rows (0 before the first write)."""
        return 0 if self.rows is None else self.rows.numel()

    def allocate(self, layout: RecordLayout) -> None:
        """Allocate ``capacity`` rows for ``layout``. Called once, by the first write."""
        if self.layout is not None:
            if layout != self.layout:
                raise ValueError("storage is already laid out as "
                                 f"{self.layout.describe()}, got {layout.describe()}")
            return
        self.layout = layout
        self._columns = None
        self.rows = torch.zeros((self.capacity, layout.row_bytes), dtype=torch.uint8,
                                device=self.device, pin_memory=self.pin_memory)

    def write(self, slots: torch.Tensor, records: torch.Tensor) -> None:
        """Store ``records`` (``(n, row_bytes)`` uint8) at ``slots`` (``(n,)`` int64, CPU).

        A slot equal to :attr:`size` appends (slots must then be consecutive); a slot
        below it overwrites. The caller guarantees ``slots`` are distinct.
        """
        assert self.rows is not None, "allocate() before write()"
        if slots.numel() == 0:
            return
        top = int(slots.max()) + 1
        if top > self.capacity:
            raise IndexError(f"slot {top - 1} out of range for capacity {self.capacity}")
        self.rows.index_copy_(0, slots.to(self.device), records.to(self.device, non_blocking=True))
        self.size = max(self.size, top)

    def write_fields(self, slots: Sequence[int], values: Mapping[str, torch.Tensor],
                     rows: Optional[Sequence[int]] = None) -> None:
        """Store row ``rows[k]`` of every field tensor ``values[name]`` at slot ``slots[k]``.

        ``values`` maps every field of the layout to a tensor of shape ``(n, *field.shape)``,
        on any device, of any dtype (cast to the field's storage dtype); ``rows`` defaults
        to ``0 .. n-1``. Each field
        is copied straight into its column of the storage (no packed temporary). Slots
        follow the rules of :meth:`write`.
        """
        assert self.rows is not None and self.layout is not None, "allocate() before write"
        n = len(slots)
        if not n:
            return
        top = max(slots) + 1
        if top > self.capacity:
            raise IndexError(f"slot {top - 1} out of range for capacity {self.capacity}")
        if rows is not None and len(rows) != n:
            raise ValueError(f"rows ({len(rows)}) and slots ({n}) must have the same length")
        start = 0
        if rows is not None:
            slots, rows, start = _by_row(slots, rows)
        prefix = rows is None  # rows start .. start + n - 1: a slice, no gather
        if n <= _FEW_ROWS and self.device.type == "cpu" and not prefix:
            self._write_rows(slots, values, rows)
            self.size = max(self.size, top)
            return
        index = torch.tensor(slots, dtype=torch.int64, device=self.device)
        # Asynchronous only into CUDA storage: a non-blocking copy *to* the CPU returns before
        # the bytes land, and a later CPU read of the storage would not wait for them.
        non_blocking = self.device.type == "cuda"
        picked: Dict[torch.device, torch.Tensor] = {}
        columns = self.columns()
        for name, spec in self.layout.fields.items():
            value = values[name]
            column = columns[name]
            if not prefix and spec.nbytes >= _ROW_COPY_BYTES and not (
                    value.is_cuda and self.device.type == "cpu"):
                # Large samples, some rows kept: copy row by row, no gathered temporary.
                for slot, row in zip(slots, rows):
                    column[slot].copy_(_fit_range(value[row], spec.dtype), non_blocking=non_blocking)
                continue
            if prefix:
                value = value[start: start + n]
            else:
                at = picked.get(value.device)
                if at is None:
                    at = picked[value.device] = torch.tensor(rows, dtype=torch.int64,
                                                              device=value.device)
                value = value.index_select(0, at)
            value = _fit_range(value, spec.dtype)
            if value.is_cuda and self.device.type == "cpu":
                # One copy into a pinned buffer (waited for in the calling thread, on its
                # own stream only), then into the storage.
                value = self.staging.to_host(f"write-{name}", value)
            if value.device != self.device or value.dtype != spec.dtype:
                value = value.to(self.device, dtype=spec.dtype, non_blocking=non_blocking)
            column.index_copy_(0, index, value)
        self.size = max(self.size, top)

    def _write_rows(self, slots: Sequence[int], values: Mapping[str, torch.Tensor],
                    rows: Sequence[int]) -> None:
        """:meth:`write_fields` of a few rows into CPU storage, one row copy each (cheaper
        than building index tensors for one or two rows)."""
        columns = self.columns()
        for name, spec in self.layout.fields.items():
            value, column = values[name], columns[name]
            for slot, row in zip(slots, rows):
                column[slot].copy_(_fit_range(value[row], spec.dtype))

    def gather(self, slots: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Copy the rows at ``slots`` (``(n,)`` int64) into a ``(n, row_bytes)`` uint8 tensor:
        a new one, or ``out`` (then returned) when given."""
        if self.rows is None:
            return torch.empty((0, 8), dtype=torch.uint8, device=self.device)
        if out is None:
            return self.rows.index_select(0, slots.to(self.device))
        return torch.index_select(self.rows, 0, slots.to(self.device), out=out)

    def gather_fields(self, slots: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The fields of the rows at ``slots``, each a new contiguous tensor (one copy each)."""
        index = slots if slots.device == self.device else slots.to(self.device)
        return {name: view.index_select(0, index) for name, view in self.columns().items()}

    def columns(self) -> Dict[str, torch.Tensor]:
        """Zero-copy views of each field over all :attr:`capacity` rows (occupied or not),
        kept until the rows are reallocated. Writing to them writes the storage."""
        assert self.rows is not None and self.layout is not None
        if self._columns is None or self._columns[0] is not self.rows:
            self._columns = (self.rows, self.layout.unpack(self.rows))
        return self._columns[1]

    def scratch(self, name: str, rows: int) -> Optional[torch.Tensor]:
        """A ``(rows, row_bytes)`` uint8 buffer named ``name``, reused from call to call,
        for CPU storage; None for CUDA storage (the caching allocator already reuses).

        Fresh multi-megabyte CPU tensors are page-faulted in on every use (large ones are
        ``mmap``-ed anew each time); a kept buffer is not. Each name grows to the largest
        size asked for and lives as long as the storage. The contents are the caller's
        until the next call with the same name: never hand it (or a view of it) to code
        that keeps it.
        """
        if self.device.type != "cpu" or self.layout is None:
            return None
        row_bytes = self.layout.row_bytes
        held = self._scratch.get(name)
        if held is None or held.numel() < rows * row_bytes:
            held = torch.empty(rows * row_bytes, dtype=torch.uint8)
            self._scratch[name] = held
        return held[: rows * row_bytes].view(rows, row_bytes)

    def scratch_bytes(self, name: str, nbytes: int) -> Optional[torch.Tensor]:
        """A flat ``(nbytes,)`` uint8 buffer named ``name``, reused like :meth:`scratch`
        (CPU storage only; None for CUDA storage)."""
        if self.device.type != "cpu":
            return None
        held = self._scratch.get(name)
        if held is None or held.numel() < nbytes:
            held = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            self._scratch[name] = held
        return held[:nbytes]

    def fields(self) -> Dict[str, torch.Tensor]:
        """Zero-copy views of each field over the occupied rows ``[0, size)``."""
        assert self.rows is not None and self.layout is not None
        return self.layout.unpack(self.rows[: self.size])

    def resize(self, capacity: int, keep: Optional[torch.Tensor] = None) -> None:
        """Reallocate to ``capacity`` rows, keeping rows ``keep`` (default: all) compacted at the front."""
        if keep is None:
            keep = torch.arange(self.size)
        if keep.numel() > capacity:
            raise ValueError(f"cannot keep {keep.numel()} rows in capacity {capacity}")
        old = self.rows
        self.capacity = capacity
        self._columns = None
        if old is not None and self.layout is not None:
            self.rows = torch.zeros((capacity, self.layout.row_bytes), dtype=torch.uint8,
                                    device=self.device, pin_memory=self.pin_memory)
            self.rows[: keep.numel()] = old.index_select(0, keep.to(self.device))
        self.size = int(keep.numel())
