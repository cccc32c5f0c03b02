"""Buffer state and cost as Avalanche metrics, so they reach every Avalanche logger.

Each class below is a :class:`~avalanche.evaluation.PluginMetric`: put instances (or the
list returned by :func:`buffer_metrics`) in an ``EvaluationPlugin`` and the values reach
the interactive, text, CSV, TensorBoard or W&B loggers like accuracy does::

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

Global values never need a collective of their own. With
:class:`DistributedReplayPlugin`, every draw already all-gathers the per-class counts of
every shard (on the buffer's own gloo group); the metrics keep the table of the draw in
question (``RehearsalPipeline.last_draw``, a
:class:`~avalanche_distributed_rehearsal.core.DrawRecord`), so the global size and global
per-class counts are exact, identical on every rank, and free. Without per-step draws
(the buffer used through the stock ``ReplayPlugin``), ``post_adapt`` ends with the same
gather, and the metrics read that table (``ShardedRehearsalBuffer.last_table``). Local
metrics never communicate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional

from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metric_utils import get_metric_name

from ..core import DrawRecord, ShardedRehearsalBuffer
from ..core.validation import check_choice
from .storage_policy import DistributedRehearsalBuffer

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate

EVERY = ("iteration", "epoch", "experience")
SCOPES = ("global", "local")

__all__ = ["BufferSize", "BufferClassCounts", "RepresentativesPerStep", "WorkerWaitTime",
           "ExchangedBytes", "buffer_metrics", "find_buffer"]


# ---------------------------------------------------------------------- helpers
def find_buffer(strategy: "SupervisedTemplate") -> Optional[DistributedRehearsalBuffer]:
    """The first plugin ``storage_policy`` of the strategy that is a DistributedRehearsalBuffer."""
    for plugin in getattr(strategy, "plugins", []):
        policy = getattr(plugin, "storage_policy", None)
        if isinstance(policy, DistributedRehearsalBuffer):
            return policy
    return None


class _BufferMetric(PluginMetric):
    """Common plumbing: find the buffer, take values at the configured hook, emit them."""

    base_name = "Buffer"

    def __init__(self, every: str = "experience",
                 buffer: Optional[DistributedRehearsalBuffer] = None):
        super().__init__()
        check_choice("every", every, EVERY)
        if buffer is not None and not isinstance(buffer, DistributedRehearsalBuffer):
            raise TypeError("buffer must be a DistributedRehearsalBuffer or None, got "
                            f"{type(buffer).__name__}")
        self.every = every
        self._fixed_buffer = buffer
        self._value = None

    def __str__(self):
        return self.base_name + self._suffix

    @property
    def _suffix(self) -> str:
        """``_MB`` per step, ``_Epoch`` per epoch, ``_Exp`` per experience (Avalanche style)."""
        return {"iteration": "_MB", "epoch": "_Epoch", "experience": "_Exp"}[self.every]

    # -- state
    def result(self):
        """The last emitted value (a number, or a ``{class: count}`` dict for class counts)."""
        return self._value

    def reset(self) -> None:
        self._value = None

    # -- buffer access
    def _policy(self, strategy) -> Optional[DistributedRehearsalBuffer]:
        return self._fixed_buffer if self._fixed_buffer is not None else find_buffer(strategy)

    def _core(self, strategy) -> Optional[ShardedRehearsalBuffer]:
        policy = self._policy(strategy)
        return None if policy is None else policy.core

    def _record(self, strategy, phase: str) -> Optional[DrawRecord]:
        """The draw whose view of the buffer the values describe (see module docstring):
        after an experience the newest draw (every candidate inserted), otherwise the draw
        of the step that just ran."""
        policy = self._policy(strategy)
        if policy is None or policy.pipeline is None:
            return None
        if phase == "experience":
            return policy.pipeline.newest_draw()
        return policy.pipeline.last_draw

    def _emit(self, strategy, value, suffix: str = "") -> MetricValue:
        name = get_metric_name(self, strategy, add_task=False) + suffix
        return MetricValue(self, name, value, strategy.clock.train_iterations)

    # -- hooks
    def before_training_exp(self, strategy, **kwargs):
        if self.every == "experience":
            self._start_period()

    def before_training_epoch(self, strategy, **kwargs):
        if self.every == "epoch":
            self._start_period()

    def after_training_iteration(self, strategy, **kwargs):
        if self.every == "iteration":
            return self._take(strategy, "iteration")
        self._accumulate(strategy)
        return None

    def after_training_epoch(self, strategy, **kwargs):
        if self.every == "epoch":
            return self._take(strategy, "epoch")
        return None

    def after_training_exp(self, strategy, **kwargs):
        if self.every == "experience":
            return self._take(strategy, "experience")
        return None

    # -- per metric
    def _start_period(self) -> None:
        pass

    def _accumulate(self, strategy) -> None:
        pass

    def _take(self, strategy, phase: str):
        raise NotImplementedError


class _CountsMetric(_BufferMetric):
    def __init__(self, scope: str = "global", every: str = "experience",
                 buffer: Optional[DistributedRehearsalBuffer] = None):
        check_choice("scope", scope, SCOPES)
        super().__init__(every=every, buffer=buffer)
        self.scope = scope

    def _counts(self, strategy, phase: str) -> Optional[Dict[int, int]]:
        """``{class: stored samples}`` for this metric's scope, or None before any storage."""
        record = self._record(strategy, phase)
        if record is not None:
            rank = self._policy(strategy).rank
            return record.class_counts(None if self.scope == "global" else rank)
        core = self._core(strategy)
        policy = self._policy(strategy)
        if core is None or policy is None or policy.pipeline is not None:
            # no buffer yet, or a plugin-driven buffer with no finished draw: nothing sure
            return None
        if self.scope == "local":
            return core.class_counts()  # no pipeline: the core is idle in this thread
        table = core.last_table  # gathered at the end of post_adapt
        return None if table is None else table.class_counts()

    @property
    def base_name(self):
        return f"Buffer_{self.scope.capitalize()}{self.stem}"

    def _take(self, strategy, phase):
        counts = self._counts(strategy, phase)
        return None if counts is None else self._values(strategy, counts)


