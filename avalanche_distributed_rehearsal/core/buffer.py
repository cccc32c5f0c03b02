"""One rank's shard of the global rehearsal buffer: insert locally, sample globally."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Optional

import torch

from .exchange import LocalExchange, default_exchange
from .layout import RecordLayout
from .reservoir import ClassBalancedReservoir
from .sampling import SAMPLING_MODES, plan_draws
from .seeding import derive_seed, generator
from .storage import ShardStorage
from .validation import (NONFINITE_POLICIES, check_batch, check_choice, check_int,
                         check_label_values, finite_rows)

INPUT, LABEL, TASK = "input", "label", "task"
STATE_VERSION = 1


def split_budget(total: int, world_size: int, rank: int) -> int:
    """Rank ``rank``'s share of a global budget: ``total // world`` plus one for the first
    ``total % world`` ranks, so the shares add up to ``total`` exactly."""
    return total // world_size + (1 if rank < total % world_size else 0)


def _digest(obj) -> int:
    data = json.dumps(obj, sort_keys=True).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 2


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
        counts: ``(world, L)`` int64 CPU tensor: stored samples per class label on every
            rank at the time of the draw (row ``w`` is rank ``w``'s shard), excluded
            classes included. Owned by the record: never modified afterwards.
        excluded: the class labels left out of the draw.
        stats: this rank's traffic for the draw.
    """

    step: int
    counts: torch.Tensor
    excluded: tuple
    stats: ExchangeStats

    @property
    def global_size(self) -> int:
        return int(self.counts.sum())


