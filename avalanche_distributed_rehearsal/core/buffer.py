"""One rank's shard of the global rehearsal buffer: insert locally, sample globally.

:class:`ShardedRehearsalBuffer` composes small parts, each in its own module:

* storage (:mod:`.storage`): preallocated fixed-width records, lazily shaped;
* insertion (:mod:`.records` keys + :mod:`.reservoir` slots + :mod:`.quotas` budgets);
* sampling (:mod:`.sampling`): a :class:`~.sampling.Sampler` plans every rank's draws;
* agreement (:mod:`.metadata`): the per-step header and counts, checked across ranks;
* exchange (:mod:`.exchange`): every collective;
* the draw itself (:mod:`.draw`) and elastic loading (:mod:`.elastic`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, Iterable, List, Mapping, Optional

import torch

from .draw import DrawRecord, ExchangeStats, PreparedDraw, complete, prepare, served_slots
from .elastic import union_share
from .exchange import default_exchange
from .layout import RecordLayout
from .metadata import DRAW, REFRESH, ClassTable, MetadataChannel, StepContext, digest
from .quotas import QuotaPlanner
from .records import (INPUT, LABEL, TASK, InsertionKeys, as_record, check_dtypes, check_record,
                      layout_for)
from .reservoir import ClassBalancedReservoir
from .sampling import Sampler, make_sampler
from .seeding import ELASTIC, INSERTION, PLAN, derive_seed, generator
from .storage import ShardStorage
from .validation import (NONFINITE_POLICIES, check_choice, check_int, check_label_values,
                         check_storable, finite_rows, to_int64_cpu)

__all__ = ["DrawRecord", "ExchangeStats", "PreparedDraw", "ShardedRehearsalBuffer",
           "split_budget", "INPUT", "LABEL", "TASK"]

STATE_VERSION = 3


def split_budget(total: int, world_size: int, rank: int) -> int:
    """Rank ``rank``'s share of a global budget: ``total // world`` plus one for the first
    ``total % world`` ranks, so the shares add up to ``total`` exactly."""
    return total // world_size + (1 if rank < total % world_size else 0)


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
            (none without a process group; gloo for metadata, and for the payload of a
            CPU shard; the default group's CUDA backend for the payload of a CUDA shard).
        nonfinite: ``"raise"`` rejects a batch whose floating-point fields hold NaN or
            Inf; ``"skip"`` drops those rows and keeps the rest.
        timeout: seconds after which a collective fails; default the process group's.
        config: extra settings that must agree across ranks (checked at every gather).
        payload_backend: backend of the payload group of a CUDA shard.
        dtypes: storage dtype per field, e.g. ``{"logits": torch.float16}`` (default: the
            dtype of the first batch; class and task labels are int64).
        insertion: ``"auto"`` (class-balanced for integer class labels, else a plain
            reservoir), ``"class_balanced"`` or ``"reservoir"`` (see :mod:`~.records`).

    Samples are records of named fields (:mod:`~.records`). Per-class budgets are global
    (:mod:`~.quotas`): every gather of per-class counts (each draw makes one) updates this
    rank's quotas, so the union of the shards stays balanced over every class any rank
    has seen, also with more classes than slots.

    Thread-safety: one thread at a time (the rehearsal pipeline serialises calls), except
    that :meth:`complete_draw` may run on another thread than :meth:`prepare_draw`.
    """

    def __init__(self, mem_size: int, sampling="uniform", seed: int = 0,
                 device: torch.device | str = "cpu", exchange=None,
                 nonfinite: str = "raise", pin_memory: Optional[bool] = None,
                 timeout: Optional[float] = None, config: Optional[dict] = None,
                 payload_backend: Optional[str] = None,
                 dtypes: Optional[Mapping[str, torch.dtype]] = None, insertion: str = "auto"):
        check_int("mem_size", mem_size, 1)
        self.sampler: Sampler = make_sampler(sampling)
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        check_int("seed", seed, 0)
        self.keys = InsertionKeys(insertion)
        self.dtypes = check_dtypes(dtypes)
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        device = torch.device(device)
        if exchange is None:
            exchange = default_exchange(device, timeout, payload_backend)
        self.exchange = exchange
        self.rank = self.exchange.rank
        self.world_size = self.exchange.world_size
        if mem_size < self.world_size:
            raise ValueError(f"mem_size ({mem_size}) must be at least the world size "
                             f"({self.world_size}) so that every rank stores a sample")
        self.mem_size = mem_size
        self.seed = seed
        self.nonfinite = nonfinite
        self.storage = ShardStorage(split_budget(mem_size, self.world_size, self.rank), device,
                                    pin_memory=pin_memory)
        self.planner = QuotaPlanner(mem_size, self._capacities(mem_size), self.rank, seed)
        self.reservoir = self._new_reservoir(self.storage.capacity,
                                             derive_seed(seed, self.rank, INSERTION))
        self.channel = MetadataChannel()
        self.config = dict(config or {})
        self.last_table: Optional[ClassTable] = None
        self.last_exchange = ExchangeStats()
        self.last_draw: Optional[DrawRecord] = None
        self.rejected_nonfinite = 0

    @property
    def sampling(self) -> str:
        """The sampler's name (``"uniform"``, ``"class_balanced"``, ``"local"``, ...)."""
        return self.sampler.name

    def _capacities(self, mem_size: int) -> List[int]:
        return [split_budget(mem_size, self.world_size, w) for w in range(self.world_size)]

    def _new_reservoir(self, capacity: int, seed: int) -> ClassBalancedReservoir:
        provider = None if self.world_size == 1 else self.planner.quotas
        return ClassBalancedReservoir(capacity, seed=seed, class_seed=self.seed,
                                      quota_provider=provider)

    def public_config(self) -> dict:
        """The settings every rank must share (JSON-able)."""
        dtypes = {k: str(v).replace("torch.", "") for k, v in sorted(self.dtypes.items())}
        extra = {"dtypes": dtypes} if dtypes else {}
        if self.keys.requested != "auto":
            extra["insertion"] = self.keys.requested
        return {"mem_size": self.mem_size, "sampling": self.sampling, "seed": self.seed,
                "nonfinite": self.nonfinite, **extra, **self.config}

    def resize(self, mem_size: int) -> None:
        """Change the global budget. Shrinking evicts class-balanced (largest class first).

        Every rank must resize to the same budget before the next draw.
        """
        check_int("mem_size", mem_size, 1)
        if mem_size < self.world_size:
            raise ValueError(f"mem_size ({mem_size}) must be at least the world size "
                             f"({self.world_size})")
        capacity = split_budget(mem_size, self.world_size, self.rank)
        self.planner.resize(mem_size, self._capacities(mem_size))
        if capacity < self.reservoir.size:
            keep = self.reservoir.shrink(capacity)
            self.storage.resize(capacity, torch.tensor(keep, dtype=torch.int64))
        else:
            self.reservoir.grow(capacity)
            self.storage.resize(capacity)
        self.mem_size = mem_size
        self.reservoir.refresh_quotas()

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

    def local_tensors(self) -> Dict[str, torch.Tensor]:
        """Views of every stored field of this shard (length ``len(self)``).

        The views share memory with the storage and change with it; clone to keep them.
        """
        if not self.storage.allocated:
            return {}
        return self.storage.fields()

    # ------------------------------------------------------------------ insertion
    def check_record(self, record: Mapping[str, torch.Tensor], missing: Iterable[str] = ()) -> int:
        """Structural checks of a record batch (reads no tensor value); returns ``n``.
        ``missing``: stored fields the record may lack for now (added before insertion)."""
        n = check_record(record, self.storage.layout, missing)
        if self.storage.layout is None and not missing:
            probe = InsertionKeys(self.keys.policy or self.keys.requested)
            probe.decide(record)
        return n

    def check_insert(self, inputs, labels=None, task_labels=None, **fields) -> int:
        """:meth:`check_record` of the record :meth:`insert` would build."""
        return self.check_record(as_record(inputs, labels, task_labels, fields))

    def insert(self, inputs, labels=None, task_labels=None, **fields) -> int:
        """Offer every row of a batch to the shard, in order; return how many were written.

        Not collective. Either ``insert(inputs, labels, task_labels, **extra_fields)``:
            inputs ``(n, *sample_shape)``, labels ``(n,)`` integer class labels in
            ``[0, 2**63 - 1]`` (or any other targets, stored by a plain reservoir),
            task_labels ``(n,)`` integers ``>= 0`` (default zeros with class labels),
            extra fields ``(n, ...)`` (e.g. ``logits=``);
        or ``insert(record)`` with a mapping of field names to ``(n, ...)`` tensors.
        Tensors may live on any device; they are copied (cast to the storage dtypes),
        never kept. Raises before changing anything if an argument is malformed.
        """
        return self.insert_record(as_record(inputs, labels, task_labels, fields))

    def insert_record(self, record: Mapping[str, torch.Tensor], checked: bool = False) -> int:
        """:meth:`insert` for a record batch (a mapping of field names to tensors).

        ``checked=True``: the caller already ran :meth:`check_record` on this record and
        the layout has not changed since (the pipeline's own candidates)."""
        n = next(iter(record.values())).shape[0] if checked else self.check_record(record)
        keys_policy = self.keys
        if self.storage.layout is None:
            keys_policy.decide(record)
        labels = record.get(LABEL)
        labels_cpu = to_int64_cpu("labels", labels) if keys_policy.by_class else None
        tasks_cpu = to_int64_cpu("task_labels", record[TASK]) if TASK in record else None
        check_label_values(labels_cpu, tasks_cpu)
        check_storable(record, self.storage.layout, self.dtypes)
        keep = None
        for value in record.values():
            if value.is_floating_point():
                rows = finite_rows(value)
                keep = rows if keep is None else keep & rows.to(keep.device)
        if keep is not None:
            keep = keep.cpu()
        if keep is not None and not bool(keep.all()):
            bad = int((~keep).sum())
            if self.nonfinite == "raise":
                raise ValueError(f"the batch holds NaN or Inf in {bad} of {n} rows "
                                 "(nonfinite='raise'; use nonfinite='skip' to drop such samples)")
            self.rejected_nonfinite += bad
            index = torch.nonzero(keep).flatten()
            if index.numel() == 0:
                return 0
            record = {name: t.index_select(0, index.to(t.device)) for name, t in record.items()}
            labels_cpu = None if labels_cpu is None else labels_cpu[index]
            tasks_cpu = None if tasks_cpu is None else tasks_cpu[index]
            n = index.numel()
        if self.storage.layout is None:
            self.storage.allocate(layout_for(record, self.dtypes))
        positions, slots = self.reservoir.offer_many(keys_policy.keys(labels_cpu, n))
        if not positions:
            return 0
        values = dict(record)
        if labels_cpu is not None:
            values[LABEL] = labels_cpu
        if tasks_cpu is not None:
            values[TASK] = tasks_cpu
        # Each field straight into its storage column: no packed temporary.
        self.storage.write_fields(slots, values, rows=positions)
        return len(positions)

    # ------------------------------------------------------------------ global view
    def _layout_digest(self) -> int:
        layout = self.storage.layout
        if layout is None:
            return 0
        cached = getattr(self, "_layout_digest_cache", None)
        if cached is None or cached[0] is not layout:  # a layout never changes once set
            cached = self._layout_digest_cache = (layout, digest(layout.describe()))
        return cached[1]

    def _adopt_layout(self) -> None:
        """Learn the sample layout from the ranks that have one (collective, rare)."""
        mine = self.storage.layout.describe() if self.storage.layout is not None else None
        known = next(d for d in self.exchange.all_gather_object(mine) if d is not None)
        if mine is None:
            layout = RecordLayout.from_description(known)
            self.storage.allocate(layout)
            self.keys.decide_from_layout(layout)

    def _gather(self, kind: int, step: int, excluded: tuple, context: StepContext) -> ClassTable:
        """Collective (metadata group): every rank's per-class counts, checked for
        agreement; updates the quotas when the table changed."""
        counts = [(c, len(s)) for c, s in sorted(self.reservoir.slots_by_class.items())]
        table, sent, received = self.channel.gather(
            self.exchange, kind, step, counts, digest(self.public_config()), self._layout_digest,
            digest(list(excluded)), context, self._adopt_layout)
        self.last_exchange.metadata_sent, self.last_exchange.metadata_received = sent, received
        if self.world_size > 1 and not table.same_as(self.last_table):
            self.planner.set_table(table.labels.tolist(), table.stored.tolist(), table.seen.tolist())
            self.reservoir.refresh_quotas()
        self.last_table = table
        return table

    def refresh(self, step: int = 0, context: StepContext = StepContext()) -> ClassTable:
        """Collective. Gather every rank's per-class counts and update this rank's quotas.

        Draws do this themselves; call it between inserts that no draw separates (a whole
        experience inserted at once) so that the quotas stay global. Every rank must call
        it at the same point, with the same ``step``.
        """
        return self._gather(REFRESH, step, (), context)

    def global_counts(self, step: int = 0) -> Dict[int, int]:
        """Collective. ``{label: stored}`` summed over all shards (classes with samples)."""
        return self.refresh(step).class_counts()

    # ------------------------------------------------------------------ global sampling
    def prepare_draw(self, r: int, step: int, exclude: Iterable[int] = (),
                     context: StepContext = StepContext()) -> PreparedDraw:
        """Collective on the metadata group. Plan this step's draw and gather the records
        this rank serves; :meth:`complete_draw` then moves them.

        Every rank must call it with the same ``r``, ``step``, ``exclude`` and
        ``context``; a rank that disagrees makes every rank raise (see :mod:`~.metadata`).
        ``exclude`` holds class labels; a plain reservoir (targets that are not class
        labels) has no classes to exclude and ignores it.
        """
        excluded = tuple(sorted({int(c) for c in exclude})) if self.keys.policy != "reservoir" else ()
        table = self._gather(DRAW, step, excluded, context)
        eligible = table.stored
        if excluded:
            eligible = eligible.clone()
            eligible[:, table.columns(excluded)] = 0
        plan = self.sampler.plan(eligible, r, generator(self.seed, step, PLAN))
        key_field = LABEL if self.keys.by_class else None

        def slots_of(local, label_columns):
            return served_slots(self.reservoir, self.storage, local, label_columns, excluded,
                                table, key_field)

        prepared = prepare(plan, self.rank, self.world_size, self.sampler.exchanges,
                           self.storage, slots_of, self.last_exchange)
        prepared.record = self.last_draw = DrawRecord(step, table, excluded,
                                                      replace(self.last_exchange),
                                                      self.bytes_per_sample)
        return prepared

    def complete_draw(self, prepared: PreparedDraw,
                      out_device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
        """Collective on the payload group (unless nothing moves). Returns every stored
        field of the representatives (``input`` ``(d, ...)``, ``label`` ``(d,)``, ``task``
        ``(d,)``, ``logits``...), in draw order, on ``out_device`` (default: the storage
        device), in the storage dtypes; new tensors, the caller's. Empty while nothing is
        eligible. See :func:`~.draw.complete`."""
        return complete(prepared, self.storage, self.exchange, out_device)

    def draw(self, r: int, step: int, out_device: Optional[torch.device] = None,
             exclude: Iterable[int] = (), context: StepContext = StepContext()
             ) -> Dict[str, torch.Tensor]:
        """Collective. Draw ``min(r, eligible size)`` representatives from the union of shards.

        Every rank must call it with the same ``r``, ``step``, ``exclude`` and ``context``.
        Samples whose class label is in ``exclude`` are never drawn. Returns what
        :meth:`complete_draw` returns. Afterwards :attr:`last_draw` and
        :attr:`last_exchange` describe this draw.
        """
        return self.complete_draw(self.prepare_draw(r, step, exclude, context), out_device)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's shard: rows, reservoir counters, quotas and RNG, as CPU tensors and
        plain data."""
        layout = self.storage.layout
        rows = (self.storage.rows[: self.storage.size].to("cpu", copy=True)
                if self.storage.rows is not None else torch.zeros((0, 8), dtype=torch.uint8))
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "config": self.public_config(),
                "layout": layout.describe() if layout is not None else None,
                "insertion": self.keys.policy, "rows": rows,
                "reservoir": self.reservoir.state_dict(),
                "quota_table": self.planner.state_dict(), "metadata_width": self.channel.width}

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
        """Restore this rank's shard exactly (same world size, rank and configuration)."""
        layout = self._check_state(state)
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(f"state of rank {state['rank']}/{state['world_size']} cannot be "
                             f"loaded on rank {self.rank}/{self.world_size}; use load_union()")
        if state["config"] != self.public_config():
            raise ValueError(f"state configuration {state['config']} differs from this "
                             f"buffer's {self.public_config()}")
        self._restore(layout, state["rows"], self.storage.capacity, state.get("insertion"))
        self.planner.load_state_dict(state.get("quota_table"))
        self.reservoir.load_state_dict(state["reservoir"])
        self.channel.reset(state.get("metadata_width", 0))
        self.last_table = None

    def load_union(self, states: list) -> None:
        """Take this rank's share of the union of ``states`` saved by any number of ranks
        (see :func:`~.elastic.union_share`). While the union fits the budget nothing is
        lost; otherwise each rank evicts class-balanced down to its capacity."""
        layouts = [self._check_state(s) for s in states]
        known = [lay for lay in layouts if lay is not None]
        if any(lay != known[0] for lay in known):
            raise ValueError("saved shards hold samples of different layouts")
        mine, seen = union_share(states, self.rank, self.world_size)
        capacity = self.local_capacity_for_budget
        held = max(len(mine), capacity)
        self.planner.clear_table()
        reservoir = self._new_reservoir(
            held, derive_seed(self.seed, self.rank, INSERTION, ELASTIC, len(states)))
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
        if held > capacity:
            keep = reservoir.shrink(capacity)
            self.storage.resize(capacity, keep=torch.tensor(keep, dtype=torch.int64))
        self.reservoir = reservoir
        reservoir.refresh_quotas()
        self.channel.reset(max([int(s.get("metadata_width", 0)) for s in states] + [0]))
        self.last_table = None

    @property
    def local_capacity_for_budget(self) -> int:
        return split_budget(self.mem_size, self.world_size, self.rank)

    def close(self) -> None:
        self.exchange.close()

