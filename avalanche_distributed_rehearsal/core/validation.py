"""Argument checks shared by the core and the integration layer.

Each check raises before anything is modified, with the argument's name and the form
that was expected.
"""

from __future__ import annotations

from typing import Optional

import torch

_INT_DTYPES = tuple(d for d in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                                getattr(torch, "uint16", None), getattr(torch, "uint32", None),
                                getattr(torch, "uint64", None)) if d is not None)
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


def check_batch(inputs, labels, task_labels: Optional[torch.Tensor]) -> None:
    """Structural checks of a batch; no value is read, so no device synchronisation.

    Expected: ``inputs`` a tensor ``(n, *sample_shape)`` with ``n >= 1``; ``labels`` and
    ``task_labels`` integer tensors of shape ``(n,)`` on any device.
    """
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor of shape (n, ...), got {type(inputs).__name__}")
    if inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch (n >= 1, ...), got shape {tuple(inputs.shape)}")
    if inputs.dtype == torch.bool or inputs.is_complex():
        raise TypeError(f"inputs dtype {inputs.dtype} is not supported (use a real or integer dtype)")
    n = inputs.shape[0]
    for name, t in (("labels", labels), ("task_labels", task_labels)):
        if t is None and name == "task_labels":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be an integer torch.Tensor of shape ({n},), got {type(t).__name__}")
        if t.dtype not in _INT_DTYPES:
            raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
        if tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},) to match inputs, got {tuple(t.shape)}")


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


def check_label_values(labels: torch.Tensor, task_labels: torch.Tensor) -> None:
    """Value checks of CPU int64 tensors (reads them: call off the hot path).

    Labels may be any int64 >= 0 (sparse or huge labels cost nothing extra: the buffer's
    metadata grows with the classes present, not with the largest label).
    """
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be non-negative class indices in [0, 2**63 - 1], got "
                         f"min {int(labels.min())}")
    if task_labels.numel() and int(task_labels.min()) < 0:
        raise ValueError(f"task_labels must be non-negative, got min {int(task_labels.min())}")


def all_finite(inputs: torch.Tensor) -> bool:
    """True when ``inputs`` holds no NaN or Inf; one reduction (and one host sync) in the
    common case.

    A sum with a NaN or Inf term is never finite (NaN and Inf propagate through additions),
    so a finite sum proves every element finite. A sum that is not finite proves nothing
    (finite values may overflow to Inf), so then every element is checked: exact always.
    """
    if not inputs.is_floating_point() or inputs.numel() == 0:
        return True
    if bool(torch.isfinite(inputs.sum())):
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
