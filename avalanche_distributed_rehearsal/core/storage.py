"""Preallocated, lazily shaped storage for one rank's shard of the buffer."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .layout import RecordLayout


class ShardStorage:
    """A fixed-capacity table of records, one row per stored sample.

    Memory is allocated once, on the first :meth:`write`, when the record layout (the
    shapes and dtypes of a sample's fields) becomes known. Rows ``0 .. size - 1`` are
    occupied; the storage never holds gaps, so a row index is a valid *slot* as long as
    it is smaller than :attr:`size`.

    Args:
        capacity: maximum number of rows (samples) this shard holds; ``>= 0``.
        device: where the rows live. CPU storage is allocated in pinned memory when
            ``pin_memory`` is true (the default when CUDA is available), which lets
            host-to-device copies of representatives run asynchronously.

    The storage owns its memory. :meth:`gather` returns new tensors (copies); only
    :meth:`fields` returns views into the storage.
    """

    def __init__(self, capacity: int, device: torch.device | str = "cpu",
                 pin_memory: Optional[bool] = None):
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be a non-negative int, got {capacity!r}")
        self.device = torch.device(device)
        if pin_memory is None:
            pin_memory = self.device.type == "cpu" and torch.cuda.is_available()
        self.pin_memory = bool(pin_memory)
        self.capacity = capacity
        self.size = 0
        self.layout: Optional[RecordLayout] = None
        self.rows: Optional[torch.Tensor] = None

    @property
    def allocated(self) -> bool:
        return self.rows is not None

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

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """Copy the rows at ``slots`` (``(n,)`` int64) into a new ``(n, row_bytes)`` uint8 tensor."""
        if self.rows is None:
            return torch.empty((0, 8), dtype=torch.uint8, device=self.device)
        return self.rows.index_select(0, slots.to(self.device))

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
        if old is not None and self.layout is not None:
            self.rows = torch.zeros((capacity, self.layout.row_bytes), dtype=torch.uint8,
                                    device=self.device, pin_memory=self.pin_memory)
            self.rows[: keep.numel()] = old.index_select(0, keep.to(self.device))
        self.size = int(keep.numel())
