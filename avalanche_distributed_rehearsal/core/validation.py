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


def storage_cast_error(name: str, value: torch.Tensor, dtype: torch.dtype) -> Optional[ValueError]:
    """The ValueError when casting ``value`` to the integer storage ``dtype`` would change
    it (a float that is not an integer, or a value outside the dtype's range: e.g.
    normalised floats stored as uint8), else None. Floating-point storage never errs
    (narrower floats are clamped to their range on the way in)."""
    if dtype.is_floating_point or value.numel() == 0 or value.dtype == dtype:
        return None
    info = torch.iinfo(dtype)
    if value.is_floating_point():
        lo, hi = float(value.min()), float(value.max())
        integral = bool((value == value.round()).all())
    else:
        if torch.iinfo(value.dtype).min >= info.min and torch.iinfo(value.dtype).max <= info.max:
            return None
        lo, hi, integral = int(value.min()), int(value.max()), True
    if integral and lo >= info.min and hi <= info.max:
        return None
    kind = "integers" if integral else "non-integer values"
    return ValueError(f"field {name!r} holds {kind} in [{lo}, {hi}], which its storage dtype "
                      f"{str(dtype).replace('torch.', '')} cannot hold (range [{info.min}, "
                      f"{info.max}]); store such a field in a floating-point dtype, or give "
                      "integer values in range (e.g. raw uint8 images before normalisation)")


def check_storage_values(record, layout) -> Optional[ValueError]:
    """:func:`storage_cast_error` of the first field of ``record`` (a mapping of field
    names to tensors) that ``layout`` stores in an integer dtype it does not fit."""
    for name, spec in layout.fields.items():
        value = record.get(name)
        if value is None or name in ("label", "task"):
            continue
        error = storage_cast_error(name, value, spec.dtype)
        if error is not None:
            return error
    return None


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
