"""Argument checks shared by the core and the integration layer.

Each check raises before anything is modified, with the argument's name and the form
that was expected.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

LABEL_MAX = 2 ** 63 - 1
NONFINITE_POLICIES = ("raise", "skip")


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def check_async_mode(value, error: type = ValueError):
    """``value`` if it is ``True``, ``False`` or ``"auto"``, else ``error`` naming it."""
    if not (isinstance(value, bool) or (isinstance(value, str) and value == "auto")):
        raise error(f"async_mode must be True, False or 'auto', got {value!r}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def to_int64_cpu(name: str, values: torch.Tensor) -> torch.Tensor:
    """``values`` (any integer dtype, any device) as a CPU int64 tensor.

    uint64 values above ``2**63 - 1`` cannot be served (labels travel as int64) and are
    refused with a ValueError instead of wrapping around.
    """
    if values.dtype == getattr(torch, "uint64", None):
        as_signed = values.cpu().view(torch.int64)
        if as_signed.numel() and bool((as_signed < 0).any()):
            raise ValueError(f"{name} must be integers in [0, 2**63 - 1]; got a uint64 value "
                             "above 2**63 - 1")
        return as_signed
    return values.to("cpu", torch.int64)


def label_values_error(labels: Optional[torch.Tensor],
                       task_labels: Optional[torch.Tensor]) -> Optional[ValueError]:
    """The ValueError for bad values of CPU int64 label tensors (either may be None), or
    None when they are fine (reads them: call off the hot path of the training thread).

    Labels may be any int64 >= 0 (sparse or huge labels cost nothing extra: the buffer's
    metadata grows with the candidates of a step, not with the largest label).
    """
    if labels is not None and labels.numel() and int(labels.min()) < 0:
        return ValueError(f"labels must be non-negative class indices in [0, 2**63 - 1], got "
                          f"min {int(labels.min())}")
    if task_labels is not None and task_labels.numel() and int(task_labels.min()) < 0:
        return ValueError(f"task_labels must be non-negative, got min {int(task_labels.min())}")
    return None


def label_list_error(labels: Optional[list], task_labels: Optional[list]) -> Optional[ValueError]:
    """:func:`label_values_error` for labels already read into Python lists."""
    if labels and min(labels) < 0:
        return ValueError(f"labels must be non-negative class indices in [0, 2**63 - 1], got "
                          f"min {min(labels)}")
    if task_labels and min(task_labels) < 0:
        return ValueError(f"task_labels must be non-negative, got min {min(task_labels)}")
    return None


def check_label_values(labels: Optional[torch.Tensor], task_labels: Optional[torch.Tensor]) -> None:
    """Raise what :func:`label_values_error` returns."""
    error = label_values_error(labels, task_labels)
    if error is not None:
        raise error


def all_finite(inputs: torch.Tensor) -> bool:
    """True when ``inputs`` holds no NaN or Inf; one reduction (and one host sync) in the
    common case.

    A sum with a NaN or Inf term is never finite (NaN and Inf propagate through additions),
    so a finite sum proves every element finite. A sum that is not finite proves nothing
    (finite values may overflow to Inf), so then every element is checked: exact always.
    """
    if not inputs.is_floating_point() or inputs.numel() == 0:
        return True
    if math.isfinite(inputs.sum().item()):
        return True
    return bool(torch.isfinite(inputs).all())


def finite_rows(inputs: torch.Tensor) -> torch.Tensor:
    """``(n,)`` bool: rows of ``inputs`` with no NaN or Inf (integer inputs are always finite).

    One reduction in the common case (see :func:`all_finite`); the elements are scanned,
    once, only when the sum is not finite.
    """
    if not inputs.is_floating_point() or bool(torch.isfinite(inputs.sum())):
        return torch.ones(inputs.shape[0], dtype=torch.bool, device=inputs.device)
    finite = torch.isfinite(inputs)
    return finite if finite.dim() == 1 else finite.flatten(1).all(dim=1)


def _lossless_range(dtype: torch.dtype):
    """``(min, max)`` of an integer ``dtype`` as Python ints."""
    info = torch.iinfo(dtype)
    return int(info.min), int(info.max)


def check_storable(record, layout=None, dtypes=None) -> None:
    """Refuse record fields whose cast to an integer storage dtype would change values.

    ``record``: ``{field: (n, ...) tensor}``, on any device. The storage dtype of a field
    is ``layout.fields[field].dtype`` when ``layout`` (a ``RecordLayout``) is given, else
    ``dtypes.get(field)`` (the ``dtypes`` argument of the buffer; fields it does not name
    keep the batch's dtype, which never loses anything). A floating-point field stored
    as an integer dtype (``dtypes={"input": torch.uint8}``) must hold integers in that
    dtype's range (``[0, 255]`` for uint8): casting normalised floats to uint8 would
    silently destroy them. An integer field stored in a narrower integer dtype must fit
    its range. NaN and Inf are left to the ``nonfinite`` policy. ``label`` and ``task``
    (stored as int64) are checked elsewhere. Reads the values (a host sync) only for the
    fields whose cast can lose something: a uint8 batch into uint8 storage costs nothing.
    Raises ``ValueError`` naming the field, before anything is stored.
    """
    for name, value in record.items():
        if name in ("label", "task") or not isinstance(value, torch.Tensor):
            continue
        if layout is not None:
            spec = layout.fields.get(name)
            target = None if spec is None else spec.dtype
        else:
            target = (dtypes or {}).get(name)
        if target is None or target == value.dtype or target.is_floating_point or target == torch.bool:
            continue
        lo, hi = _lossless_range(target)
        if value.is_floating_point():
            finite = torch.isfinite(value)
            bad = finite & ((value != torch.trunc(value)) | (value < lo) | (value > hi))
        elif value.dtype == torch.bool or value.dtype == getattr(torch, "uint64", None):
            continue
        else:
            vlo, vhi = _lossless_range(value.dtype)
            if lo <= vlo and vhi <= hi:
                continue
            bad = (value < lo) | (value > hi)
        if value.numel() and bool(bad.any()):
            example = value[bad].flatten()[0].item()
            why = (f"dtypes[{name!r}]" if name in (dtypes or {})
                   else "like the samples already stored")
            raise ValueError(
                f"record field {name!r} is stored as {str(target).replace('torch.', '')} "
                f"({why}) but the batch holds {str(value.dtype).replace('torch.', '')} "
                f"values that are not integers in [{lo}, {hi}] (e.g. {example!r}): the cast "
                f"would change them. Give the buffer the un-normalised integer batch (e.g. "
                f"uint8 pixels) and convert it in the plugin's transform, or store {name!r} "
                f"in a floating-point dtype")
