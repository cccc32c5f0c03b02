"""Buffer state and cost as Avalanche metrics, so they reach every Avalanche logger.

Each class below is an Avalanche ``GenericPluginMetric`` over a standalone ``Metric`` (a
latest value, a per-step mean or a per-step total), the way Avalanche's own timing
metrics are built: put instances (or the list returned by :func:`buffer_metrics`) in an
``EvaluationPlugin`` and the values reach the interactive, text, CSV, TensorBoard or W&B
loggers like accuracy does::

    evaluator = EvaluationPlugin(accuracy_metrics(experience=True),
                                 *buffer_metrics(every="experience"),
                                 loggers=[InteractiveLogger()])

The metrics find the :class:`DistributedRehearsalBuffer` among the strategy's plugins
(any plugin with a ``storage_policy`` of that type: :class:`DistributedReplayPlugin`, or
Avalanche's stock ``ReplayPlugin(storage_policy=DistributedRehearsalBuffer(...))``), or
use the one passed as ``buffer=``.

When the values are taken (``every``):

* ``"iteration"``: at ``after_training_iteration``, one value per training step
  (x axis: ``strategy.clock.train_iterations``; names end in ``_MB``). Sizes and class counts describe the
  buffer the step's representatives were drawn from (after the previous step's
  candidates were inserted).
* ``"epoch"``: at ``after_training_epoch`` (names end in ``_Epoch``): sizes and counts as
  for the epoch's last step; per-step quantities summarised over the epoch. This is the
  granularity Avalanche's text and interactive loggers print during training.
* ``"experience"``: at ``after_training_exp``, once per experience (names end in ``_Exp``). Sizes and counts
  describe the buffer after every candidate of the experience was inserted; per-step
  quantities are summarised (mean per step; the wait time is the experience's total).

Global values never need a collective of their own: every rank holds the replicated
ledger of every shard's per-class counts (``ShardedRehearsalBuffer.ledger``), updated at
every step from the metadata the step's one collective carries. Per-step values describe
the draw of the step (``RehearsalPipeline.last_draw``, a
:class:`~avalanche_distributed_rehearsal.core.DrawRecord`: the counts its plan saw);
per-experience values the buffer after every candidate of the experience was inserted
(the ledger, after waiting for the job in flight), with the plugin as with the stock
``ReplayPlugin``. They are exact, identical on every rank, and free. Local metrics never
communicate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional

from avalanche.evaluation import GenericPluginMetric, Metric, PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metric_utils import get_metric_name

from ..core import DrawRecord
from ..core.validation import check_choice
from .storage_policy import DistributedRehearsalBuffer

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate

EVERY = ("iteration", "epoch", "experience")
SCOPES = ("global", "local")
_SUFFIX = {"iteration": "_MB", "epoch": "_Epoch", "experience": "_Exp"}

__all__ = ["BufferSize", "BufferClassCounts", "BytesPerSample", "RepresentativesPerStep",
           "WorkerWaitTime", "ExchangedBytes", "buffer_metrics", "find_buffer"]


def find_buffer(strategy: "SupervisedTemplate") -> Optional[DistributedRehearsalBuffer]:
    """The first plugin ``storage_policy`` of the strategy that is a DistributedRehearsalBuffer."""
    for plugin in getattr(strategy, "plugins", []):
        policy = getattr(plugin, "storage_policy", None)
        if isinstance(policy, DistributedRehearsalBuffer):
            return policy
    return None


# ---------------------------------------------------------------------- standalone metrics
class LatestValue(Metric):
    """The last value given to :meth:`update` (a number or a dict), None after a reset."""

    def __init__(self):
        self._value = None

    def update(self, value) -> None:
        self._value = value

    def result(self):
        return self._value

    def reset(self) -> None:
        self._value = None


class PerStepSummary(Metric):
    """Per-step values (dicts of numbers) summed over the steps since the last reset; the
    result is the mean per step (``total=False``) or the sum, per key (None before any)."""

    def __init__(self, total: bool = False):
        self.total = total
        self._sums: Dict[str, float] = {}
        self._steps = 0

    def update(self, values: Dict[str, float]) -> None:
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._steps += 1

    def result(self):
        if not self._steps:
            return None
        return {k: (v if self.total else v / self._steps) for k, v in self._sums.items()}

    def reset(self) -> None:
        self._sums, self._steps = {}, 0


# ---------------------------------------------------------------------- plugin metrics
class _BufferMetric(GenericPluginMetric):
    """Common plumbing: find the buffer, read the draw of the period, name the values.

    ``every`` is both the reset and the emit period (training only). Names are
    ``<base_name>_<MB|Epoch|Exp>/<phase>/<stream>`` plus a per-value suffix.
    """

    base_name = "Buffer"

    def __init__(self, metric: Metric, every: str = "experience",
                 buffer: Optional[DistributedRehearsalBuffer] = None):
        check_choice("every", every, EVERY)
        if buffer is not None and not isinstance(buffer, DistributedRehearsalBuffer):
            raise TypeError("buffer must be a DistributedRehearsalBuffer or None, got "
                            f"{type(buffer).__name__}")
        super().__init__(metric, reset_at=every, emit_at=every, mode="train")
        self.every = every
        self._fixed_buffer = buffer

    def __str__(self):
        return self.base_name + _SUFFIX[self.every]

    def _policy(self, strategy) -> Optional[DistributedRehearsalBuffer]:
        return self._fixed_buffer if self._fixed_buffer is not None else find_buffer(strategy)

    def _record(self, strategy, newest: bool = False) -> Optional[DrawRecord]:
        """The draw of the step that just ran, or (``newest``: after an experience, every
        candidate inserted) the newest draw."""
        policy = self._policy(strategy)
        if policy is None or policy.pipeline is None:
            return None
        return policy.pipeline.newest_draw() if newest else policy.pipeline.last_draw

    def _package_result(self, strategy) -> Optional[List[MetricValue]]:
        value = self.result()
        if value is None:
            return None
        name = get_metric_name(self, strategy, add_task=False)
        x = strategy.clock.train_iterations
        if isinstance(value, dict):
            return [MetricValue(self, name + self._key_suffix(k), v, x) for k, v in value.items()]
        return [MetricValue(self, name, value, x)]

    @staticmethod
    def _key_suffix(key) -> str:
        """The name suffix of a dict value's ``key``."""
        return str(key)


