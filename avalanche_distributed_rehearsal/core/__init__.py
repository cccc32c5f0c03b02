"""The torch-only core: shard storage, insertion, global sampling, exchange, worker.

Nothing here imports Avalanche, so the core can be used, tested and benchmarked alone.
"""

from .buffer import DrawRecord, ExchangeStats, PreparedDraw, ShardedRehearsalBuffer, split_budget
from .exchange import (LocalExchange, ProcessGroupExchange, default_exchange,
                       process_group_timeout, serves)
from .layout import RecordLayout
from .metadata import ClassTable, OutOfStepError, StepContext
from .pipeline import RehearsalPipeline
from .quotas import ClassBudget, QuotaPlanner, deal_quotas
from .reservoir import ClassBalancedReservoir
from .sampling import SAMPLING_MODES, SamplingPlan, plan_draws, sample_distinct
from .storage import ShardStorage
from .worker import BackgroundWorker, WorkerTimeoutError

__all__ = [
    "BackgroundWorker", "ClassBalancedReservoir", "ClassBudget", "ClassTable", "DrawRecord",
    "ExchangeStats", "LocalExchange", "OutOfStepError", "PreparedDraw", "ProcessGroupExchange",
    "QuotaPlanner", "RecordLayout", "RehearsalPipeline", "SAMPLING_MODES", "SamplingPlan",
    "ShardStorage", "ShardedRehearsalBuffer", "StepContext", "WorkerTimeoutError",
    "deal_quotas", "default_exchange", "plan_draws", "process_group_timeout",
    "sample_distinct", "serves", "split_budget",
]
