"""One rank's shard of the global rehearsal buffer: insert locally, sample globally.

:class:`ShardedRehearsalBuffer` composes small parts, each in its own module:

* storage (:mod:`.storage`): preallocated fixed-width records, lazily shaped;
* the replicated per-class ledger (:mod:`.ledger`, quotas from :mod:`.deal`) and this
  rank's slots (:mod:`.reservoir`): insertion;
* sampling (:mod:`.sampling`): a :class:`~.sampling.Sampler` plans every rank's draws;
* the step's metadata and its checks (:mod:`.metadata`);
* the data side of a step (:mod:`.draw`) and every collective (:mod:`.exchange`);
* elastic loading (:mod:`.elastic`).

**A step** (:meth:`ShardedRehearsalBuffer.step`) draws ``r`` representatives for every
rank and inserts this rank's candidates, as one straight sequence of stages:

1. *candidates*: value checks of this rank's candidate rows, their class keys;
2. *plan*: every rank's draws, from the replicated ledger (before this step's insertion)
   and a generator seeded by ``(seed, step)``;
3. *serve*: gather the records this rank sends;
4. *exchange*: one collective carrying every rank's metadata (header and candidate keys)
   and the records;
5. *agree*: check every rank's header (position, configuration, exclusion, layout, ledger);
6. *insert*: every rank applies every rank's keys to the ledger (the same counts on every
   rank), this rank writes its candidates into the slots it decided;
7. *assemble*: the received records in draw order, on the caller's device.

The exchange's sizes depend only on state every rank verified at an earlier exchange
(the ledger, the configuration, the step, the excluded classes announced one step ahead),
so a disagreement between ranks is reported at step 5 on every rank, never a cause of
mismatched transfers. Two protocols carry the metadata:

* ``"fast"`` (the pipeline's steady state): metadata and records in the same collective;
  the plan uses the exclusion announced at the previous exchange;
* ``"sync"`` (the first step, after a load or resize, direct :meth:`draw`/:meth:`insert`
  calls, CUDA shards): a small metadata gather first, checked, then the records. With a
  CUDA shard the records' collective is left to the caller (:meth:`complete_step`), so
  that the training thread launches it (see :mod:`.pipeline`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from .candidates import Candidates
from .draw import (DrawRecord, ExchangeStats, PreparedDraw, Received, assemble, compose,
                   exchange_records, serve, serve_own, served_slots, split_message)
from .elastic import union_shares
from .exchange import default_exchange
from .layout import RecordLayout
from .ledgers import ledger_from_shares, make_ledger
from .phases import PhaseClock
from .metadata import (BAD_LABELS, BAD_VALUES, HEADER, NONFINITE, STEP, SYNC, StepContext,
                       agree, digest, encode, labels_digest, layouts_of)
from .records import (INPUT, LABEL, TASK, InsertionKeys, as_record, check_dtypes, check_record,
                      is_class_labels, layout_for)
from .reservoir import LocalReservoir
from .sampling import (Eligible, LocalSampler, Sampler, UniformSampler, make_sampler,
                       sample_one_rank)
from .seeding import ELASTIC, INSERTION, PLAN, derive_seed
from .storage import ShardStorage
from .validation import (NONFINITE_POLICIES, all_finite, check_choice, check_int,
                         check_storable, finite_rows, label_list_error, to_int64_cpu)

__all__ = ["DrawRecord", "ExchangeStats", "PreparedDraw", "ShardedRehearsalBuffer",
           "split_budget", "INPUT", "LABEL", "TASK"]

STATE_VERSION = 4
PROTOCOLS = ("sync", "fast")
_UINT64 = getattr(torch, "uint64", None)
#: Samplers whose plan reads only every rank's number of eligible samples.
_TOTALS_ONLY = (UniformSampler, LocalSampler)


def split_budget(total: int, world_size: int, rank: int) -> int:
    """Rank ``rank``'s share of a global budget: ``total // world`` plus one for the first
    ``total % world`` ranks, so the shares add up to ``total`` exactly."""
    return total // world_size + (1 if rank < total % world_size else 0)


@dataclass
class Channel:
    """What the ranks agreed at the last exchange (the same on every rank).

    ``synced``: a synchronising step ran since the buffer was created, loaded or resized
    (until then the fast protocol is not used); ``step``: the last step exchanged;
    ``next_excluded``: the exclusion this rank announced for the next step's plan (every
    rank announced the same); ``seq``: exchanges so far."""

    seq: int = 0
    synced: bool = False
    step: int = -1
    next_excluded: tuple = ()


@dataclass
class StepState:
    """One step in flight between :meth:`~ShardedRehearsalBuffer.prepare_step` and
    :meth:`~ShardedRehearsalBuffer.complete_step` (a CUDA shard's records not exchanged)."""

    prepared: PreparedDraw
    #: the received records (``(d, row_bytes)`` uint8, or a view into the step's message)
    records: Optional[Union[torch.Tensor, Received]] = None
    extra: dict = field(default_factory=dict)


class ShardedRehearsalBuffer:
    """A rank's shard of a rehearsal buffer whose budget and sampling are global.

    Args:
        mem_size: the global budget M, summed over all ranks; this rank stores at most
            :func:`split_budget` ``(M, world, rank)`` samples.
        sampling: ``"uniform"`` over all stored samples, ``"class_balanced"`` (a class
            uniformly among those not exhausted, then a sample of it), ``"local"``
            (uniform over this rank's own shard, no payload exchange: the ablation
            baseline of global sampling), or a :class:`~.sampling.Sampler`.
        seed: the same on every rank (streams: :mod:`~.seeding`).
        device: where the shard lives (``"cpu"`` or a CUDA device).
        exchange: the collectives to use; default :func:`~.exchange.default_exchange`
            (none without a process group; two gloo groups for a CPU shard; a gloo group
            for metadata and the default group's CUDA backend for a CUDA shard's records).
        nonfinite: ``"raise"`` rejects a step whose candidates' floating-point fields hold
            NaN or Inf (on every rank, nothing inserted); ``"skip"`` drops those rows.
        timeout: seconds after which a collective fails; default the process group's.
        config: extra settings that must agree across ranks (checked at every step).
        payload_backend: backend of the payload group of a CUDA shard.
        dtypes: storage dtype per field, e.g. ``{"logits": torch.float16}`` (default: the
            dtype of the first batch; class and task labels are int64).
        insertion: ``"auto"`` (class-balanced for integer class labels, else a plain
            reservoir), ``"class_balanced"`` or ``"reservoir"`` (see :mod:`~.records`).
        budget_name: the name under which the caller took ``mem_size`` (error messages).

    Samples are records of named fields (:mod:`~.records`). Every rank keeps the same
    ledger of every shard's per-class counts (:mod:`~.ledger`), so per-class quotas are
    global and known before anything is inserted.

    Collectives (with more than one rank): :meth:`step`, :meth:`draw`, :meth:`insert`,
    :meth:`resize`; every rank calls them in the same order. Thread-safety: one thread at
    a time (the rehearsal pipeline serialises calls), except that :meth:`complete_step`
    may run on another thread than :meth:`prepare_step`.
    """

    def __init__(self, mem_size: int, sampling="uniform", seed: int = 0,
                 device: torch.device | str = "cpu", exchange=None,
                 nonfinite: str = "raise", pin_memory: Optional[bool] = None,
                 timeout: Optional[float] = None, config: Optional[dict] = None,
                 payload_backend: Optional[str] = None,
                 dtypes: Optional[Mapping[str, torch.dtype]] = None, insertion: str = "auto",
                 budget_name: str = "mem_size"):
        check_int(budget_name, mem_size, 1)
        self.sampler: Sampler = make_sampler(sampling)
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        check_int("seed", seed, 0)
        self.keys = InsertionKeys(insertion)
        self.dtypes = check_dtypes(dtypes)
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        device = torch.device(device)
        world = exchange.world_size if exchange is not None else _default_world()
        if mem_size < world:
            raise ValueError(f"{budget_name} ({mem_size}) must be at least the world size "
                             f"({world}) so that every rank stores a sample")
        if exchange is None:
            exchange = default_exchange(device, timeout, payload_backend)
        self.exchange = exchange
        self.rank = self.exchange.rank
        self.world_size = self.exchange.world_size
        self.budget_name = budget_name
        self.mem_size = mem_size
        self.seed = seed
        self.nonfinite = nonfinite
        self.storage = ShardStorage(split_budget(mem_size, self.world_size, self.rank), device,
                                    pin_memory=pin_memory)
        self.ledger = make_ledger(mem_size, self._capacities(mem_size), seed)
        self.reservoir = LocalReservoir(self.storage.capacity,
                                        seed=derive_seed(seed, self.rank, INSERTION))
        self.channel = Channel()
        self._plan_generator = torch.Generator()
        self.config = dict(config or {})
        #: Most candidates one step may offer: the width of the fast protocol's metadata
        #: (set by the pipeline; part of :meth:`public_config`, so agreed by every rank).
        self.max_candidates = 0
        #: Representatives per step of the pipeline's steps (part of :meth:`public_config`).
        self.step_r = 0
        #: Whether the pipeline's ``async_mode="auto"`` votes on each choice of mode with
        #: the other ranks (a collective; set by the pipeline, agreed by every rank).
        self.votes_on_overlap = False
        self.last_exchange = ExchangeStats()
        self.last_draw: Optional[DrawRecord] = None
        self.last_written = 0  # rows the last step wrote into this shard
        self._every_rank_has_layout = False  # seen in the headers of an agreed step
        self._storable_ok: set = set()  # batch dtypes whose storage casts lose nothing
        #: a :class:`~.phases.PhaseClock` marked at the end of every stage of a step (None:
        #: off); the caller starts it (the pipeline does, at each call, in synchronous mode)
        self.phase_clock: Optional[PhaseClock] = None
        self.rejected_nonfinite = 0

    @property
    def sampling(self) -> str:
        """The sampler's name (``"uniform"``, ``"class_balanced"``, ``"local"``, ...)."""
        return self.sampler.name

    def _capacities(self, mem_size: int) -> List[int]:
        return [split_budget(mem_size, self.world_size, w) for w in range(self.world_size)]

    def public_config(self) -> dict:
        """The settings every rank must share (JSON-able)."""
        dtypes = {k: str(v).replace("torch.", "") for k, v in sorted(self.dtypes.items())}
        extra = {"dtypes": dtypes} if dtypes else {}
        if self.keys.requested != "auto":
            extra["insertion"] = self.keys.requested
        return {"mem_size": self.mem_size, "sampling": self.sampling, "seed": self.seed,
                "nonfinite": self.nonfinite, **extra, **self.config}

    def _config_digest(self) -> int:
        """Digest of everything every rank must share at every step: the public settings,
        the pipeline's step shape (representatives and candidates per step) and whether
        its ``async_mode="auto"`` votes with the other ranks."""
        key = (self.mem_size, self.max_candidates, self.step_r, self.votes_on_overlap,
               tuple(sorted(self.config.items())))
        cached = getattr(self, "_config_cache", None)
        if cached is None or cached[0] != key:
            shape = {"max_candidates": self.max_candidates, "step_r": self.step_r,
                     "votes_on_overlap": self.votes_on_overlap}
            cached = self._config_cache = (key, digest([self.public_config(), shape]))
        return cached[1]

    # ------------------------------------------------------------------ local state
    @property
    def device(self) -> torch.device:
        return self.storage.device

    @property
    def local_capacity(self) -> int:
        return self.storage.capacity

    @property
    def layout(self) -> Optional[RecordLayout]:
        """The stored fields, their per-sample shapes and storage dtypes (None before the
        first record)."""
        return self.storage.layout

    @property
    def bytes_per_sample(self) -> int:
        """Bytes one stored record takes (0 before the first record)."""
        return 0 if self.storage.layout is None else self.storage.layout.row_bytes

    def __len__(self) -> int:
        """Samples stored on this rank."""
        return self.storage.size

    def class_counts(self) -> Dict[int, int]:
        """Stored samples per class key on this rank (key 0 for a plain reservoir)."""
        return {c: n for c, n in self.reservoir.class_counts().items() if n}

    def global_counts(self) -> Dict[int, int]:
        """``{label: stored}`` summed over all shards (classes with samples). Not
        collective: every rank holds every shard's counts."""
        return self.ledger.class_counts()

    def local_tensors(self) -> Dict[str, torch.Tensor]:
        """Views of every stored field of this shard (length ``len(self)``).

        The views share memory with the storage and change with it; clone to keep them.
        """
        if not self.storage.allocated:
            return {}
        return self.storage.fields()

    # ------------------------------------------------------------------ checks
    def check_record(self, record: Mapping[str, torch.Tensor], missing: Iterable[str] = ()) -> int:
        """Structural checks of a record batch (reads no tensor value); returns ``n``.
        ``missing``: stored fields the record may lack for now (added before insertion)."""
        n = check_record(record, self.storage.layout, missing)
        if self.storage.layout is None and not missing:
            probe = InsertionKeys(self.keys.policy or self.keys.requested)
            probe.decide(record)
        if self.sampler.by_class and LABEL in record and not is_class_labels(record[LABEL]):
            label = record[LABEL]
            raise ValueError(f"sampling={self.sampler.name!r} draws by class: it needs a 'label' "
                             "field of integer class labels of shape (n,), got "
                             f"{str(label.dtype).replace('torch.', '')} {tuple(label.shape)}; "
                             "use sampling='uniform' for other targets")
        return n

    def check_insert(self, inputs, labels=None, task_labels=None, **fields) -> int:
        """:meth:`check_record` of the record :meth:`insert` would build."""
        return self.check_record(as_record(inputs, labels, task_labels, fields))

    # ------------------------------------------------------------------ stage 1: candidates
    def _candidates(self, offered):
        """``(candidates, keys, error, exception)``: this rank's candidates (a
        :class:`~.candidates.Candidates`, or a record batch: all its rows) after the value
        checks (rows with NaN/Inf dropped under ``nonfinite="skip"``), their class keys (a
        list of ints, 0 for a plain reservoir), and the error code and exception when they
        are rejected (then nothing of this step is inserted on any rank)."""
        if not offered:
            return None, [], 0, None
        cands = offered if isinstance(offered, Candidates) else Candidates(dict(offered))
        record = cands.record
        keys = self.keys
        if keys.policy is None:
            keys.decide(record)
        # Label values are read for the whole batch (one transfer each): a bad label in
        # any row rejects the batch.
        labels = None
        try:
            if keys.by_class:
                raw = record[LABEL]
                if raw.dtype == _UINT64:  # values above 2**63 - 1 refused, then int64 storage
                    raw = to_int64_cpu("labels", raw)
                    cands = Candidates(dict(record, **{LABEL: raw}), cands.rows)
                    record = cands.record
                labels = raw.tolist()
            task = record.get(TASK)
            tasks = None if task is None else (
                to_int64_cpu("task_labels", task) if task.dtype == _UINT64 else task).tolist()
        except ValueError as exc:
            return None, [], BAD_LABELS, exc
        problem = label_list_error(labels, tasks)
        if problem is not None:
            return None, [], BAD_LABELS, problem
        problem = self._storage_check(record)
        if problem is not None:
            return None, [], BAD_VALUES, problem
        keep = None
        for value in record.values():
            if value.is_floating_point() and not all_finite(value):
                rows = finite_rows(value)
                rows = rows if cands.rows is None else rows[cands.rows.to(rows.device)]
                keep = rows if keep is None else keep & rows.to(keep.device)
        if keep is not None:
            keep = keep.cpu()
            bad = int((~keep).sum())
            if bad:
                if self.nonfinite == "raise":
                    return None, [], NONFINITE, ValueError(
                        f"the batch holds NaN or Inf in {bad} of {len(cands)} candidate rows "
                        "(nonfinite='raise'; use nonfinite='skip' to drop such samples)")
                self.rejected_nonfinite += bad
                cands = cands.keep(keep)
        if len(cands) == 0:
            return None, [], 0, None
        if labels is None:
            return cands, [0] * len(cands), 0, None
        if cands.rows is None:
            return cands, labels, 0, None
        return cands, [labels[i] for i in cands.rows.tolist()], 0, None

    def _storage_check(self, record) -> Optional[ValueError]:
        """The ValueError of :func:`~.validation.check_storable` (casts into integer storage
        that would change values), or None. Reads values only for such fields (none in the
        common case: then, once the layout is known, this costs a dictionary lookup)."""
        layout = self.storage.layout
        key = None
        if layout is not None:
            key = tuple((name, value.dtype) for name, value in record.items())
            if key in self._storable_ok:
                return None
        try:
            check_storable(record, layout, self.dtypes)
        except ValueError as exc:
            return exc
        if key is not None and not any(
                spec.dtype != dtype and not spec.dtype.is_floating_point
                for name, dtype in key for spec in (layout.fields.get(name),) if spec is not None):
            self._storable_ok.add(key)  # no cast into integer storage can lose anything
        return None

    # ------------------------------------------------------------------ stages 2-3: plan, serve
    def _plan(self, r: int, step: int, excluded: tuple):
        """Stage 2: every rank's draws for ``step``, from the ledger (before this step's
        insertion) and a generator seeded by ``(seed, step)``. Returns ``(plan, excluded)``:
        a :class:`~.sampling.SamplingPlan`, or, with one rank and a sampler that needs only
        the number of eligible samples, this rank's draws ``(d,)`` int64 (the same values)."""
        if self.keys.policy == "reservoir":
            excluded = ()  # no classes to exclude
        gen = self._plan_generator
        gen.manual_seed(derive_seed(self.seed, step, PLAN))
        ledger = self.ledger
        if self.world_size == 1 and type(self.sampler) in _TOTALS_ONLY:
            n = ledger.eligible_total(excluded)
            return sample_one_rank(n, min(r, n), gen), excluded
        eligible = Eligible(ledger.eligible_per_rank(excluded),
                            lambda: ledger.eligible_matrix(excluded), ledger.labels)
        return self.sampler.plan(eligible, r, gen), excluded

    def _serve(self, plan, step: int, excluded: tuple) -> PreparedDraw:
        """Stage 3: gather the records this rank serves for ``plan`` (see :func:`~.draw.serve`)."""
        key_field = LABEL if self.keys.by_class else None
        if isinstance(plan, torch.Tensor):  # one rank's own draws
            slots = served_slots(self.reservoir, self.storage, plan, None, excluded, key_field)
            prepared = serve_own(slots, self.storage, self.last_exchange)
        else:
            labels = self.ledger.labels

            def slots_of(local, label_columns):
                label_list = (None if label_columns is None
                              else [labels[c] for c in label_columns.tolist()])
                return served_slots(self.reservoir, self.storage, local, label_list, excluded,
                                    key_field)

            prepared = serve(plan, self.rank, self.world_size, self.sampler.exchanges,
                             self.storage, slots_of, self.last_exchange)
        prepared.step, prepared.excluded, prepared.table = step, excluded, self.ledger.snapshot()
        return prepared

    def _plan_serve(self, r: int, step: int, excluded: tuple, clock) -> PreparedDraw:
        plan, excluded = self._plan(r, step, excluded)
        if clock:
            clock.mark("plan")
        prepared = self._serve(plan, step, excluded)
        if clock:
            clock.mark("serve")
        return prepared

    # ------------------------------------------------------------------ stage 4-5: exchange, agree
    def _meta(self, kind: int, step: int, context: StepContext, error: int, keys: List[int],
              now: tuple, nxt: tuple, layout_digest: int, width: int) -> torch.Tensor:
        message = encode(kind, step, self.channel.seq, self._config_digest(), layout_digest,
                         labels_digest(now), labels_digest(nxt), self.ledger.digest(), context,
                         error, keys, width)
        self.channel.seq += 1
        return message

    def _agree(self, messages: torch.Tensor, exception) -> Tuple[None, torch.Tensor, torch.Tensor]:
        """Stage 5: every rank's header checked (see :func:`~.metadata.agree`); this rank's
        own rejection raised; the layout learnt if some ranks have none yet."""
        keys, counts = agree(messages, self.rank)  # raises on every rank on disagreement
        if exception is not None:
            raise exception
        if not self._every_rank_has_layout:  # the same on every rank: the headers say it
            layouts = layouts_of(messages)
            self._adopt_layout(layouts)
            self._every_rank_has_layout = 0 not in layouts
        return None, keys, counts

    def _adopt_layout(self, layouts: set) -> None:
        """Learn the sample layout from the ranks that have one (collective, once)."""
        if 0 not in layouts or len(layouts) == 1:
            return
        mine = self._layout_description()
        known = next(d for d in self.exchange.all_gather_object(mine) if d is not None)
        if self.storage.layout is None and mine is None:
            layout = RecordLayout.from_description(known)
            self.storage.allocate(layout)
            self.keys.decide_from_layout(layout)

    def _layout_description(self):
        if self.storage.layout is not None:
            return self.storage.layout.describe()
        pending = getattr(self, "_pending_layout", None)
        return None if pending is None else pending.describe()

    def _layout_digest(self, candidates) -> int:
        layout = self.storage.layout
        cached = getattr(self, "_layout_digest_cache", None)
        if layout is not None and cached is not None and cached[0] is layout:
            return cached[1]
        if layout is None and candidates:
            layout = layout_for(candidates.record, self.dtypes)
        self._pending_layout = layout
        if layout is None:
            return 0
        cached = getattr(self, "_layout_digest_cache", None)
        if cached is None or (cached[0] is not layout and cached[0] != layout):
            cached = self._layout_digest_cache = (layout, digest(layout.describe()))
        return cached[1]

    def _gather_sync(self, message: torch.Tensor, keys: List[int]) -> torch.Tensor:
        """The synchronising protocol's metadata: every rank's header, then (only when some
        rank offers candidates) every rank's keys. Returns ``(W, HEADER + width)``."""
        exchange = self.exchange
        heads = exchange.all_gather(message[:HEADER])
        width = int(heads[:, -1].max())
        sent = received = HEADER * 8
        received *= self.world_size
        if width:
            padded = torch.zeros(width, dtype=torch.int64)
            padded[: len(keys)] = message[HEADER: HEADER + len(keys)]
            rest = exchange.all_gather(padded)
            sent += width * 8
            received += rest.numel() * 8
            gathered = torch.cat([heads, rest], dim=1)
        else:
            gathered = heads
        return gathered, sent, received

    # ------------------------------------------------------------------ stage 6: insert
    def _insert(self, keys: torch.Tensor, counts: torch.Tensor, candidates, own_keys: List[int],
                step: int, context: StepContext) -> int:
        """Apply every rank's keys to the ledger; write this rank's candidates. Returns how
        many rows were written."""
        if keys is None:  # one rank: this rank's keys alone, as a list
            decisions = self.ledger.apply_local(own_keys, step, context.experience)
        else:
            decisions = self.ledger.apply(keys, counts, step, self.rank, context.experience)
        self.last_written = 0
        if not own_keys:
            return 0
        positions, slots = self.reservoir.apply(own_keys, decisions)
        if not positions:
            return 0
        record = candidates.record
        if self.storage.layout is None:
            self.storage.allocate(layout_for(record, self.dtypes))
        self.storage.write_fields(slots, record, rows=candidates.batch_rows(positions))
        self.last_written = len(positions)
        return self.last_written

    # ------------------------------------------------------------------ the step
    def step(self, record: Optional[Mapping[str, torch.Tensor]] = None, r: int = 0,
             step: int = 0, excluded: Iterable[int] = (), announce: Optional[Iterable[int]] = None,
             context: StepContext = StepContext(), protocol: str = "sync",
             out_device: Optional[torch.device] = None, checked: bool = False
             ) -> Dict[str, torch.Tensor]:
        """Collective. Draw ``r`` representatives for every rank and insert ``record``'s
        rows (this rank's candidates, a record batch, or None); see the module doc.

        Args:
            r: representatives per rank (``min(r, eligible)`` are drawn).
            step: the step; seeds the plan (``(seed, step)``) and is checked across ranks.
            excluded: class labels never drawn by this step.
            announce: the exclusion the next step's plan will use (default ``excluded``).
            context: this rank's position in training, checked across ranks.
            protocol: ``"sync"`` (metadata first, on the metadata group: any ``r``) or
                ``"fast"`` (the pipeline's steps, see :meth:`prepare_step`).
            checked: the caller already ran :meth:`check_record` on ``record``.
        Returns every stored field of the representatives (``input`` ``(d, ...)``,
        ``label`` ``(d,)``, ``task`` ``(d,)``, ...), in draw order, on ``out_device``
        (default the storage device), in the storage dtypes; new tensors, the caller's.
        Raises (on every rank, nothing inserted) when the ranks disagree or a rank's
        candidates are rejected.
        """
        state = self.prepare_step(record, r, step, excluded, announce, context, protocol,
                                  checked)
        return self.complete_step(state, out_device)

    def prepare_step(self, record=None, r: int = 0, step: int = 0, excluded: Iterable[int] = (),
                     announce: Optional[Iterable[int]] = None,
                     context: StepContext = StepContext(), protocol: str = "sync",
                     checked: bool = False, exchange_records_now: bool = True) -> StepState:
        """Stages 1-6 of :meth:`step`; :meth:`complete_step` assembles the representatives.

        ``record``: a record batch (every row is a candidate), a
        :class:`~.candidates.Candidates` (some rows of one), or None.
        ``protocol="fast"`` (the pipeline: ``r`` must be :attr:`step_r`) uses, once the
        ranks synchronised, one collective on the payload group whose sizes follow from
        the plan the ranks agreed at the previous exchange (step ``channel.step + 1``,
        exclusion ``channel.next_excluded``), whatever this rank wants now, so that ranks
        that disagree are caught by the header check instead of mismatched transfers.
        When this rank's ``step`` and ``excluded`` are that plan (in effect: no class that
        differs holds samples), that one collective is the whole step; otherwise (a
        re-draw, a changed exclusion) a second collective moves the records of the plan
        wanted, whose inputs the first one verified. A CUDA shard gathers the metadata on
        the metadata group instead and, with ``exchange_records_now=False``, leaves the
        records' collective to :meth:`complete_step` (the training thread's).
        """
        if protocol not in PROTOCOLS:
            check_choice("protocol", protocol, PROTOCOLS)
        if record is not None and not checked:
            self.check_record(record.record if isinstance(record, Candidates) else record)
        excluded = _labels_tuple(excluded)
        announce = excluded if announce is None else _labels_tuple(announce)
        clock = self.phase_clock
        candidates, own_keys, error, exception = self._candidates(record)
        if clock:
            clock.mark("check")
        if self.world_size == 1:
            if exception is not None:
                raise exception
            prepared = self._plan_serve(r, step, excluded, clock)
            self._insert(None, None, candidates, own_keys, step, context)
            self._finish(prepared, announce, (0, 0, 0, 0))
            if clock:
                clock.mark("insert")
            return StepState(prepared)
        layout_digest = self._layout_digest(candidates)
        paired = protocol == "fast" and self.channel.synced
        if paired and (r != self.step_r or len(own_keys) > self.max_candidates):
            raise ValueError(f"a fast step draws step_r={self.step_r} representatives and "
                             f"offers at most max_candidates={self.max_candidates} rows, got "
                             f"r={r} and {len(own_keys)} rows")
        args = (candidates, own_keys, error, exception, layout_digest, step, excluded, announce,
                context, clock)
        if not paired:
            return self._sync_step(r, exchange_records_now, *args)
        if self.exchange.device_payload:
            return self._device_step(exchange_records_now, *args)
        return self._paired_step(*args)

    def _equivalent(self, step: int, excluded: tuple) -> bool:
        """Whether a draw for ``step`` under ``excluded`` is the agreed next plan."""
        channel = self.channel
        if step != channel.step + 1:
            return False
        agreed = channel.next_excluded
        return agreed == excluded or self.ledger.unborn_since(set(agreed) ^ set(excluded), step)

    def _paired_step(self, candidates, own_keys, error, exception, layout_digest, step,
                     excluded, announce, context, clock) -> StepState:
        """The fast protocol (see :meth:`prepare_step`)."""
        channel = self.channel
        agreed = self._plan_serve(self.step_r, channel.step + 1, channel.next_excluded, clock)
        exact = self._equivalent(step, excluded)
        width = self.max_candidates
        meta = self._meta(STEP if exact else SYNC, step, context, error, own_keys, excluded,
                          announce, layout_digest, width)
        send, send_splits, recv_splits = compose(meta, agreed, self.world_size,
                                                 self.bytes_per_sample, self.storage)
        recv = self.exchange.all_to_all(send, send_splits, recv_splits,
                                        out=self.storage.scratch_bytes("step", sum(recv_splits)))
        if clock:
            clock.mark("exchange")
        messages, records = split_message(recv, recv_splits, HEADER + width, self.bytes_per_sample)
        _, keys, counts = self._agree(messages, exception)
        prepared = agreed
        m, world = meta.numel() * 8, self.world_size  # one message to (and from) every rank
        meta_bytes = (m * world, m * world, m * (world - 1), m * (world - 1))
        if clock:
            clock.mark("agree")
        if not exact:  # a re-draw or a changed exclusion: the plan wanted, verified above
            prepared = self._plan_serve(self.step_r, step, excluded, clock)
            records = exchange_records(prepared, self.storage, self.exchange) if prepared.moves else None
            if clock:
                clock.mark("exchange")
        self._insert_finish(keys, counts, candidates, own_keys, step, context, prepared,
                            announce, meta_bytes, clock)
        return StepState(prepared, records if prepared.moves else None)

    def _device_step(self, exchange_records_now, candidates, own_keys, error, exception,
                     layout_digest, step, excluded, announce, context, clock) -> StepState:
        """A CUDA shard's step: metadata gathered first (gloo), then plan, serve, insert;
        the records' collective is left to the caller unless ``exchange_records_now``."""
        width = self.max_candidates
        meta = self._meta(STEP if self._equivalent(step, excluded) else SYNC, step, context,
                          error, own_keys, excluded, announce, layout_digest, width)
        messages = self.exchange.all_gather(meta)
        if clock:
            clock.mark("exchange")
        _, keys, counts = self._agree(messages, exception)
        if clock:
            clock.mark("agree")
        return self._plan_insert(candidates, own_keys, keys, counts, step, excluded, announce,
                                 context, self.step_r, exchange_records_now, clock,
                                 (meta.numel() * 8, messages.numel() * 8, meta.numel() * 8,
                                  messages.numel() * 8 - meta.numel() * 8))

    def _sync_step(self, r, exchange_records_now, candidates, own_keys, error, exception,
                   layout_digest, step, excluded, announce, context, clock) -> StepState:
        """The synchronising protocol: metadata first, checked, then the records."""
        meta = self._meta(SYNC, step, context, error, own_keys, excluded, announce,
                          layout_digest, len(own_keys))
        messages, sent, received = self._gather_sync(meta, own_keys)
        if clock:
            clock.mark("exchange")
        _, keys, counts = self._agree(messages, exception)
        if clock:
            clock.mark("agree")
        state = self._plan_insert(candidates, own_keys, keys, counts, step, excluded, announce,
                                  context, r, exchange_records_now, clock,
                                  (sent, received, sent, received - sent))
        self.channel.synced = True
        return state

    def _plan_insert(self, candidates, own_keys, keys, counts, step, excluded, announce,
                     context, r, exchange_records_now, clock, meta_bytes) -> StepState:
        """Stages 2-3 and 6 after the metadata was agreed (and the records' collective now,
        unless it is left to :meth:`complete_step`)."""
        prepared = self._plan_serve(r, step, excluded, clock)
        state = StepState(prepared)
        if prepared.moves and exchange_records_now:
            state.records = exchange_records(prepared, self.storage, self.exchange)
            if clock:
                clock.mark("exchange")
        self._insert_finish(keys, counts, candidates, own_keys, step, context, prepared,
                            announce, meta_bytes, clock)
        return state

    def _insert_finish(self, keys, counts, candidates, own_keys, step, context, prepared,
                       announce, meta_bytes, clock) -> None:
        """Stage 6, then what the step agreed is recorded for the next one."""
        self._insert(keys, counts, candidates, own_keys, step, context)
        self._finish(prepared, announce, meta_bytes)
        if clock:
            clock.mark("insert")

    def _finish(self, prepared: PreparedDraw, announce: tuple,
                meta: Tuple[int, int, int, int]) -> None:
        """Record what the step agreed (for the next one) and its draw. ``meta``: the
        metadata bytes sent, received, sent to other ranks and received from them."""
        self.channel.step = prepared.step
        self.channel.next_excluded = announce
        stats = self.last_exchange
        (stats.metadata_sent, stats.metadata_received, stats.metadata_to_others,
         stats.metadata_from_others) = meta
        prepared.record = self.last_draw = DrawRecord(
            prepared.step, prepared.table, prepared.excluded, copy.copy(stats),
            self.bytes_per_sample)

    def complete_step(self, state: StepState,
                      out_device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
        """Stage 7: the representatives of a prepared step (the records' collective first,
        when :meth:`prepare_step` left it: a CUDA shard's payload)."""
        clock = self.phase_clock
        prepared = state.prepared
        records = state.records
        if prepared.moves and records is None:
            records = exchange_records(prepared, self.storage, self.exchange)
            if clock:
                clock.mark("exchange")
        out = assemble(prepared, self.storage, records, out_device)
        if clock:
            clock.mark("assemble")
        return out

    # ------------------------------------------------------------------ direct use
    def insert(self, inputs, labels=None, task_labels=None, **fields) -> int:
        """Offer every row of a batch to the shard, in order; return how many were written.

        Collective with more than one rank (every rank calls it, each with its own
        batch, or ``None``; the quotas of every rank know every rank's rows). Either
        ``insert(inputs, labels, task_labels, **extra_fields)``: inputs
        ``(n, *sample_shape)``, labels ``(n,)`` integer class labels in ``[0, 2**63 - 1]``
        (or any other targets, stored by a plain reservoir), task_labels ``(n,)``
        integers ``>= 0`` (default zeros with class labels), extra fields ``(n, ...)``
        (e.g. ``logits=``); or ``insert(record)`` with a mapping of field names to
        ``(n, ...)`` tensors. Tensors may live on any device; they are copied (cast to the
        storage dtypes), never kept. Raises before changing anything if an argument is
        malformed.
        """
        record = None if inputs is None else as_record(inputs, labels, task_labels, fields)
        return self.insert_record(record)

    def insert_record(self, record: Optional[Mapping[str, torch.Tensor]],
                      checked: bool = False, step: Optional[int] = None,
                      context: StepContext = StepContext()) -> int:
        """:meth:`insert` for a record batch (or None: this rank offers nothing)."""
        self.prepare_step(record, 0, self.channel.step + 1 if step is None else step,
                          context=context, checked=checked)
        self.channel.synced = False  # the pipeline's next step synchronises again
        return self.last_written

    def draw(self, r: int, step: int, out_device: Optional[torch.device] = None,
             exclude: Iterable[int] = (), context: StepContext = StepContext()
             ) -> Dict[str, torch.Tensor]:
        """Collective. Draw ``min(r, eligible size)`` representatives from the union of shards.

        Every rank must call it with the same ``r``, ``step``, ``exclude`` and ``context``.
        Samples whose class label is in ``exclude`` are never drawn (a plain reservoir,
        whose targets are not class labels, ignores it). Returns what :meth:`step`
        returns. Afterwards :attr:`last_draw` and :attr:`last_exchange` describe this draw.
        """
        check_int("r", r, 0)
        out = self.step(None, r, step, exclude, context=context, out_device=out_device)
        self.channel.synced = False
        return out

    # ------------------------------------------------------------------ budget
    def resize(self, mem_size: int) -> None:
        """Change the global budget. Every rank must resize to the same budget at the same
        point (a collective: it synchronises the ranks). Shrinking evicts, on each rank, from
        the classes furthest above their quotas; growing gives the new room to the classes
        that receive candidates from now on (the others keep what they hold)."""
        check_int("mem_size", mem_size, 1)
        if mem_size < self.world_size:
            raise ValueError(f"mem_size ({mem_size}) must be at least the world size "
                             f"({self.world_size})")
        if self.world_size > 1:
            heads = self.exchange.all_gather(torch.tensor([mem_size, self.ledger.digest()]))
            if len(set(heads[:, 0].tolist())) > 1:
                raise RuntimeError(f"ranks resized to different budgets: {heads[:, 0].tolist()}")
            if len(set(heads[:, 1].tolist())) > 1:
                raise RuntimeError("the ranks' replicated per-class counts differ")
        capacity = split_budget(mem_size, self.world_size, self.rank)
        evict = self.ledger.resize(mem_size, self._capacities(mem_size))
        self.mem_size = mem_size
        self._apply_evictions(evict.get(self.rank, {}), capacity)
        self.reservoir.capacity = capacity
        self.channel.synced = False

    def _apply_evictions(self, counts: Dict[int, int], capacity: int) -> None:
        if counts:
            keep = self.reservoir.evict(counts)
            self.storage.resize(capacity, torch.tensor(keep, dtype=torch.int64))
        else:
            self.storage.resize(capacity)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's shard: rows, reservoir counters, the replicated ledger and the RNG,
        as CPU tensors and plain data."""
        layout = self.storage.layout
        rows = (self.storage.rows[: self.storage.size].to("cpu", copy=True)
                if self.storage.rows is not None else torch.zeros((0, 8), dtype=torch.uint8))
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "config": self.public_config(),
                "layout": layout.describe() if layout is not None else None,
                "insertion": self.keys.policy, "rows": rows,
                "reservoir": self.reservoir.state_dict(), "ledger": self.ledger.state_dict(),
                "channel": {"step": self.channel.step,
                            "next_excluded": list(self.channel.next_excluded)}}

    def _check_state(self, state: dict) -> Optional[RecordLayout]:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"state must be a shard state of version {STATE_VERSION}, got "
                             f"{state.get('version') if isinstance(state, dict) else type(state).__name__}")
        layout = RecordLayout.from_description(state["layout"]) if state["layout"] else None
        if layout is not None and self.storage.layout is not None and layout != self.storage.layout:
            raise ValueError(f"state holds samples laid out as {layout.describe()}, this buffer "
                             f"holds {self.storage.layout.describe()}")
        rows = state["rows"]
        n = len(state["reservoir"]["label_of_slot"])
        if rows.shape[0] != n or (layout is not None and n and rows.shape[1] != layout.row_bytes):
            raise ValueError(f"state is inconsistent: {rows.shape[0]} rows for {n} reservoir slots")
        return layout

    def _restore(self, layout: Optional[RecordLayout], rows: torch.Tensor, held: int,
                 insertion: Optional[str]) -> None:
        """Reallocate ``held`` rows and write ``rows`` at the front."""
        if layout is not None:
            self.storage.allocate(layout)
        self.storage.resize(held, keep=torch.arange(0))
        if layout is not None and rows.shape[0]:
            self.storage.write(torch.arange(rows.shape[0]), rows)
        if insertion is not None:
            self.keys.policy = insertion

    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's shard exactly (same world size, rank and configuration).
        Every rank must load the states saved together (the ledger is checked across
        ranks at the next step)."""
        layout = self._check_state(state)
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(f"state of rank {state['rank']}/{state['world_size']} cannot be "
                             f"loaded on rank {self.rank}/{self.world_size}; use load_union()")
        if state["config"] != self.public_config():
            raise ValueError(f"state configuration {state['config']} differs from this "
                             f"buffer's {self.public_config()}")
        ledger = make_ledger(self.mem_size, self._capacities(self.mem_size), self.seed)
        ledger.load_state_dict(state["ledger"])
        self._restore(layout, state["rows"], self.storage.capacity, state.get("insertion"))
        self.ledger = ledger
        self.reservoir.load_state_dict(state["reservoir"])
        channel = state.get("channel", {})
        self.channel = Channel(step=int(channel.get("step", -1)),
                               next_excluded=tuple(channel.get("next_excluded", ())))
        self._every_rank_has_layout = False

    def load_union(self, states: list) -> None:
        """Take this rank's share of the union of ``states`` saved by any number of ranks
        (see :func:`~.elastic.union_shares`). While the union fits the budget nothing is
        lost; otherwise each rank evicts from the classes furthest above their quotas.
        Every rank must load the same states (not collective)."""
        layouts = [self._check_state(s) for s in states]
        known = [lay for lay in layouts if lay is not None]
        if any(lay != known[0] for lay in known):
            raise ValueError("saved shards hold samples of different layouts")
        shares = union_shares(states, self.world_size)
        mine, seen = shares[self.rank]
        capacity = split_budget(self.mem_size, self.world_size, self.rank)
        held = max(len(mine), capacity)
        ledger = ledger_from_shares(self.mem_size, self._capacities(self.mem_size), self.seed,
                                    [(_count_keys(entries), seen_w) for entries, seen_w in shares])
        reservoir = LocalReservoir(
            held, seed=derive_seed(self.seed, self.rank, INSERTION, ELASTIC, len(states)))
        for slot, (key, _, _) in enumerate(mine):
            reservoir.label_of_slot.append(key)
            reservoir.slots_by_class.setdefault(key, []).append(slot)
        for c, n in seen.items():
            reservoir.seen[c] = n
            reservoir.slots_by_class.setdefault(c, [])
        rows = (torch.stack([states[r]["rows"][slot] for _, r, slot in mine]) if mine
                else torch.zeros((0, 8), dtype=torch.uint8))
        insertion = next((s.get("insertion") for s in states if s.get("insertion")), None)
        self._restore(known[0] if known else None, rows, held, insertion)
        evict = ledger.fit()
        self.reservoir = reservoir
        self.ledger = ledger
        self._apply_evictions(evict.get(self.rank, {}), capacity)
        reservoir.capacity = capacity
        self.channel = Channel()
        self._every_rank_has_layout = False

    @property
    def local_capacity_for_budget(self) -> int:
        return split_budget(self.mem_size, self.world_size, self.rank)

    def close(self) -> None:
        self.exchange.close()


def _labels_tuple(labels) -> tuple:
    """Class labels as a sorted tuple of distinct ints."""
    return tuple(sorted({int(c) for c in labels})) if labels else ()


def _count_keys(entries) -> Dict[int, int]:
    out: Dict[int, int] = {}
    for key, _, _ in entries:
        out[key] = out.get(key, 0) + 1
    return out


def _default_world() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1
