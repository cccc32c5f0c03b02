"""The torch-only core: shard storage, insertion, global sampling, exchange, worker.

Nothing here imports Avalanche, so the core can be used, tested and benchmarked alone.
"""

from .buffer import DrawRecord, ExchangeStats, ShardedRehearsalBuffer, split_budget
from .exchange import LocalExchange, ProcessGroupExchange, default_exchange
from .layout import RecordLayout
from .pipeline import RehearsalPipeline
from .reservoir import ClassBalancedReservoir
from .sampling import SAMPLING_MODES, SamplingPlan, plan_draws, sample_distinct
from .storage import ShardStorage
from .worker import BackgroundWorker, WorkerTimeoutError

__all__ = [
    "BackgroundWorker", "ClassBalancedReservoir", "DrawRecord", "ExchangeStats", "LocalExchange",
    "ProcessGroupExchange", "RecordLayout", "RehearsalPipeline", "SAMPLING_MODES",
    "SamplingPlan", "ShardStorage", "ShardedRehearsalBuffer", "WorkerTimeoutError",
    "default_exchange", "plan_draws", "sample_distinct", "split_budget",
]