class _SnapshotMetric(_BufferMetric):
    """A state of the buffer (sizes, counts): the draw of the period's last step; after an
    experience, the newest draw (every candidate of the experience inserted)."""

    def __init__(self, every: str = "experience",
                 buffer: Optional[DistributedRehearsalBuffer] = None):
        super().__init__(LatestValue(), every, buffer)

    def update(self, strategy) -> None:
        value = self._value(strategy, newest=False)
        if value is not None:
            self._metric.update(value)

    def after_training_exp(self, strategy):
        if self.every == "experience":
            value = self._value(strategy, newest=True)
            if value is not None:
                self._metric.update(value)
        return super().after_training_exp(strategy)

    def _value(self, strategy, newest: bool):
        raise NotImplementedError


class _CountsMetric(_SnapshotMetric):
    def __init__(self, scope: str = "global", every: str = "experience",
                 buffer: Optional[DistributedRehearsalBuffer] = None):
        check_choice("scope", scope, SCOPES)
        super().__init__(every, buffer)
        self.scope = scope

    @property
    def base_name(self):
        return f"Buffer_{self.scope.capitalize()}{self.stem}"

    def _counts(self, strategy, newest: bool) -> Optional[Dict[int, int]]:
        """``{class: stored samples}`` for this metric's scope, or None before any storage."""
        policy = self._policy(strategy)
        if policy is None:
            return None
        rank = None if self.scope == "global" else policy.rank
        if not newest and policy.pipeline is not None:
            record = self._record(strategy)
            return None if record is None else record.class_counts(rank)
        core = policy.core  # waits for the job in flight: every candidate inserted
        if core is None:
            return None
        return core.ledger.class_counts(rank)  # every rank holds every shard's counts


class BufferSize(_CountsMetric):
    """Samples stored in the buffer: ``scope="global"`` (all shards) or ``"local"`` (this rank).

    Value: ``int``. Name: ``Buffer_GlobalSize_{MB,Epoch,Exp}`` / ``Buffer_LocalSize_...``.
    """

    stem = "Size"

    def _value(self, strategy, newest):
        counts = self._counts(strategy, newest)
        return None if counts is None else int(sum(counts.values()))