class ShardedRehearsalBuffer:
    """A rank's shard of a rehearsal buffer whose budget and sampling are global.

    Args:
        mem_size: the global budget M, summed over all ranks; this rank stores at most
            :func:`split_budget` ``(M, world, rank)`` samples.
        sampling: ``"uniform"`` over all stored samples, or ``"class_balanced"``.
        seed: the same on every rank. Sampling plans use ``(seed, step)``; insertion uses
            ``(seed, rank)``.
        device: where the shard lives (``"cpu"`` or a CUDA device).
        exchange: the collectives to use; default :func:`default_exchange` (none without a
            process group, gloo for CPU storage, NCCL for CUDA storage).
        nonfinite: ``"raise"`` rejects a batch whose candidate inputs hold NaN or Inf;
            ``"skip"`` drops those candidates and keeps the rest.
        config: extra settings that must agree across ranks (checked at every draw).

    Thread-safety: one thread at a time (the rehearsal pipeline serialises calls).
    """

    def __init__(self, mem_size: int, sampling: str = "uniform", seed: int = 0,
                 device: torch.device | str = "cpu", exchange=None,
                 nonfinite: str = "raise", pin_memory: Optional[bool] = None,
                 timeout: float = 300.0, config: Optional[dict] = None):
        check_int("mem_size", mem_size, 1)
        check_choice("sampling", sampling, SAMPLING_MODES)
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        check_int("seed", seed, 0)
        device = torch.device(device)
        self.exchange = exchange if exchange is not None else default_exchange(device, timeout)
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
        self.reservoir = ClassBalancedReservoir(self.storage.capacity,
                                                seed=derive_seed(seed, self.rank, 0x5EED))
        self.config = dict(config or {})
        self._label_width = 0
        self.last_exchange = ExchangeStats()
        self.last_draw: Optional[DrawRecord] = None
        self.rejected_nonfinite = 0

    def public_config(self) -> dict:
        """The settings every rank must share (JSON-able)."""
        return {"mem_size": self.mem_size, "sampling": self.sampling, "seed": self.seed,
                "nonfinite": self.nonfinite, **self.config}

    @property
    def _config_digest(self) -> int:
        return _digest(self.public_config())

    def resize(self, mem_size: int) -> None:
        """Change the global budget. Shrinking evicts class-balanced (largest class first).

        Every rank must resize to the same budget before the next draw.
        """
        check_int("mem_size", mem_size, 1)
        if mem_size < self.world_size:
            raise ValueError(f"mem_size ({mem_size}) must be at least the world size "
                             f"({self.world_size})")
        capacity = split_budget(mem_size, self.world_size, self.rank)
        if capacity < self.reservoir.size:
            keep = self.reservoir.shrink(capacity)
            self.storage.resize(capacity, torch.tensor(keep, dtype=torch.int64))
        else:
            self.reservoir.grow(capacity)
            self.storage.resize(capacity)
        self.mem_size = mem_size

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

        Args:
            inputs: ``(n, *sample_shape)``, any real dtype, any device; copied, never kept.
            labels: ``(n,)`` integer class labels ``>= 0``.
            task_labels: ``(n,)`` integer task labels ``>= 0`` (default all 0).

        Raises before changing anything if an argument is malformed.
        """
        self.check_insert(inputs, labels, task_labels)
        if task_labels is None:
            task_labels = torch.zeros_like(labels)
        labels_cpu = labels.to("cpu", torch.int64)
        tasks_cpu = task_labels.to("cpu", torch.int64)
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

    # ------------------------------------------------------------------ global sampling
    def _local_counts(self, width: int) -> List[int]:
        """Stored samples per class label ``0 .. width - 1`` on this rank."""
        counts = [0] * width
        for c, slots in self.reservoir.slots_by_class.items():
            if c < width:
                counts[c] = len(slots)
        return counts

    _layout_digest_cache: Optional[tuple] = None  # (layout, its digest)

    def _layout_digest(self) -> int:
        layout = self.storage.layout
        if layout is None:
            return 0
        cached = self._layout_digest_cache
        if cached is None or cached[0] is not layout:  # a layout never changes once set
            cached = self._layout_digest_cache = (layout, _digest(layout.describe()))
        return cached[1]

    def gather_counts(self, excluded: tuple = ()) -> torch.Tensor:
        """Collective. ``(world, L)`` int64: stored samples per class label on every rank.

        Also checks that every rank runs the same configuration and sample layout, and
        passed the same ``excluded`` labels (a sorted tuple; see :meth:`draw`).
        One small all-gather per call (a second one only when a new class label or the
        first sample layout appears on some rank).
        """
        need = max(self.reservoir.slots_by_class, default=-1) + 1
        if self.world_size == 1:  # nothing to agree on: the same result without the checks
            width = self._label_width = max(self._label_width, need)
            self.last_exchange.metadata_sent = self.last_exchange.metadata_received = (4 + width) * 8
            return torch.tensor([self._local_counts(width)], dtype=torch.int64).view(1, width)
        digests = [self._config_digest, self._layout_digest(), _digest(excluded)]
        while True:
            width = self._label_width
            message = torch.tensor([need] + digests + self._local_counts(width),
                                   dtype=torch.int64)
            gathered = self.exchange.all_gather(message)
            self.last_exchange.metadata_sent = message.numel() * 8
            self.last_exchange.metadata_received = gathered.numel() * 8
            needs, configs, layouts, exclusions = zip(*gathered[:, :4].tolist())
            if len(set(configs)) > 1:
                raise RuntimeError("ranks passed different buffer configurations (mem_size, "
                                   "sampling, seed, batch_size_mem, num_candidates or nonfinite "
                                   "differ between ranks); every rank must use the same ones")
            if len(set(exclusions)) > 1:
                raise RuntimeError("ranks excluded different classes from the draw; every rank "
                                   "must pass the same excluded labels at the same step")
            known = {d for d in layouts if d != 0}
            if len(known) > 1:
                raise RuntimeError("ranks store samples of different shapes or dtypes; every "
                                   "rank must insert inputs of the same per-sample shape and dtype")
            if known and 0 in layouts:  # every rank sees it: all take part
                self._adopt_layout()
                digests[1] = self._layout_digest()
                continue
            widest = max(needs)
            if widest <= width:
                return gathered[:, 4:]
            self._label_width = widest

    def _adopt_layout(self) -> None:
        """Learn the sample layout from the ranks that have one (collective, rare)."""
        import torch.distributed as dist

        mine = self.storage.layout.describe() if self.storage.layout is not None else None
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=getattr(self.exchange, "group", None))
        known = next(d for d in everyone if d is not None)
        if mine is None:
            self.storage.allocate(RecordLayout.from_description(known))

    def draw(self, r: int, step: int, out_device: Optional[torch.device] = None,
             exclude: Iterable[int] = ()) -> Dict[str, torch.Tensor]:
        """Collective. Draw ``min(r, eligible size)`` representatives from the union of shards.

        Every rank must call it with the same ``r``, ``step`` and ``exclude``. Samples whose
        class label is in ``exclude`` are never drawn. Returns ``input``
        ``(d, *sample_shape)``, ``label`` ``(d,)`` int64 and ``task`` ``(d,)`` int64, in
        draw order, on ``out_device`` (default: the storage device). The tensors are new:
        the caller owns them. Returns an empty dict while nothing is eligible. Afterwards
        :attr:`last_draw` and :attr:`last_exchange` describe this draw.
        """
        excluded = tuple(sorted({int(c) for c in exclude}))
        counts = self.gather_counts(excluded)
        eligible = counts
        if excluded:
            eligible = counts.clone()
            columns = [c for c in excluded if 0 <= c < counts.shape[1]]
            eligible[:, columns] = 0
        plan = plan_draws(eligible, r, self.sampling, generator(self.seed, step, 0xD1A))
        stats = self.last_exchange
        stats.representatives = plan.d
        try:
            if plan.d == 0 or self.storage.layout is None:
                stats.payload_sent = stats.payload_received = 0
                return {}
            return self._exchange(plan, excluded, stats, out_device)
        finally:
            self.last_draw = DrawRecord(step, counts, excluded, replace(stats))

    def _local_slots(self, local: torch.Tensor, label: Optional[torch.Tensor],
                     excluded: tuple) -> torch.Tensor:
        """Storage slots of the draws this rank serves (``local`` indexes as the plan says)."""
        if label is not None:
            by_class = self.reservoir.slots_by_class
            return torch.tensor([by_class[c][j] for c, j in zip(label.tolist(), local.tolist())],
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

    def _exchange(self, plan, excluded: tuple, stats: ExchangeStats,
                  out_device: Optional[torch.device]) -> Dict[str, torch.Tensor]:
        """Move the planned rows and return them, field by field, in draw order.

        Copies of the payload: one gather into the send buffer, the transport, one
        ``index_select`` per field that both restores the draw order and compacts the
        field (nothing else). With one rank there is no transport: each field is gathered
        from the storage straight in draw order. CPU send and receive buffers are reused
        from step to step (:meth:`ShardStorage.scratch`); the returned tensors are always new.
        """
        layout = self.storage.layout
        if self.world_size == 1:  # every draw is served here, already in draw order
            label = None if plan.label is None else plan.label[0]
            slots = self._local_slots(plan.local[0], label, excluded)
            fields = self.storage.gather_fields(slots)
            stats.payload_sent = stats.payload_received = slots.numel() * layout.row_bytes
        else:
            splits, local, label = plan.sends(self.rank)
            slots = self._local_slots(local, label, excluded)
            recv_splits = plan.receive_splits(self.rank, self.world_size).tolist()
            send = self.storage.gather(slots, out=self.storage.scratch("send", slots.numel()))
            recv = self.exchange.all_to_all(send, splits.tolist(), recv_splits,
                                            out=self.storage.scratch("recv", sum(recv_splits)))
            stats.payload_sent = send.numel()
            stats.payload_received = recv.numel()
            # Received row k is draw receive_order[k], so draw j is received row where[j].
            where = torch.argsort(plan.receive_order(self.rank)).to(recv.device)
            fields = {name: view.index_select(0, where)
                      for name, view in layout.unpack(recv).items()}
        if out_device is not None and torch.device(out_device) != self.storage.device:
            non_blocking = torch.device(out_device).type == "cuda"
            fields = {name: t.to(out_device, non_blocking=non_blocking)
                      for name, t in fields.items()}
        return fields

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's shard: rows, reservoir counters and RNG, as CPU tensors and plain data."""
        layout = self.storage.layout
        rows = (self.storage.rows[: self.storage.size].to("cpu", copy=True)
                if self.storage.rows is not None else torch.zeros((0, 8), dtype=torch.uint8))
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "config": self.public_config(),
                "layout": layout.describe() if layout is not None else None,
                "rows": rows, "reservoir": self.reservoir.state_dict(),
                "label_width": self._label_width}

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
        self.reservoir.load_state_dict(state["reservoir"])
        self._label_width = int(state["label_width"])

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
        reservoir = ClassBalancedReservoir(held, seed=derive_seed(self.seed, self.rank, 0x5EED,
                                                                  len(states)))
        for slot, (label, _, _) in enumerate(mine):
            reservoir.label_of_slot.append(label)
            reservoir.slots_by_class.setdefault(label, []).append(slot)
        for c, total in seen_total.items():
            have = len(reservoir.slots_by_class.get(c, []))
            share = (total * have // stored_total[c]) if stored_total.get(c) else total // self.world_size
            reservoir.seen[c] = max(have, share)
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
        self._label_width = max([int(s["label_width"]) for s in states] + [0])

    @property
    def local_capacity_for_budget(self) -> int:
        return split_budget(self.mem_size, self.world_size, self.rank)

    def close(self) -> None:
        self.exchange.close()
