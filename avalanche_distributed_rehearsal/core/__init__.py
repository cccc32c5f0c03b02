"""The torch-only core: shard storage, insertion, global sampling, exchange, worker.

Nothing here imports Avalanche, so the core can be used, tested and benchmarked alone.
"""

from .buffer import ShardedRehearsalBuffer, split_budget
from .draw import DrawRecord, ExchangeStats, PreparedDraw
from .exchange import (LocalExchange, ProcessGroupExchange, default_exchange,
                       process_group_timeout, serves)
from .layout import RecordLayout
from .ledger import ClassLedger, CountsSnapshot
from .ledgers import make_ledger
from .metadata import OutOfStepError, PeerError, StepContext
from .pipeline import RehearsalPipeline
from .quotas import ClassBudget
from .records import INSERTION_POLICIES, InsertionKeys, as_record, check_record, layout_for
from .reservoir import LocalReservoir
from .sampling import (SAMPLING_MODES, ClassBalancedSampler, Eligible, LocalSampler, Sampler,
                       SamplingPlan, UniformSampler, make_sampler, plan_draws, sample_distinct)
from .small_ledger import SmallLedger
from .storage import ShardStorage
from .worker import BackgroundWorker, WorkerTimeoutError

__all__ = [
    "BackgroundWorker", "ClassBalancedSampler", "ClassBudget", "ClassLedger", "CountsSnapshot",
    "DrawRecord", "Eligible", "ExchangeStats", "INSERTION_POLICIES", "InsertionKeys",
    "LocalExchange", "LocalReservoir", "LocalSampler", "OutOfStepError", "PeerError",
    "PreparedDraw", "ProcessGroupExchange", "RecordLayout", "RehearsalPipeline",
    "SAMPLING_MODES", "Sampler", "SamplingPlan", "ShardStorage", "ShardedRehearsalBuffer",
    "SmallLedger", "StepContext", "UniformSampler", "WorkerTimeoutError", "as_record",
    "check_record", "default_exchange", "layout_for", "make_ledger", "make_sampler",
    "plan_draws", "process_group_timeout", "sample_distinct", "serves", "split_budget",
]
