"""Bytes the rehearsal buffer moves between ranks, measured at its collectives.

The buffer's own statistics (``ExchangeStats``, the ``Buffer_ExchangedBytes`` metric)
count every representative a rank serves, its own included: with ``sampling="local"``
a rank "sends" its records to itself. The study needs the traffic between ranks, so
:class:`TrafficMeter` wraps the buffer's exchange object (``core.exchange``: the
collectives it makes, see :mod:`avalanche_distributed_rehearsal.core.exchange`) in a
:class:`CountingExchange` that counts, per call, only the bytes that cross to or from
other ranks. Nothing else changes: every call is forwarded unchanged.
"""

from __future__ import annotations

import math
import threading
from typing import Dict, Optional

from avalanche.core import SupervisedPlugin


class CountingExchange:
    """Forwards every call to ``inner``; counts the bytes exchanged with other ranks.

    * payload (``all_to_all``): ``send`` is ``(rows, row_bytes)`` uint8 split by
      destination rank; sent = rows for other ranks x row bytes, received = rows from
      other ranks x row bytes (a rank's rows to itself are not counted);
    * metadata (``all_gather``): sent = the tensor's bytes (one contribution, as the
      buffer's own statistics count it), received = the ``world - 1`` other ranks'
      contributions. With one rank nothing is counted.

    The rare calls outside the per-step draw (``all_gather_object`` when the ranks first
    agree on the sample layout, ``all_reduce_sum``, ``barrier``) are forwarded uncounted.

    Counters are plain ints updated by the buffer's worker thread under a lock.
    """

    def __init__(self, inner):
        self._inner = inner
        self._lock = threading.Lock()
        self.counts: Dict[str, int] = {"payload_sent": 0, "payload_received": 0,
                                       "metadata_sent": 0, "metadata_received": 0,
                                       "payload_calls": 0, "metadata_calls": 0}

    def __getattr__(self, name):  # rank, world_size, device_payload, timeout, groups, ...
        return getattr(self._inner, name)

    def _add(self, **values: int) -> None:
        with self._lock:
            for k, v in values.items():
                self.counts[k] += int(v)

    def all_gather(self, tensor):
        out = self._inner.all_gather(tensor)
        world = int(getattr(self._inner, "world_size", 1))
        if world > 1:
            nbytes = tensor.numel() * tensor.element_size()
            self._add(metadata_sent=nbytes, metadata_received=(world - 1) * nbytes,
                      metadata_calls=1)
        return out

    def all_to_all(self, send, send_splits, recv_splits, out=None):
        recv = self._inner.all_to_all(send, send_splits, recv_splits, out=out)
        world = int(getattr(self._inner, "world_size", 1))
        if world > 1:
            rank = int(self._inner.rank)
            row = math.prod(send.shape[1:]) * send.element_size()
            self._add(payload_sent=(sum(send_splits) - send_splits[rank]) * row,
                      payload_received=(sum(recv_splits) - recv_splits[rank]) * row,
                      payload_calls=1)
        return recv


class TrafficMeter(SupervisedPlugin, supports_distributed=True):
    """Counts training steps and the inter-rank bytes of ``replay_plugin``'s buffer.

    Put it after the :class:`~avalanche_distributed_rehearsal.DistributedReplayPlugin` in
    the strategy's plugins (its ``before_training`` creates the buffer, which this one
    then wraps). :meth:`per_step` gives the mean bytes per training step.
    """

    def __init__(self, replay_plugin):
        super().__init__()
        self.replay_plugin = replay_plugin
        self.exchange: Optional[CountingExchange] = None
        self.steps = 0

    def before_training(self, strategy, **kwargs):
        core = getattr(self.replay_plugin.storage_policy, "core", None)
        if self.exchange is None and core is not None and hasattr(core, "exchange"):
            self.exchange = CountingExchange(core.exchange)
            core.exchange = self.exchange

    def after_training_iteration(self, strategy, **kwargs):
        self.steps += 1

    def per_step(self) -> Optional[Dict[str, float]]:
        """Mean bytes per training step this rank sent to / received from other ranks:
        ``payload_sent``, ``payload_received``, ``metadata_sent``, ``metadata_received``,
        and ``steps``. None if the buffer could not be wrapped."""
        if self.exchange is None:
            return None
        steps = max(1, self.steps)
        out = {k: v / steps for k, v in self.exchange.counts.items() if not k.endswith("_calls")}
        out["steps"] = self.steps
        return out
