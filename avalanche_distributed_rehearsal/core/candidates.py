"""A step's candidate rows: which rows of a record batch this rank offers to its shard."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch


class Candidates:
    """The rows ``rows`` of the record batch ``record`` (all rows when ``rows`` is None).

    ``record`` maps field names to ``(n, ...)`` tensors on any device; ``rows`` is a
    ``(c,)`` int64 CPU tensor of row indexes. The pipeline hands the training batch itself
    in synchronous mode (it is used before :meth:`~.pipeline.RehearsalPipeline.offer`
    returns) and copies of the picked rows in asynchronous mode (the caller may reuse its
    tensors at once). Nothing is copied here until a field or rows are asked for.
    """

    __slots__ = ("record", "rows", "size")

    def __init__(self, record: Dict[str, torch.Tensor], rows: Optional[torch.Tensor] = None):
        self.record = record
        self.rows = rows
        self.size = next(iter(record.values())).shape[0] if rows is None else rows.numel()

    def __len__(self) -> int:
        return self.size

    def field(self, name: str) -> torch.Tensor:
        """Field ``name`` of the candidate rows, ``(c, ...)`` (a new tensor unless all rows
        of the record are candidates)."""
        value = self.record[name]
        if self.rows is None:
            return value
        return value.index_select(0, self.rows.to(value.device, non_blocking=True))

    def batch_rows(self, positions: List[int]) -> List[int]:
        """Rows of the record batch of the candidates at ``positions``."""
        if self.rows is None:
            return positions
        rows = self.rows.tolist()
        return [rows[p] for p in positions]

    def keep(self, mask: torch.Tensor) -> "Candidates":
        """The candidates whose entry of the ``(c,)`` bool CPU ``mask`` is True."""
        index = torch.nonzero(mask).flatten()
        rows = index if self.rows is None else self.rows[index]
        return Candidates(self.record, rows)
