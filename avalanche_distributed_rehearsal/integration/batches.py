"""Avalanche mini-batches to record batches and back.

Avalanche mini-batches are sequences (``[x, y, t]``, then any data attribute a dataset
adds, e.g. ``[x, y, t, logits]``) or, in custom strategies, dictionaries. The
buffer stores *records* (mappings of named tensors, see
:mod:`avalanche_distributed_rehearsal.core.records`). :class:`BatchFields` says which
mini-batch entries are stored under which field name, builds the record of a batch, and
merges representatives back into the mini-batch: every stored entry becomes
``[batch ; representatives]``; entries the buffer does not store pass through untouched.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

import torch

from ..core.records import INPUT, LABEL, TASK, is_class_labels

Key = Union[int, str]
LABEL_KEYS = ("label", "labels", "y", "target", "targets")
TASK_KEYS = ("task", "task_label", "task_labels", "task_id", "t")


class BatchFields:
    """Which mini-batch entries the buffer stores, and under which record field names.

    Args:
        fields: ``{record field name: mini-batch position or key}``. Default, for
            sequences: ``{"input": 0, "label": 1, "task": 2}`` (the layout of Avalanche's
            datasets; no task field when entry 2 is missing or not integer labels of
            shape ``(n,)``); for dictionaries:
            every tensor entry with one row per sample, under its own key, except that the
            first of :data:`LABEL_KEYS` present is stored as ``"label"`` and the first of
            :data:`TASK_KEYS` as ``"task"``.

    Records hold CPU or device tensors as the mini-batch does; nothing is copied here.
    """

    def __init__(self, fields: Optional[Mapping[str, Key]] = None):
        if fields is not None:
            if not isinstance(fields, Mapping) or not fields:
                raise TypeError("fields must be a non-empty mapping of record field names to "
                                f"mini-batch positions or keys, got {fields!r}")
            for name, key in fields.items():
                if not isinstance(name, str) or not name or isinstance(key, bool) \
                        or not isinstance(key, (int, str)):
                    raise TypeError(f"fields: {name!r} -> {key!r}; expected a field name -> "
                                    "an int position or a str key")
        self.fields = None if fields is None else dict(fields)

    def mapping(self, mbatch) -> Dict[str, Key]:
        """``{record field: position or key}`` for this mini-batch."""
        if self.fields is not None:
            return dict(self.fields)
        if isinstance(mbatch, Mapping):
            return _dict_defaults(mbatch)
        if isinstance(mbatch, Sequence) and len(mbatch) >= 2:
            out = {INPUT: 0, LABEL: 1}
            if len(mbatch) >= 3 and is_class_labels(mbatch[2]):
                out[TASK] = 2
            return out
        raise ValueError("mini-batches must be sequences (x, y[, ..., t]) or dictionaries; got "
                         f"{type(mbatch).__name__} of length {len(mbatch) if hasattr(mbatch, '__len__') else '?'}")

    def to_record(self, mbatch) -> Dict[str, torch.Tensor]:
        """The record batch of ``mbatch`` (its stored entries, shared, not copied)."""
        record = {}
        for name, key in self.mapping(mbatch).items():
            try:
                value = mbatch[key]
            except (KeyError, IndexError):
                raise ValueError(f"the mini-batch has no entry {key!r} for field {name!r} "
                                 f"(fields={self.mapping(mbatch)})") from None
            record[name] = value
        return record

    def merge(self, mbatch, reps: Mapping[str, torch.Tensor]):
        """``mbatch`` with every stored entry followed by the representatives' rows (on the
        entry's device, in its dtype); a new list or dict, other entries untouched."""
        out = dict(mbatch) if isinstance(mbatch, Mapping) else list(mbatch)
        if not reps:
            return out
        for name, key in self.mapping(mbatch).items():
            if name not in reps:
                continue
            value = mbatch[key]
            out[key] = torch.cat([value, reps[name].to(value.device, value.dtype)])
        return out


def _dict_defaults(mbatch: Mapping) -> Dict[str, Key]:
    rows = None
    for value in mbatch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            rows = value.shape[0]
            break
    if rows is None:
        raise ValueError("a dictionary mini-batch needs at least one tensor entry of shape (n, ...)")
    out: Dict[str, Key] = {}
    label = next((k for k in LABEL_KEYS if k in mbatch), None)
    task = next((k for k in TASK_KEYS if k in mbatch), None)
    for key, value in mbatch.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue
        if value.dim() < 1 or value.shape[0] != rows:
            continue
        name = LABEL if key == label else TASK if key == task else key
        out[name] = key
    return out