class BufferSize(_CountsMetric):
    """Samples stored in the buffer: ``scope="global"`` (all shards) or ``"local"`` (this rank).

    Value: ``int``. Name: ``Buffer_GlobalSize_{MB,Exp}`` / ``Buffer_LocalSize_{MB,Exp}``.
    """

    stem = "Size"

    def _values(self, strategy, counts):
        self._value = int(sum(counts.values()))
        return self._emit(strategy, self._value)


class BufferClassCounts(_CountsMetric):
    """Stored samples per class, global or local: one value per class present.

    Values: ``int``, names ``Buffer_GlobalClassCount_{MB,Exp}/.../Class{c}`` (or ``Local``);
    :meth:`result` is the whole ``{class: count}`` dict.
    """

    stem = "ClassCount"

    def _values(self, strategy, counts):
        self._value = dict(sorted(counts.items()))
        return [self._emit(strategy, n, f"/Class{c}") for c, n in self._value.items()]


class _PerStepMetric(_BufferMetric):
    """A per-step quantity: emitted per step, or summarised over the epoch or experience."""

    total = False  # summary is the total (True) or the mean per step (False)

    def _step_values(self, strategy) -> Optional[Dict[str, float]]:
        raise NotImplementedError

    def _start_period(self):
        self._sums: Dict[str, float] = {}
        self._steps = 0

    def _accumulate(self, strategy):
        values = self._step_values(strategy)
        if values is None:
            return
        if not hasattr(self, "_sums"):
            self._start_period()
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._steps += 1

    def _take(self, strategy, phase):
        if phase == "iteration":
            values = self._step_values(strategy)
        else:
            if not getattr(self, "_steps", 0):
                return None
            values = {k: (v if self.total else v / self._steps) for k, v in self._sums.items()}
        if values is None:
            return None
        self._value = values[""] if list(values) == [""] else dict(values)
        return [self._emit(strategy, v, k) for k, v in values.items()]


class RepresentativesPerStep(_PerStepMetric):
    """Representatives appended to the mini-batch at a step (``int`` per step; the mean per
    step over the epoch or experience otherwise). Name ``Buffer_Representatives_{MB,Exp}``."""

    base_name = "Buffer_Representatives"

    def _step_values(self, strategy):
        policy = self._policy(strategy)
        if policy is None or policy.pipeline is None:
            return None
        return {"": policy.pipeline.last_representatives}


class WorkerWaitTime(_PerStepMetric):
    """Seconds the training thread waited for the background worker at a step (``float``;
    the total over the epoch or experience otherwise). Name ``Buffer_WaitSeconds_{MB,Exp}``."""

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
    counts). Two values per step, ``Buffer_ExchangedBytes_{MB,Exp}/.../Sent`` and ``.../Received``
    (``float`` means per step over the epoch or experience otherwise)."""

    base_name = "Buffer_ExchangedBytes"

    def _step_values(self, strategy):
        record = self._record(strategy, "iteration")
        if record is None:
            return None
        s = record.stats
        return {"/Sent": s.payload_sent + s.metadata_sent,
                "/Received": s.payload_received + s.metadata_received}


def buffer_metrics(every: str = "experience", size: bool = True, class_counts: bool = True,
                   representatives: bool = True, wait_time: bool = True,
                   exchanged_bytes: bool = True,
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
    if representatives:
        metrics.append(RepresentativesPerStep(every, buffer))
    if wait_time:
        metrics.append(WorkerWaitTime(every, buffer))
    if exchanged_bytes:
        metrics.append(ExchangedBytes(every, buffer))
    return metrics
