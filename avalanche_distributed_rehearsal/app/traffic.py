"""Bytes the rehearsal buffer moves between ranks, as the buffer counts them.

The buffer's statistics of every step (``ExchangeStats`` in the step's
:class:`~avalanche_distributed_rehearsal.core.DrawRecord`) hold the records and the
metadata a rank sent to and received from the *other* ranks (a rank's records for itself,
e.g. with ``sampling="local"``, are not counted there; the ``Buffer_ExchangedBytes``
metric counts them). :class:`TrafficMeter` sums them over the steps of a run.
"""

from __future__ import annotations

from typing import Dict, Optional

from avalanche.core import SupervisedPlugin

KEYS = {"payload_sent": "payload_to_others", "payload_received": "payload_from_others",
        "metadata_sent": "metadata_to_others", "metadata_received": "metadata_from_others"}


class TrafficMeter(SupervisedPlugin, supports_distributed=True):
    """Counts training steps and the inter-rank bytes of ``replay_plugin``'s buffer.

    Put it after the :class:`~avalanche_distributed_rehearsal.DistributedReplayPlugin` in
    the strategy's plugins (its ``before_training`` creates the buffer, which this one
    then wraps). :meth:`per_step` gives the mean bytes per training step.
    """

    def __init__(self, replay_plugin):
        super().__init__()
        self.replay_plugin = replay_plugin
        self.counts: Dict[str, int] = dict.fromkeys(KEYS, 0)
        self.steps = 0

    def after_training_iteration(self, strategy, **kwargs):
        self.steps += 1
        pipeline = self.replay_plugin.storage_policy.pipeline
        record = None if pipeline is None else pipeline.last_draw
        if record is not None:
            for name, field in KEYS.items():
                self.counts[name] += getattr(record.stats, field)

    def per_step(self) -> Optional[Dict[str, float]]:
        """Mean bytes per training step this rank sent to / received from other ranks:
        ``payload_sent``, ``payload_received``, ``metadata_sent``, ``metadata_received``,
        and ``steps``. None before any step."""
        if not self.steps:
            return None
        out = {k: v / self.steps for k, v in self.counts.items()}
        out["steps"] = self.steps
        return out
