"""Records: a stored sample is a mapping of named tensors.

A *record batch* is a ``Mapping[str, Tensor]`` whose tensors share their first dimension
``n`` (one row per sample): for example ``{"input": (n, 3, 32, 32) float32, "label": (n,)
int64, "task": (n,) int64}``, plus any field a method needs (``"logits"`` ``(n, C)`` for Dark
Experience Replay, a second input, a float regression target).

Reserved names: ``"label"`` holds the targets (integer class labels ``(n,)`` steer the
class-balanced insertion and sampling; other targets select the plain reservoir) and
``"task"`` holds integer task labels ``(n,)``. Every other name is free.

The first record batch fixes the layout (:func:`layout_for`): the set of fields, each
field's per-sample shape, and its *storage* dtype (the batch's dtype unless ``dtypes``
overrides it, e.g. logits kept as float16: the same budget then holds the same samples in
fewer bytes). Later batches must match the field set and shapes; their values are cast to
the storage dtypes on the way in. Drawn records come back in the storage dtypes.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional

import torch

from .layout import RecordLayout

LABEL, TASK, INPUT = "label", "task", "input"
INSERTION_POLICIES = ("auto", "class_balanced", "reservoir")


def _class_label_kind(sample_shape: tuple, dtype: torch.dtype) -> bool:
    """Whether per-sample ``sample_shape`` and ``dtype`` are those of a class label: one
    integer per sample."""
    return (sample_shape == () and not dtype.is_floating_point and not dtype.is_complex
            and dtype != torch.bool)


def is_class_labels(values: Optional[torch.Tensor]) -> bool:
    """Whether ``values`` are class labels: an integer tensor of shape ``(n,)``."""
    return values is not None and values.dim() == 1 and _class_label_kind((), values.dtype)


def as_record(inputs, labels=None, task_labels=None, extra: Optional[Mapping] = None
              ) -> Dict[str, torch.Tensor]:
    """The record of the ``(inputs, labels, task_labels)`` calling convention.

    ``inputs`` may already be a record mapping (returned as a dict, ``labels`` and
    ``task_labels`` must then be None). With labels and no task labels, the task field is
    all zeros, as it always was.
    """
    if isinstance(inputs, Mapping):
        if labels is not None or task_labels is not None:
            raise TypeError("pass either a record mapping or (inputs, labels, task_labels), not both")
        return dict(inputs, **(extra or {}))
    record = {INPUT: inputs}
    if labels is not None:
        record[LABEL] = labels
        if task_labels is None and isinstance(labels, torch.Tensor) and labels.dim() >= 1:
            task_labels = torch.zeros(labels.shape[0], dtype=torch.int64, device=labels.device)
    if task_labels is not None:
        record[TASK] = task_labels
    record.update(extra or {})
    return record


def check_record(record, layout: Optional[RecordLayout] = None, missing: Iterable[str] = ()) -> int:
    """Structural checks of a record batch; reads no tensor value (no device sync).

    Returns ``n``, the number of rows. Expected: a non-empty mapping of field names to
    tensors of shape ``(n, ...)`` with the same ``n >= 1``, real or integer dtypes;
    ``"task"``, if present, integer ``(n,)``; the fields, per-sample shapes and dtype
    kinds of ``layout`` when one is given, except the fields named in ``missing`` (to be
    added later, e.g. the model's outputs, which exist only after the forward pass). A
    floating-point field other than ``label``/``task`` may go into integer storage (e.g.
    ``dtypes={"input": torch.uint8}``): its values are checked at insertion
    (:func:`~.validation.check_storable`).
    """
    if not record or not (type(record) is dict or isinstance(record, Mapping)):
        raise TypeError(f"a record batch must be a non-empty mapping of field names to tensors, "
                        f"got {type(record).__name__}")
    n = None
    for name, value in record.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"record field names must be non-empty strings, got {name!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"record field {name!r} must be a torch.Tensor of shape (n, ...), "
                            f"got {type(value).__name__}")
        if value.dim() < 1 or value.shape[0] == 0:
            raise ValueError(f"record field {name!r} must be a non-empty batch (n >= 1, ...), "
                             f"got shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"record field {name!r}: dtype {value.dtype} is not supported "
                            "(use a real or integer dtype)")
        if n is None:
            n = value.shape[0]
        elif value.shape[0] != n:
            raise ValueError(f"record fields must share their first dimension: {name!r} has "
                             f"{value.shape[0]} rows, another field {n}")
    task = record.get(TASK)
    if task is not None and not is_class_labels(task):
        raise TypeError(f"record field 'task' must be integer task labels of shape ({n},), got "
                        f"{task.dtype} {tuple(task.shape)}")
    if layout is not None:
        expected = set(layout.fields) - set(missing)
        if set(record) != expected:
            raise ValueError(f"record fields {sorted(record)} differ from the stored fields "
                             f"{sorted(expected)}")
        for name, spec in layout.fields.items():
            if name not in record:
                continue
            value = record[name]
            if tuple(value.shape[1:]) != spec.shape:
                raise ValueError(f"record field {name!r} must have per-sample shape {spec.shape} "
                                 f"like the samples already stored, got {tuple(value.shape[1:])}")
            exact_cast = (value.is_floating_point() and not spec.dtype.is_floating_point
                          and name not in (LABEL, TASK))  # checked at insertion (check_storable)
            if value.is_floating_point() != spec.dtype.is_floating_point and not exact_cast:
                raise ValueError(f"record field {name!r} must be "
                                 f"{'floating point' if spec.dtype.is_floating_point else 'integer'} "
                                 f"like the samples already stored ({spec.dtype}), got {value.dtype}")
    return n


def layout_for(record: Mapping[str, torch.Tensor],
               dtypes: Optional[Mapping[str, torch.dtype]] = None) -> RecordLayout:
    """The layout of ``record``: fields in name order (the same on every rank), each with
    its per-sample shape and its storage dtype (``dtypes[name]``, else the batch's).
    Class and task labels are stored as int64."""
    dtypes = dict(dtypes or {})
    fields = []
    for name in sorted(record):
        value = record[name]
        dtype = dtypes.get(name, value.dtype)
        if name == TASK or (name == LABEL and is_class_labels(value)):
            dtype = torch.int64
        fields.append((name, tuple(value.shape[1:]), dtype))
    return RecordLayout(fields)


def check_dtypes(dtypes: Optional[Mapping[str, torch.dtype]]) -> Dict[str, torch.dtype]:
    """Validate a ``{field: storage dtype}`` mapping; return it as a dict."""
    out = {}
    for name, dtype in (dtypes or {}).items():
        if not isinstance(name, str) or not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtypes must map field names to torch dtypes, got {name!r}: {dtype!r}")
        if dtype == torch.bool or dtype.is_complex:
            raise TypeError(f"dtypes[{name!r}]: {dtype} is not supported")
        if name in (LABEL, TASK) and dtype != torch.int64 and not dtype.is_floating_point:
            raise ValueError(f"dtypes[{name!r}]: class and task labels are stored as int64")
        out[name] = dtype
    return out


class InsertionKeys:
    """How a record batch maps to the reservoir's class keys (the insertion policy).

    ``"class_balanced"``: the integer class labels of the ``label`` field (a class-balanced
    reservoir with global per-class quotas). ``"reservoir"``: every sample gets key 0, so
    the same reservoir is a plain reservoir over the whole stream (every sample seen is
    kept with equal probability) for targets that are not class labels. ``"auto"`` picks
    ``class_balanced`` when the first batch's ``label`` field holds class labels, else
    ``reservoir``.
    """

    def __init__(self, policy: str = "auto"):
        if policy not in INSERTION_POLICIES:
            raise ValueError(f"insertion must be one of {INSERTION_POLICIES}, got {policy!r}")
        self.requested = policy
        self.policy: Optional[str] = None if policy == "auto" else policy

    @property
    def by_class(self) -> bool:
        """True once the keys are class labels (False for the plain reservoir or undecided)."""
        return self.policy == "class_balanced"

    def decide(self, record: Mapping[str, torch.Tensor]) -> None:
        """Fix the policy from the first batch (or check it fits an explicit choice)."""
        labels = record.get(LABEL)
        if self.policy is None:
            self.policy = "class_balanced" if is_class_labels(labels) else "reservoir"
        elif self.policy == "class_balanced" and not is_class_labels(labels):
            raise ValueError("insertion='class_balanced' needs a 'label' field of integer class "
                             "labels of shape (n,); use insertion='reservoir' (or 'auto') for "
                             "other targets")

    def decide_from_layout(self, layout: RecordLayout) -> None:
        """Fix an ``"auto"`` policy from a layout learnt from another rank (no batch seen
        here yet): the same rule as :meth:`decide`, read from the stored ``label`` field."""
        if self.policy is None:
            label = layout.fields.get(LABEL)
            by_class = label is not None and _class_label_kind(tuple(label.shape), label.dtype)
            self.policy = "class_balanced" if by_class else "reservoir"

    def keys(self, labels_cpu: Optional[torch.Tensor], n: int) -> list:
        """The ``n`` keys of a batch whose class labels (CPU int64) are ``labels_cpu``."""
        return labels_cpu.tolist() if self.by_class else [0] * n
