"""Per-step metadata and host time at large world sizes and label spaces, simulated.

No processes: one rank's replica of the replicated ledger (:mod:`~avalanche_distributed_rehearsal.core.ledger`)
for ``N`` ranks and ``C`` classes, put directly in the steady state (every shard full,
every class at its quota, the quotas dealt in proportion over the ranks), then fed the
candidate keys of every rank, ``c`` per rank per step, as the step's collective would
deliver them. Per step and per rank it measures:

* the metadata bytes a rank sends to and receives from the other ranks: one message of
  ``HEADER + c`` int64 words to (and from) each other rank, whatever ``C`` is;
* the host time of the agreement (the header checks of ``N`` messages), of the ledger's
  update (every rank's keys applied; no count changes in the steady state) and of the
  plan (every rank's ``r`` uniform draws from the union).

A deal (a structural step: a class or a rank-class pair appears) is timed apart, where
its cost allows (it is ``O(N * C)`` per sweep).
"""

from __future__ import annotations

import time
from typing import Dict, List

import torch

from .timing import summarize


def steady_ledger(world: int, classes: int, per_rank: int, seed: int = 0):
    """A :class:`ClassLedger` of ``world`` ranks of ``per_rank`` slots holding ``classes``
    classes, every rank full and every class at its quota (dealt in proportion)."""
    from avalanche_distributed_rehearsal.core import ClassLedger
    from avalanche_distributed_rehearsal.core.deal import proportional_split

    ledger = ClassLedger(world * per_rank, [per_rank] * world, seed)
    ledger.columns(torch.arange(classes, dtype=torch.int64) * 7 + 3)  # sparse labels
    targets, rank = ledger.targets()
    weights = torch.ones((world, classes), dtype=torch.int64)
    quota = proportional_split(targets, weights, rank)
    # rows may exceed a rank's capacity by the rounding; trim to exactly full shards
    over = quota.sum(1) - per_rank
    for w in torch.nonzero(over > 0).flatten().tolist():
        cols = torch.nonzero(quota[w] > 0).flatten()[: int(over[w])]
        quota[w, cols] -= 1
    k = classes
    ledger.quota[:, :k] = quota
    ledger.stored[:, :k] = quota
    ledger.n[:, :k] = quota * 10 + 1
    ledger.n_dealt[:, :k] = ledger.n[:, :k]
    ledger.live[:, :k] = True
    ledger.target[:k] = targets
    ledger.class_total[:k] = quota.sum(0)
    ledger.load = quota.sum(1)
    return ledger


def metadata_scaling(rank: int, world: int, cfg: dict) -> List[Dict]:
    from avalanche_distributed_rehearsal.core.metadata import HEADER, StepContext, agree, encode
    from avalanche_distributed_rehearsal.core.sampling import plan_from_totals

    torch.set_num_threads(cfg.get("threads", 1))
    c, r, steps = cfg["c"], cfg["r"], cfg["steps"]
    rows = []
    for n in cfg["sim_worlds"]:
        for classes in cfg["classes"]:
            ledger = steady_ledger(n, classes, cfg["per_rank"])
            labels = torch.tensor(ledger.labels, dtype=torch.int64)
            held = [torch.nonzero(ledger.stored[w, :classes] > 0).flatten() for w in range(n)]
            g = torch.Generator().manual_seed(0)
            message = encode(1, 0, 0, 1, 1, 1, 1, ledger.digest(), StepContext(), 0, [], c)
            times = {"agree": [], "ledger": [], "plan": []}
            for step in range(steps):
                # every rank's candidates: c keys among the classes it holds
                keys = torch.stack([labels[h[torch.randint(0, len(h), (c,), generator=g)]]
                                    for h in held])
                messages = message.unsqueeze(0).repeat(n, 1)
                messages[:, HEADER:] = keys
                messages[:, HEADER - 1] = c
                t0 = time.perf_counter()
                got, got_counts = agree(messages, rank)
                t1 = time.perf_counter()
                ledger.apply(got, got_counts, step, rank)
                t2 = time.perf_counter()
                plan_from_totals(ledger.eligible_per_rank(), r, "uniform", g)
                t3 = time.perf_counter()
                times["agree"].append(t1 - t0)
                times["ledger"].append(t2 - t1)
                times["plan"].append(t3 - t2)
            assert int(ledger.deals) == 0, "the steady state made no deal"
            row = {"world": n, "classes": classes, "c": c, "r": r, "per_rank": cfg["per_rank"],
                   "metadata_bytes_sent": (n - 1) * message.numel() * 8,
                   "metadata_bytes_received": (n - 1) * message.numel() * 8,
                   **{k: summarize(v) for k, v in times.items()}}
            if n * classes <= cfg.get("deal_max", 0):
                start = time.perf_counter()
                ledger.redeal()
                row["deal_seconds"] = time.perf_counter() - start
            rows.append(row)
            del ledger
    return rows