class BufferClassCounts(_CountsMetric):
    """Stored samples per class, global or local: one value per class present.

    Values: ``int``, names ``Buffer_GlobalClassCount_{MB,Epoch,Exp}/.../Class{c}`` (or
    ``Local``); :meth:`result` is the whole ``{class: count}`` dict.
    """

    stem = "ClassCount"

    def _value(self, strategy, newest):
        counts = self._counts(strategy, newest)
        return None if counts is None else dict(sorted(counts.items()))

    @staticmethod
    def _key_suffix(key) -> str:
        return f"/Class{key}"


class BytesPerSample(_SnapshotMetric):
    """Bytes one stored record takes (every field, in its storage dtype, 8-byte aligned):
    float16 logits or uint8 images make it smaller for the same budget. Value ``int``,
    name ``Buffer_BytesPerSample_{MB,Epoch,Exp}``."""

    base_name = "Buffer_BytesPerSample"

    def _value(self, strategy, newest):
        record = self._record(strategy, newest)
        if record is not None and record.row_bytes:
            return record.row_bytes
        policy = self._policy(strategy)
        core = policy.core if policy is not None and policy.pipeline is None else None
        return core.bytes_per_sample if core is not None and core.bytes_per_sample else None


class _PerStepMetric(_BufferMetric):
    """A per-step quantity: emitted per step, or summarised over the epoch or experience
    (mean per step, or total with ``total = True``)."""

    total = False

    def __init__(self, every: str = "experience",
                 buffer: Optional[DistributedRehearsalBuffer] = None):
        super().__init__(PerStepSummary(total=self.total), every, buffer)

    def update(self, strategy) -> None:
        values = self._step_values(strategy)
        if values is not None:
            self._metric.update(values)

    def result(self):
        values = self._metric.result()
        if values is not None and list(values) == [""]:
            return values[""]
        return values

    def _step_values(self, strategy) -> Optional[Dict[str, float]]:
        raise NotImplementedError


class RepresentativesPerStep(_PerStepMetric):
    """Representatives appended to the mini-batch at a step (``int`` per step; the mean
    per step over the epoch or experience otherwise). Name ``Buffer_Representatives_...``."""

    base_name = "Buffer_Representatives"

    def _step_values(self, strategy):
        policy = self._policy(strategy)
        if policy is None or policy.pipeline is None:
            return None
        return {"": policy.pipeline.last_representatives}


class WorkerWaitTime(_PerStepMetric):
    """Seconds the training thread waited for the background worker at a step (``float``;
    the total over the epoch or experience otherwise). Name ``Buffer_WaitSeconds_...``."""

    total = True
    base_name = "Buffer_WaitSeconds"

    def _step_values(self, strategy):
        policy = self._policy(strategy)
        if policy is None or policy.pipeline is None:
            return None
        return {"": float(policy.pipeline.wait_seconds)}


class ExchangedBytes(_PerStepMetric):
    """Bytes this rank sent and received for a step's representatives: the payload (the
    representatives' records, all-to-all) plus the metadata (the all-gathered per-class
    counts). Two values per step, ``Buffer_ExchangedBytes_.../Sent`` and ``.../Received``
    (means per step over the epoch or experience otherwise)."""

    base_name = "Buffer_ExchangedBytes"

    def _step_values(self, strategy):
        record = self._record(strategy)
        if record is None:
            return None
        s = record.stats
        return {"/Sent": s.payload_sent + s.metadata_sent,
                "/Received": s.payload_received + s.metadata_received}


def buffer_metrics(every: str = "experience", size: bool = True, class_counts: bool = True,
                   representatives: bool = True, wait_time: bool = True,
                   exchanged_bytes: bool = True, bytes_per_sample: bool = True,
                   buffer: Optional[DistributedRehearsalBuffer] = None) -> List[PluginMetric]:
    """The buffer metrics, ready for ``EvaluationPlugin(*buffer_metrics(...))``.

    ``size`` and ``class_counts`` give a global and a local metric each.
    """
    check_choice("every", every, EVERY)
    metrics: List[PluginMetric] = []
    if size:
        metrics += [BufferSize("global", every, buffer), BufferSize("local", every, buffer)]
    if class_counts:
        metrics += [BufferClassCounts("global", every, buffer),
                    BufferClassCounts("local", every, buffer)]
    if bytes_per_sample:
        metrics.append(BytesPerSample(every, buffer))
    if representatives:
        metrics.append(RepresentativesPerStep(every, buffer))
    if wait_time:
        metrics.append(WorkerWaitTime(every, buffer))
    if exchanged_bytes:
        metrics.append(ExchangedBytes(every, buffer))
    return metrics
