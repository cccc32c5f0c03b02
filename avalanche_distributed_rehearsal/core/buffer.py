"""One rank's shard of the global rehearsal buffer: insert locally, sample globally."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .exchange import default_exchange
from .layout import RecordLayout
from .metadata import (DRAW, HEADER, REFRESH, ClassTable, StepContext, check_agreement, decode_table,
                       digest, empty_table, encode, headers, needed_width)
from .quotas import QuotaPlanner
from .reservoir import ClassBalancedReservoir
from .sampling import SAMPLING_MODES, plan_draws
from .seeding import ELASTIC, INSERTION, PLAN, derive_seed, generator
from .storage import ShardStorage
from .validation import (NONFINITE_POLICIES, check_batch, check_choice, check_int,
                         check_label_values, finite_rows, to_int64_cpu)

INPUT, LABEL, TASK = "input", "label", "task"
STATE_VERSION = 2
_WIDTH_STEP = 8  # metadata widths grow in steps of this many classes (fewer re-gathers)


def split_budget(total: int, world_size: int, rank: int) -> int:
    """Rank ``rank``'s share of a global budget: ``total // world`` plus one for the first
    ``total % world`` ranks, so the shares add up to ``total`` exactly."""
    return total // world_size + (1 if rank < total % world_size else 0)


@dataclass
class ExchangeStats:
    """Traffic of the last :meth:`ShardedRehearsalBuffer.draw`, in bytes, for this rank."""

    payload_sent: int = 0
    payload_received: int = 0
    metadata_sent: int = 0
    metadata_received: int = 0
    representatives: int = 0


@dataclass(frozen=True)
class DrawRecord:
    """What one collective draw saw and moved, on this rank.

    Attributes:
        step: the step the draw was made for.
        table: the per-class counts of every rank at the time of the draw
            (:class:`~.metadata.ClassTable`; excluded classes included). Owned by the
            record: never modified afterwards.
        excluded: the class labels left out of the draw.
        stats: this rank's traffic for the draw.
    """

    step: int
    table: ClassTable
    excluded: tuple
    stats: ExchangeStats

    @property
    def counts(self) -> torch.Tensor:
        """``(world, L)`` int64: stored samples of ``table.labels[j]`` on rank ``w``."""
        return self.table.stored

    @property
    def global_size(self) -> int:
        return int(self.table.stored.sum())

    def class_counts(self, rank: Optional[int] = None) -> Dict[int, int]:
        """``{label: stored}`` over all ranks, or on ``rank``."""
        return self.table.class_counts(rank)


@dataclass
class PreparedDraw:
    """A draw planned and gathered locally, its payload not yet exchanged.

    Produced by :meth:`ShardedRehearsalBuffer.prepare_draw` (metadata collective only),
    consumed once by :meth:`ShardedRehearsalBuffer.complete_draw` (payload collective).
    Tensors are on the storage device and owned by this object (``send`` may be a reused
    scratch buffer of the storage: complete the draw before the next one is prepared).

    Attributes:
        record: the draw's :class:`DrawRecord`.
        fields: the representatives in draw order when no transport is needed (one rank,
            local sampling, nothing to draw), else None.
        send: ``(n, row_bytes)`` uint8, the records this rank serves, grouped by requester.
        send_splits, recv_splits: rows sent to / received from each rank.
        where: ``(d,)`` int64, the received row of each draw, in draw order.
    """

    record: DrawRecord
    fields: Optional[Dict[str, torch.Tensor]] = None
    send: Optional[torch.Tensor] = None
    send_splits: List[int] = field(default_factory=list)
    recv_splits: List[int] = field(default_factory=list)
    where: Optional[torch.Tensor] = None

    def tensors(self) -> List[torch.Tensor]:
        """Every tensor the object holds (for CUDA stream bookkeeping)."""
        out = [t for t in (self.send, self.where) if t is not None]
        return out + list((self.fields or {}).values())


class ShardedRehearsalBuffer:
    """A rank's shard of a rehearsal buffer whose budget and sampling are global.

    Args:
        mem_size: the global budget M, summed over all ranks; this rank stores at most
            :func:`split_budget` ``(M, world, rank)`` samples.
        sampling: ``"uniform"`` over all stored samples, ``"class_balanced"`` (a class
            uniformly among those not exhausted, then a sample of it), or ``"local"``
            (uniform over this rank's own shard, no payload exchange: the ablation
            baseline of global sampling). See :func:`~.sampling.plan_draws`.
        seed: the same on every rank (streams: :mod:`~.seeding`).
        device: where the shard lives (``"cpu"`` or a CUDA device).
        exchange: the collectives to use; default :func:`~.exchange.default_exchange`
            (none without a process group; gloo for metadata, and for the payload of a
            CPU shard; NCCL for the payload of a CUDA shard).
        nonfinite: ``"raise"`` rejects a batch whose candidate inputs hold NaN or Inf;
            ``"skip"`` drops those candidates and keeps the rest.
        timeout: seconds after which a collective fails; default the process group's.
        config: extra settings that must agree across ranks (checked at every gather).
        payload_backend: backend of the payload group of a CUDA shard (default ``"nccl"``).

    Per-class budgets are global (:mod:`~.quotas`): every gather of per-class counts
    (each draw makes one) updates this rank's quotas, so the union of the shards stays
    balanced over every class any rank has seen, also with more classes than slots.

    Thread-safety: one thread at a time (the rehearsal pipeline serialises calls), except
    that :meth:`complete_draw` may run on another thread than :meth:`prepare_draw`.
    """

    def __init__(self, mem_size: int, sampling: str = "uniform", seed: int = 0,
                 device: torch.device | str = "cpu", exchange=None,
                 nonfinite: str = "raise", pin_memory: Optional[bool] = None,
                 timeout: Optional[float] = None, config: Optional[dict] = None,
                 payload_backend: Optional[str] = None):
        check_int("mem_size", mem_size, 1)
        check_choice("sampling", sampling, SAMPLING_MODES)
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        check_int("seed", seed, 0)
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
        self.sampling = sampling
        self.seed = seed
        self.nonfinite = nonfinite
        self.storage = ShardStorage(split_budget(mem_size, self.world_size, self.rank), device,
                                    pin_memory=pin_memory)
        self.planner = QuotaPlanner(mem_size, self._capacities(mem_size), self.rank, seed)
        self.reservoir = self._new_reservoir(self.storage.capacity,
                                             derive_seed(seed, self.rank, INSERTION))
        self.config = dict(config or {})
        self._width = 0
        self._seq = 0
        self.last_table: Optional[ClassTable] = None
        self.last_exchange = ExchangeStats()
        self.last_draw: Optional[DrawRecord] = None
        self.rejected_nonfinite = 0

    def _capacities(self, mem_size: int) -> List[int]:
        return [split_budget(mem_size, self.world_size, w) for w in range(self.world_size)]

    def _new_reservoir(self, capacity: int, seed: int) -> ClassBalancedReservoir:
        provider = None if self.world_size == 1 else self.planner.quotas
        return ClassBalancedReservoir(capacity, seed=seed, class_seed=self.seed,
                                      quota_provider=provider)

    def public_config(self) -> dict:
        """The settings every rank must share (JSON-able)."""
        return {"mem_size": self.mem_size, "sampling": self.sampling, "seed": self.seed,
                "nonfinite": self.nonfinite, **self.config}

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

    def __len__(self) -> int:
        """Samples stored on this rank."""
        return self.storage.size

    def class_counts(self) -> Dict[int, int]:
        """Stored samples per class on this rank."""
        return {c: n for c, n in self.reservoir.class_counts().items() if n}

    def local_tensors(self) -> Dict[str, torch.Tensor]:
        """Views of this shard's ``input``, ``label`` and ``task`` fields (length ``len(self)``).

        The views share memory with the storage and change with it; clone to keep them.
        """
        if not self.storage.allocated:
            return {}
        return self.storage.fields()

    # ------------------------------------------------------------------ insertion
    def _layout_for(self, inputs: torch.Tensor) -> RecordLayout:
        return RecordLayout([(LABEL, (), torch.int64), (TASK, (), torch.int64),
                             (INPUT, tuple(inputs.shape[1:]), inputs.dtype)])

    def check_insert(self, inputs: torch.Tensor, labels: torch.Tensor,
                     task_labels: Optional[torch.Tensor] = None) -> None:
        """Structural checks of :meth:`insert`'s arguments; reads no tensor values."""
        check_batch(inputs, labels, task_labels)
        layout = self.storage.layout
        if layout is not None:
            spec = layout.fields[INPUT]
            if tuple(inputs.shape[1:]) != spec.shape or inputs.dtype != spec.dtype:
                raise ValueError(
                    f"inputs must have per-sample shape {spec.shape} and dtype {spec.dtype} "
                    f"like the samples already stored, got {tuple(inputs.shape[1:])} {inputs.dtype}")

    def insert(self, inputs: torch.Tensor, labels: torch.Tensor,
               task_labels: Optional[torch.Tensor] = None) -> int:
        """Offer every row of the batch to the shard, in order; return how many were written.

        Not collective. Args:
            inputs: ``(n, *sample_shape)``, any real dtype, any device; copied, never kept.
            labels: ``(n,)`` integer class labels in ``[0, 2**63 - 1]``.
            task_labels: ``(n,)`` integer task labels ``>= 0`` (default all 0).

        Raises before changing anything if an argument is malformed.
        """
        self.check_insert(inputs, labels, task_labels)
        if task_labels is None:
            task_labels = torch.zeros_like(labels)
        labels_cpu = to_int64_cpu("labels", labels)
        tasks_cpu = to_int64_cpu("task_labels", task_labels)
        check_label_values(labels_cpu, tasks_cpu)
        keep = finite_rows(inputs).cpu()
        if not bool(keep.all()):
            if self.nonfinite == "raise":
                bad = int((~keep).sum())
                raise ValueError(f"inputs hold NaN or Inf in {bad} of {len(keep)} rows "
                                 "(nonfinite='raise'; use nonfinite='skip' to drop such samples)")
            self.rejected_nonfinite += int((~keep).sum())
            index = torch.nonzero(keep).flatten()
            inputs, labels_cpu, tasks_cpu = inputs[index.to(inputs.device)], labels_cpu[index], tasks_cpu[index]
            if index.numel() == 0:
                return 0
        if self.storage.layout is None:  # else check_insert matched it already
            self.storage.allocate(self._layout_for(inputs))
        positions, slots = self.reservoir.offer_many(labels_cpu.tolist())
        if not positions:
            return 0
        # Each field straight into its storage column: no packed temporary.
        self.storage.write_fields(slots, {INPUT: inputs, LABEL: labels_cpu, TASK: tasks_cpu},
                                  rows=positions)
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

    def _own_counts(self) -> List[Tuple[int, int]]:
        """``(label, stored)`` for every class this rank has seen, ascending labels."""
        return [(c, len(s)) for c, s in sorted(self.reservoir.slots_by_class.items())]

    def _gather(self, kind: int, step: int, excluded: tuple, context: StepContext) -> ClassTable:
        """Collective (metadata group). Every rank's per-class counts, with the header
        checks of :mod:`~.metadata`; updates the quotas when the table changed."""
        counts = self._own_counts()
        stats = self.last_exchange
        if self.world_size == 1:  # nothing to agree on: the same table without the checks
            labels = torch.tensor([c for c, _ in counts], dtype=torch.int64)
            stored = torch.tensor([[n for _, n in counts]], dtype=torch.int64).view(1, -1)
            table = ClassTable(labels, stored, torch.ones_like(stored, dtype=torch.bool))
            # what the message would weigh: the rank "sends" it to itself
            stats.metadata_sent = stats.metadata_received = (HEADER + 2 * len(counts)) * 8
            self.last_table = table
            return table
        config, excluded_digest = digest(self.public_config()), digest(list(excluded))
        sent = received = 0
        while True:
            message = encode(kind, step, self._seq, config, self._layout_digest(),
                             excluded_digest, context, counts, self._width)
            gathered = self.exchange.all_gather(message)
            self._seq += 1
            sent += message.numel() * 8
            received += gathered.numel() * 8
            heads = headers(gathered)
            check_agreement(heads)
            layouts = {h.layout for h in heads}
            if 0 in layouts and len(layouts) > 1:  # every rank sees it: all take part
                self._adopt_layout()
                continue
            need = needed_width(gathered)
            if need > self._width:
                self._width = -(-need // _WIDTH_STEP) * _WIDTH_STEP
                continue
            break
        stats.metadata_sent, stats.metadata_received = sent, received
        table = decode_table(gathered)
        if not table.same_as(self.last_table):
            self.planner.set_table(table.labels.tolist(), table.stored.tolist(), table.seen.tolist())
            self.reservoir.refresh_quotas()
        self.last_table = table
        return table

    def _adopt_layout(self) -> None:
        """Learn the sample layout from the ranks that have one (collective, rare)."""
        mine = self.storage.layout.describe() if self.storage.layout is not None else None
        known = next(d for d in self.exchange.all_gather_object(mine) if d is not None)
        if mine is None:
            self.storage.allocate(RecordLayout.from_description(known))

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
        """
        excluded = tuple(sorted({int(c) for c in exclude}))
        table = self._gather(DRAW, step, excluded, context)
        eligible = table.stored
        if excluded:
            eligible = eligible.clone()
            eligible[:, table.columns(excluded)] = 0
        plan = plan_draws(eligible, r, self.sampling, generator(self.seed, step, PLAN))
        stats = self.last_exchange
        mine = plan.num_draws(self.rank)
        stats.representatives = mine
        layout = self.storage.layout
        prepared = None
        if plan.d == 0 or layout is None:
            stats.payload_sent = stats.payload_received = 0
            prepared = PreparedDraw(None, fields={})
        elif self.world_size == 1 or self.sampling == "local":
            # Every draw of this rank is served here, in draw order: the rank "sends" its
            # records to itself, no other rank is involved.
            label = None if plan.label is None else plan.label[self.rank, :mine]
            slots = self._local_slots(plan.local[self.rank, :mine], label, excluded, table)
            stats.payload_sent = stats.payload_received = slots.numel() * layout.row_bytes
            prepared = PreparedDraw(None, fields=self.storage.gather_fields(slots) if mine else {})
        else:
            splits, local, label = plan.sends(self.rank)
            slots = self._local_slots(local, label, excluded, table)
            send = self.storage.gather(slots, out=self.storage.scratch("send", slots.numel()))
            recv_splits = plan.receive_splits(self.rank, self.world_size).tolist()
            # Received row k is draw receive_order[k], so draw j is received row where[j].
            where = torch.argsort(plan.receive_order(self.rank)).to(self.storage.device)
            stats.payload_sent = send.numel()
            stats.payload_received = sum(recv_splits) * layout.row_bytes
            prepared = PreparedDraw(None, send=send, send_splits=splits.tolist(),
                                    recv_splits=recv_splits, where=where)
        prepared.record = self.last_draw = DrawRecord(step, table, excluded, replace(stats))
        return prepared

    def complete_draw(self, prepared: PreparedDraw,
                      out_device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
        """Collective on the payload group (unless nothing moves). Exchange the records of
        ``prepared`` and return the representatives: ``input`` ``(d, *sample_shape)``,
        ``label`` ``(d,)`` int64 and ``task`` ``(d,)`` int64, in draw order, on
        ``out_device`` (default: the storage device). The tensors are new: the caller
        owns them. Empty while nothing is eligible.

        Copies of the payload: one gather into the send buffer (in :meth:`prepare_draw`),
        the transport, one ``index_select`` per field that restores the draw order and
        compacts the field, and, from a CPU shard to a GPU, one staged asynchronous copy.
        """
        fields = prepared.fields
        if fields is None:
            layout = self.storage.layout
            recv = self.exchange.all_to_all(
                prepared.send, prepared.send_splits, prepared.recv_splits,
                out=self.storage.scratch("recv", sum(prepared.recv_splits)))
            fields = {name: view.index_select(0, prepared.where)
                      for name, view in layout.unpack(recv).items()}
        if out_device is None or torch.device(out_device) == self.storage.device or not fields:
            return fields
        out_device = torch.device(out_device)
        if out_device.type == "cuda" and self.storage.device.type == "cpu":
            return {name: self.storage.staging.to_device(f"draw-{name}", t, out_device)
                    for name, t in fields.items()}
        return {name: t.to(out_device, non_blocking=out_device.type == "cuda")
                for name, t in fields.items()}

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

    def _local_slots(self, local: torch.Tensor, label: Optional[torch.Tensor],
                     excluded: tuple, table: ClassTable) -> torch.Tensor:
        """Storage slots of the draws this rank serves (``local`` indexes as the plan says;
        ``label`` holds column indexes of ``table``)."""
        if label is not None:
            by_class = self.reservoir.slots_by_class
            labels = table.labels[label].tolist()
            return torch.tensor([by_class[c][j] for c, j in zip(labels, local.tolist())],
                                dtype=torch.int64)
        if not excluded:
            return local
        # Uniform over eligible samples: local index j is the j-th eligible slot. On CPU
        # the storage's own label column is the slot -> label table (no Python list).
        if self.storage.device.type == "cpu" and self.storage.allocated:
            slot_labels = self.storage.columns()[LABEL][: self.storage.size]
        else:
            slot_labels = torch.tensor(self.reservoir.label_of_slot, dtype=torch.int64)
        eligible = ~torch.isin(slot_labels, torch.tensor(excluded, dtype=torch.int64))
        return torch.nonzero(eligible).flatten()[local]

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
                "rows": rows, "reservoir": self.reservoir.state_dict(),
                "quota_table": self.planner.state_dict(), "metadata_width": self._width}

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

    def _reset_channel(self, width: int) -> None:
        """After a load every rank restarts its metadata sequence together."""
        self._seq = 0
        self._width = int(width)
        self.last_table = None

    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's shard exactly (same world size, rank and configuration)."""
        layout = self._check_state(state)
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(f"state of rank {state['rank']}/{state['world_size']} cannot be "
                             f"loaded on rank {self.rank}/{self.world_size}; use load_union()")
        if state["config"] != self.public_config():
            raise ValueError(f"state configuration {state['config']} differs from this "
                             f"buffer's {self.public_config()}")
        if layout is not None:
            self.storage.allocate(layout)
            self.storage.resize(self.storage.capacity, keep=torch.arange(0))
            self.storage.write(torch.arange(state["rows"].shape[0]), state["rows"])
        self.planner.load_state_dict(state.get("quota_table"))
        self.reservoir.load_state_dict(state["reservoir"])
        self._reset_channel(state.get("metadata_width", 0))

    def load_union(self, states: list) -> None:
        """Take this rank's share of the union of ``states`` saved by any number of ranks.

        Samples are sorted by (class, saved rank, saved slot) and dealt round-robin over the
        ranks, so classes stay balanced across shards. While the union fits the budget
        nothing is lost; otherwise each rank evicts class-balanced down to its capacity.
        Per-class "seen" counters are split in proportion to the samples each rank gets.
        """
        layouts = [self._check_state(s) for s in states]
        known = [lay for lay in layouts if lay is not None]
        if any(lay != known[0] for lay in known):
            raise ValueError("saved shards hold samples of different layouts")
        entries, seen_total = [], {}
        for r, state in enumerate(states):
            for slot, label in enumerate(state["reservoir"]["label_of_slot"]):
                entries.append((label, r, slot))
            for c, n in state["reservoir"]["seen"].items():
                seen_total[int(c)] = seen_total.get(int(c), 0) + int(n)
        entries.sort()
        mine = entries[self.rank::self.world_size]
        stored_total = {}
        for label, _, _ in entries:
            stored_total[label] = stored_total.get(label, 0) + 1
        capacity = self.local_capacity_for_budget
        held = max(len(mine), capacity)
        self.planner.clear_table()
        reservoir = self._new_reservoir(
            held, derive_seed(self.seed, self.rank, INSERTION, ELASTIC, len(states)))
        for slot, (label, _, _) in enumerate(mine):
            reservoir.label_of_slot.append(label)
            reservoir.slots_by_class.setdefault(label, []).append(slot)
        for c, total in seen_total.items():
            have = len(reservoir.slots_by_class.get(c, []))
            share = (total * have // stored_total[c]) if stored_total.get(c) else total // self.world_size
            reservoir.seen[c] = max(have, share)
            reservoir.slots_by_class.setdefault(c, [])
        if known:
            self.storage.allocate(known[0])
            self.storage.resize(held, keep=torch.arange(0))
            if mine:
                rows = torch.stack([states[r]["rows"][slot] for _, r, slot in mine])
                self.storage.write(torch.arange(len(mine)), rows)
        else:
            self.storage.resize(held, keep=torch.arange(0))
        if held > capacity:
            keep = reservoir.shrink(capacity)
            self.storage.resize(capacity, keep=torch.tensor(keep, dtype=torch.int64))
        self.reservoir = reservoir
        reservoir.refresh_quotas()
        self._reset_channel(max([int(s.get("metadata_width", 0)) for s in states] + [0]))

    @property
    def local_capacity_for_budget(self) -> int:
        return split_budget(self.mem_size, self.world_size, self.rank)

    def close(self) -> None:
        self.exchange.close()
