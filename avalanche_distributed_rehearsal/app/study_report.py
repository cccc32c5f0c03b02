"""The study's outputs: ``study.json`` (every cell, per seed and summarised), ``study.md``
(tables with mean and spread over seeds, paired comparisons) and the plots.

Reads finished runs through :mod:`.study_grid` and never imports the runner
(:mod:`.study`), so a report can be rebuilt without launching anything.

A **cell** is one method at one setting: (method, scaling, model, world size, rank split,
M, r, sampling), where settings a method ignores are ``None`` (incremental and from
scratch have no M, r or sampling; the stock plugin and ours_local no sampling mode;
ours_local's sampling is ``"local"``); r is the grid's value (over all ranks under strong
scaling, per rank under weak). Its ``per_seed`` entries come from the runs of that
setting. With one rank there is no split: the skewed tables and plots show the one-rank
iid cells (marked), and no one-rank skewed cell exists in ``study.json``.

Paired comparisons (Q1, Q2) subtract, seed by seed, two methods trained in the same run
(same seed, same data, same shuffles), and give the mean difference, its sample standard
deviation, its range and a 95% Student-t interval; a difference whose interval contains
0 is reported as within seed noise.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, List, Optional, Tuple

from .study_grid import (NO_BUFFER, NO_SAMPLING, StudyConfig, environment, load_run, points,
                         write_json_atomic, write_text_atomic)

SCHEMA = 2

#: two-sided 95% Student-t quantiles, by degrees of freedom (1..30); 1.96 beyond
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]

LABELS = {"incremental": "incremental", "from_scratch": "from scratch",
          "stock_replay": "stock, M per rank", "stock_replay_equal": "stock, M/N per rank",
          "ours": "ours (global)", "ours_local": "ours_local"}

#: what each model normalises with, for titles
NORMS = {"mlp": "no normalisation", "cnn": "BatchNorm", "cnn_gn": "GroupNorm",
         "resnet18": "BatchNorm", "resnet18_gn": "GroupNorm"}

#: the per-seed quantities of a cell; bytes per step are means over training steps and ranks
QUANTITIES = ("final_average_accuracy", "average_forgetting", "train_seconds",
              "buffer_bytes_per_rank", "distinct_samples", "payload_sent_per_step", "payload_received_per_step",
              "metadata_sent_per_step", "metadata_received_per_step")


def stats(values: Iterable[float]) -> Dict[str, Optional[float]]:
    """``mean``, ``std`` (sample, n - 1; 0 for one value), ``min``, ``max``, ``n`` and
    ``ci95`` (half-width of the 95% Student-t interval of the mean; None for one value)."""
    v = [float(x) for x in values]
    n = len(v)
    if not n:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "ci95": None}
    mean = sum(v) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    ci = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * std / math.sqrt(n) if n > 1 else None
    return {"mean": mean, "std": std, "min": min(v), "max": max(v), "n": n, "ci95": ci}


def cell_key(method: str, scaling: str, model: str, world: int, split: str, mem: int, r: int,
             sampling: str) -> Tuple[str, str, str, int, str, Optional[int], Optional[int], Optional[str]]:
    if method in NO_BUFFER:
        return (method, scaling, model, world, split, None, None, None)
    if method in NO_SAMPLING:
        return (method, scaling, model, world, split, mem, r,
                "local" if method == "ours_local" else None)
    return (method, scaling, model, world, split, mem, r, sampling)


def cell_id(key) -> str:
    method, scaling, model, world, split, mem, r, sampling = key
    parts = [method, scaling, model, f"N{world}", split]
    if mem is not None:
        parts += [f"M{mem}", f"r{r}"]
    if sampling is not None:
        parts.append(sampling)
    return "|".join(parts)


def _seed_entry(method_result: dict, run_id: str) -> dict:
    t = method_result.get("exchanged_bytes_per_step") or {}
    return {"run": run_id,
            "accuracy_matrix": method_result["accuracy_matrix"],
            "final_average_accuracy": method_result["final_average_accuracy"],
            "average_forgetting": method_result["average_forgetting"],
            "train_seconds": method_result["train_seconds"],
            "buffer_bytes_per_rank": method_result["buffer_bytes_per_rank"],
            "distinct_samples": method_result.get("distinct_samples_all_ranks") or 0,
            "payload_sent_per_step": t.get("payload_sent", 0.0),
            "payload_received_per_step": t.get("payload_received", 0.0),
            "metadata_sent_per_step": t.get("metadata_sent", 0.0),
            "metadata_received_per_step": t.get("metadata_received", 0.0)}


def collect(cfg, runs, root: str) -> Tuple[Dict[tuple, dict], Dict[str, dict]]:
    """The cells (by key) and the run table, from the finished runs' ``run.json``: each
    point of the grid takes its own methods' results from the run that measured it."""
    records = {spec.id: load_run(root, spec, cfg) for spec in runs}
    table: Dict[str, dict] = {}
    for spec in runs:
        record = records[spec.id]
        table[spec.id] = {"status": "done" if record else "pending", "world_size": spec.world,
                          "rank_split": spec.split, "model": spec.model, "seed": spec.seed,
                          "batch_per_rank": spec.batch, "replay_per_rank": spec.replay,
                          "methods": list(spec.methods),
                          "seconds": record["seconds"] if record else None,
                          "finished": record["finished"] if record else None,
                          "load_average": record.get("load_average") if record else None}
    cells: Dict[tuple, dict] = {}
    for point in points(cfg):
        run_id = point.run(cfg).id
        record = records.get(run_id)
        if record is None:
            continue
        for name in point.methods:
            res = record["results"]["methods"][name]
            key = cell_key(name, point.scaling, point.model, point.world, point.split,
                           point.mem_size, point.replay, point.sampling)
            cell = cells.setdefault(key, {
                "id": cell_id(key), "method": name, "scaling": point.scaling,
                "model": point.model, "world_size": point.world,
                "rank_split": point.split, "skew": cfg.skew if point.split == "skewed" else None,
                "mem_size": key[5], "replay_mb": key[6], "sampling": key[7],
                "batch_per_rank": point.per_rank(cfg.batch_sizes[point.scaling]),
                "replay_per_rank": None if key[6] is None else point.per_rank(point.replay),
                "dataset": cfg.dataset, "epochs": cfg.epochs, "lr": cfg.lr,
                "batch_size": cfg.batch_sizes[point.scaling],
                "n_experiences": cfg.n_experiences, "per_seed": {}})
            cell["per_seed"][str(point.seed)] = _seed_entry(res, run_id)
    for cell in cells.values():
        cell["seeds"] = sorted(int(s) for s in cell["per_seed"])
        cell["summary"] = {q: stats(e[q] for e in cell["per_seed"].values()) for q in QUANTITIES}
    return cells, table


def _lookup(cells, method, scaling, model, world, split, mem, r, sampling):
    """The cell, with one rank's skewed setting read from the iid cell (no split there)."""
    if world == 1 and split != "iid":
        split = "iid"
    return cells.get(cell_key(method, scaling, model, world, split, mem, r, sampling))


def paired(cells, a: str, b: str, cfg, quantity: str = "final_average_accuracy") -> List[dict]:
    """Seed-by-seed ``a - b`` of ``quantity`` for every setting where both ran."""
    out = []
    for scaling in cfg.scalings:
        for model in cfg.models:
            for split in cfg.rank_splits:
                for world in cfg.world_sizes:
                    if world == 1 and split != "iid":
                        continue
                    for mem in cfg.mem_sizes:
                        for r in cfg.replay_sizes[scaling]:
                            for sampling in cfg.samplings:
                                setting = (scaling, model, world, split, mem, r, sampling)
                                ca = _lookup(cells, a, *setting)
                                cb = _lookup(cells, b, *setting)
                                if ca is None or cb is None:
                                    continue
                                seeds = sorted(set(ca["per_seed"]) & set(cb["per_seed"]), key=int)
                                if not seeds:
                                    continue
                                diffs = {s: ca["per_seed"][s][quantity] - cb["per_seed"][s][quantity]
                                         for s in seeds}
                                st = stats(diffs.values())
                                verdict = ("n/a (one seed)" if st["ci95"] is None else
                                           "within seed noise" if abs(st["mean"]) <= st["ci95"] else
                                           (f"{a} higher" if st["mean"] > 0 else f"{b} higher"))
                                out.append({"a": ca["id"], "b": cb["id"], "quantity": quantity,
                                            "scaling": scaling, "model": model,
                                            "world_size": world, "rank_split": split,
                                            "mem_size": mem, "replay_mb": r, "sampling": sampling,
                                            "per_seed": diffs, **st, "verdict": verdict})
    return out


def build(cfg, runs, root: str, invocations: List[dict]) -> dict:
    """The ``study.json`` document."""
    import dataclasses

    cells, table = collect(cfg, runs, root)
    loads = [t["load_average"] for t in table.values() if t["load_average"]]
    env = environment()
    env.update(threads_per_rank=cfg.threads,
               oversubscribed_world_sizes=[w for w in cfg.world_sizes
                                           if w * cfg.threads > (env["cpu_count"] or 1)],
               load_average_at_run_end={"min_1min": min(l[0] for l in loads),
                                        "max_1min": max(l[0] for l in loads)} if loads else None)
    order = list(LABELS)
    return {
        "schema": SCHEMA,
        "complete": all(t["status"] == "done" for t in table.values()),
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),  # tuples as lists
        "machine": env,
        "note": ("train_seconds is the slowest rank's time in strategy.train; with more "
                 "ranks x threads than cores the ranks share the CPU, so train time there "
                 "is not a scaling measurement"),
        "invocations": invocations,
        "runs": table,
        "cells": sorted(cells.values(), key=lambda c: (
            list(cfg.scalings).index(c["scaling"]), list(cfg.models).index(c["model"]),
            c["rank_split"], order.index(c["method"]) if c["method"] in order else 99,
            c["mem_size"] or 0, c["replay_mb"] or 0, c["sampling"] or "", c["world_size"])),
        "comparisons": {
            "ours_minus_stock_replay_equal": paired(cells, "ours", "stock_replay_equal", cfg),
            "ours_minus_stock_replay": paired(cells, "ours", "stock_replay", cfg),
            "global_minus_local": paired(cells, "ours", "ours_local", cfg),
        },
    }


# ---------------------------------------------------------------------------- markdown
def _pm(s: dict, scale: float = 1.0, digits: int = 1) -> str:
    if not s or s["mean"] is None:
        return "-"
    if s["n"] == 1:
        return f"{s['mean'] * scale:.{digits}f}"
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def _kib(s: dict) -> str:
    if not s or s["mean"] is None:
        return "-"
    m = s["mean"] / 1024
    return f"{m:.1f}" if s["max"] == s["min"] else f"{m:.1f} ({s['min'] / 1024:.1f}-{s['max'] / 1024:.1f})"


def _rows(doc, scaling: Optional[str] = None) -> List[tuple]:
    """Distinct (method, M, r, sampling) rows in report order (of ``scaling`` only, if given)."""
    rows = []
    for c in doc["cells"]:
        if scaling is not None and c["scaling"] != scaling:
            continue
        row = (c["method"], c["mem_size"], c["replay_mb"], c["sampling"])
        if row not in rows:
            rows.append(row)
    order = list(LABELS)
    return sorted(rows, key=lambda x: (order.index(x[0]) if x[0] in order else 99,
                                       x[1] or 0, x[2] or 0, x[3] or ""))


def _row_label(row, doc, scaling: str) -> str:
    method, mem, r, sampling = row
    cfg = doc["config"]
    label = LABELS.get(method, method)
    extra = []
    if mem is not None and len(cfg["mem_sizes"]) > 1:
        extra.append(f"M={mem}")
    if r is not None and len(cfg["replay_sizes"][scaling]) > 1:
        extra.append(f"r={r}")
    if method == "ours" and len(cfg["samplings"]) > 1:
        extra.append(sampling)
    return label + (f" ({', '.join(extra)})" if extra else "")


def _cell(doc, row, world, split, scaling, model):
    method, mem, r, sampling = row
    if world == 1 and split != "iid":
        split = "iid"
    for c in doc["cells"]:
        if (c["method"], c["mem_size"], c["replay_mb"], c["sampling"], c["world_size"],
                c["rank_split"], c["scaling"], c["model"]) == (
                    method, mem, r, sampling, world, split, scaling, model):
            return c
    return None


def _model_name(model: str) -> str:
    return f"{model} ({NORMS[model]})" if model in NORMS else model


def _split_name(doc, split: str) -> str:
    return split + (f" (skew {doc['config']['skew']})" if split == "skewed" else "")


def _table(doc, split, scaling, model, quantity, fmt, title) -> List[str]:
    worlds = doc["config"]["world_sizes"]
    mark = " †" if split != "iid" and 1 in worlds else ""
    head = "| method | " + " | ".join(f"N={w}{mark if w == 1 else ''}" for w in worlds) + " |"
    lines = [f"**{title}**", "", head, "|---|" + "---:|" * len(worlds)]
    for row in _rows(doc, scaling):
        cells = [_cell(doc, row, w, split, scaling, model) for w in worlds]
        if all(c is None for c in cells):
            continue
        lines.append(f"| {_row_label(row, doc, scaling)} | " + " | ".join(
            fmt(c["summary"][quantity]) if c else "-" for c in cells) + " |")
    return lines + [""]


def _comparison(rows: List[dict], title: str) -> List[str]:
    lines = [f"**{title}** (percentage points of final average accuracy, seed by seed in "
             "the same run; mean ± std, [min, max], half-width of the 95% t-interval of the "
             "mean; \"within seed noise\" when that interval contains 0. Each row is its own "
             "test: among many rows at 95%, about one in twenty excludes 0 by chance)", "",
             "| scaling | model | split | N | M | r | n seeds | mean ± std | [min, max] | 95% CI | verdict |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in rows:
        ci = "-" if c["ci95"] is None else f"±{c['ci95'] * 100:.1f}"
        lines.append(f"| {c['scaling']} | {c['model']} | {c['rank_split']} | {c['world_size']} "
                     f"| {c['mem_size']} | {c['replay_mb']} "
                     f"| {c['n']} | {c['mean'] * 100:+.1f} ± {c['std'] * 100:.1f} "
                     f"| [{c['min'] * 100:+.1f}, {c['max'] * 100:+.1f}] | {ci} | {c['verdict']} |")
    return lines + [""]


def _scaling_sentence(cfg, scaling: str) -> str:
    b, r = cfg["batch_sizes"][scaling], cfg["replay_sizes"][scaling]
    if scaling == "strong":
        return (f"Strong scaling: b = {b} new samples and r = {r} representatives per step "
                "over all ranks (b / N and r / N per rank): every N makes the same SGD steps.")
    return (f"Weak scaling: b = {b} new samples and r = {r} representatives per step and "
            "rank: N ranks make N times larger, N times fewer steps.")


def markdown(doc: dict) -> str:
    cfg, mach = doc["config"], doc["machine"]
    last = doc["invocations"][-1] if doc["invocations"] else {}
    acc = lambda s: _pm(s, 100)  # noqa: E731
    lines = [
        f"# Trade-off study: {cfg['dataset']}, {cfg['n_experiences']} experiences, "
        f"{cfg['epochs']} epochs per experience, SGD learning rate {cfg.get('lr', StudyConfig.lr)}",
        "",
        *[x for s in cfg["scalings"] for x in (_scaling_sentence(cfg, s), "")],
        f"World sizes {cfg['world_sizes']}, models {cfg['models']}, M {cfg['mem_sizes']}, "
        f"global sampling {cfg['samplings']}, splits {cfg['rank_splits']} (skew {cfg['skew']}), "
        f"seeds {cfg['seeds']}. {'Complete.' if doc['complete'] else 'INCOMPLETE: some runs are missing.'}",
        "",
        f"Machine: {mach['cpu_count']} CPU cores, {mach['processor']}, torch {mach['torch']}, "
        f"{mach['gpus']} GPU(s); {mach['threads_per_rank']} thread(s) per rank; load average "
        f"at the start of the last invocation {last.get('load_average_start')}, at its end "
        f"{last.get('load_average_end')}.",
    ]
    if len(cfg["scalings"]) > 1:
        lines += ["", "Points of both scalings that give the main job the same per-rank b and r "
                  "share one run (each cell's per-seed entries name it), so their rows repeat "
                  "the same numbers."]
    if any(NORMS.get(m) == "BatchNorm" for m in cfg["models"]):
        lines += ["", "BatchNorm under DDP: each rank normalises its own mini-batch (its new "
                  "samples and the representatives it replays) with its own batch statistics "
                  "(no SyncBatchNorm); evaluation uses rank 0's running statistics."]
    if mach["oversubscribed_world_sizes"]:
        lines += ["", f"With {mach['oversubscribed_world_sizes']} ranks the ranks oversubscribe "
                  "the cores: train time there measures a shared CPU, not scaling."]
    if any(s != "iid" for s in cfg["rank_splits"]) and 1 in cfg["world_sizes"]:
        lines += ["", "† one rank has no split: the skewed tables repeat the one-rank iid runs."]
    lines.append("")
    for scaling in cfg["scalings"]:
        for model in cfg["models"]:
            for split in cfg["rank_splits"]:
                lines += [f"## {_split_name(doc, split)} split, {_model_name(model)}, "
                          f"{scaling} scaling", ""]
                for quantity, fmt, title in (
                        ("final_average_accuracy", acc, "Final average accuracy (%), mean ± std over seeds"),
                        ("average_forgetting", acc, "Average forgetting (%), mean ± std over seeds"),
                        ("train_seconds", lambda s: _pm(s, 1, 1), "Train wall time (s, slowest rank), mean ± std"),
                        ("buffer_bytes_per_rank", _kib, "Buffer memory per rank (KiB; range over seeds when it varies)"),
                        ("distinct_samples", lambda s: _pm(s, 1, 0), "Distinct samples stored over all ranks (replicas count once)"),
                        ("payload_sent_per_step", _kib, "Payload sent to other ranks per step and rank (KiB)"),
                        ("metadata_received_per_step", _kib, "Metadata received from other ranks per step and rank (KiB)")):
                    lines += _table(doc, split, scaling, model, quantity, fmt, title)
    comps = doc["comparisons"]
    lines += ["## Paired comparisons", ""]
    lines += _comparison(comps["ours_minus_stock_replay_equal"],
                         "Q1: ours minus the stock plugin at equal total memory (M/N per rank)")
    lines += _comparison(comps["ours_minus_stock_replay"],
                         "ours minus the stock plugin with M per rank (N times our memory)")
    lines += _comparison(comps["global_minus_local"],
                         "Q2: global minus local sampling (Q4: the same by model, BatchNorm against GroupNorm)")
    lines += ["## Runs", "", "| run | status | seconds | load (1, 5, 15 min) at its end |",
              "|---|---|---:|---|"]
    for run_id, t in doc["runs"].items():
        secs = "-" if t["seconds"] is None else f"{t['seconds']:.0f}"
        lines.append(f"| {run_id} | {t['status']} | {secs} | {t['load_average'] or '-'} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plots
def _series(doc, split, scaling, model, quantity, scale=1.0):
    """(row, xs, means, stds) for every row with at least one cell in the panel."""
    out = []
    for row in _rows(doc, scaling):
        xs, ms, ss = [], [], []
        for w in doc["config"]["world_sizes"]:
            c = _cell(doc, row, w, split, scaling, model)
            if c is None or c["summary"][quantity]["mean"] is None:
                continue
            s = c["summary"][quantity]
            xs.append(w)
            ms.append(s["mean"] * scale)
            ss.append(s["std"] * scale)
        if xs:
            out.append((row, xs, ms, ss))
    return out


#: a marker and a line style per report row, so lines that coincide stay visible
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_STYLES = ("-", "--", "-.", ":")


def _style(doc, row, scaling) -> dict:
    i = _rows(doc, scaling).index(row)
    return {"marker": _MARKERS[i % len(_MARKERS)], "linestyle": _STYLES[i % len(_STYLES)],
            "markersize": 7 - (i % 3)}


def _axes(n_rows, n_cols):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5.2 * n_cols, 3.8 * n_rows), squeeze=False)
    return plt, fig, axes


def _world_axis(ax, doc):
    ws = doc["config"]["world_sizes"]
    ax.set_xscale("log", base=2)
    ax.set_xticks(ws)
    ax.set_xticklabels([str(w) for w in ws])
    ax.set_xlabel("ranks N")
    ax.grid(alpha=0.3)


def _panels(doc) -> List[Tuple[str, str]]:
    """The (scaling, model) rows of a per-split figure (its columns are the splits)."""
    cfg = doc["config"]
    return [(s, m) for s in cfg["scalings"] for m in cfg["models"]]


def _panel_title(doc, split, scaling, model) -> str:
    return f"{_split_name(doc, split)} split, {_model_name(model)}\n{scaling} scaling"


def _per_split_plot(doc, path, quantity, ylabel, scale=1.0, ylim=None):
    """One panel per (scaling, model) row and split column: ``quantity`` against N."""
    splits, panels = doc["config"]["rank_splits"], _panels(doc)
    plt, fig, axes = _axes(len(panels), len(splits))
    for (scaling, model), ax_row in zip(panels, axes):
        for ax, split in zip(ax_row, splits):
            for row, xs, ms, ss in _series(doc, split, scaling, model, quantity, scale):
                ax.errorbar(xs, ms, yerr=ss, capsize=3, label=_row_label(row, doc, scaling),
                            **_style(doc, row, scaling))
            _world_axis(ax, doc)
            ax.set_ylabel(ylabel)
            ax.set_title(_panel_title(doc, split, scaling, model), fontsize=9)
            if ylim:
                ax.set_ylim(*ylim)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(doc, path):
    """Buffer bytes per rank (KiB) against N, then one panel of traffic per step and rank
    per scaling (the first model and split: neither changes a row's bytes)."""
    cfg = doc["config"]
    split, model = cfg["rank_splits"][0], cfg["models"][0]
    plt, fig, axes = _axes(1, 1 + len(cfg["scalings"]))
    axes = axes[0]
    first = cfg["scalings"][0]
    for row, xs, ms, _ in _series(doc, split, first, model, "buffer_bytes_per_rank", 1 / 1024):
        if row[0] in ("incremental", "from_scratch"):
            continue
        axes[0].plot(xs, ms, label=_row_label(row, doc, first), **_style(doc, row, first))
    axes[0].set_ylabel("buffer memory per rank (KiB)")
    axes[0].set_title("memory per rank", fontsize=9)
    for ax, scaling in zip(axes[1:], cfg["scalings"]):
        for q, style in (("payload_sent_per_step", "-"), ("metadata_received_per_step", "--")):
            for row, xs, ms, _ in _series(doc, split, scaling, model, q, 1 / 1024):
                if row[0] not in ("ours", "ours_local"):
                    continue
                ax.plot(xs, ms, linestyle=style, marker=_style(doc, row, scaling)["marker"],
                        label=f"{_row_label(row, doc, scaling)}: "
                              f"{q.replace('_per_step', '').replace('_', ' ')}")
        ax.set_ylabel("KiB per step and rank")
        ax.set_title(f"buffer traffic per step, {scaling} scaling (stock plugin: none)", fontsize=9)
    for ax in axes:
        _world_axis(ax, doc)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_memory(doc, path):
    """Final accuracy against buffer memory per rank, one point per cell (marker size ~ N)."""
    splits, panels = doc["config"]["rank_splits"], _panels(doc)
    plt, fig, axes = _axes(len(panels), len(splits))
    colours = {}
    for (scaling, model), ax_row in zip(panels, axes):
        for ax, split in zip(ax_row, splits):
            for row in _rows(doc, scaling):
                xs, ys, sizes = [], [], []
                for w in doc["config"]["world_sizes"]:
                    c = _cell(doc, row, w, split, scaling, model)
                    if c is None or c["summary"]["final_average_accuracy"]["mean"] is None:
                        continue
                    xs.append(c["summary"]["buffer_bytes_per_rank"]["mean"] / 1024)
                    ys.append(c["summary"]["final_average_accuracy"]["mean"] * 100)
                    sizes.append(14 * w)
                if not xs:
                    continue
                label = _row_label(row, doc, scaling)
                pts = ax.scatter(xs, ys, s=sizes, alpha=0.7, label=label, color=colours.get(label))
                colours[label] = pts.get_facecolor()[0]
                for x, y, w in zip(xs, ys, [s // 14 for s in sizes]):
                    ax.annotate(str(w), (x, y), fontsize=6, ha="center", va="center")
            ax.set_xlabel("buffer memory per rank (KiB)")
            ax.set_ylabel("final avg. accuracy (%)")
            ax.set_title(_panel_title(doc, split, scaling, model) + " (numbers on points: N)",
                         fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = ("accuracy_vs_world.png", "memory_traffic_vs_world.png", "train_time_vs_world.png",
         "accuracy_vs_memory.png")


def write_study(cfg, runs, root: str, invocation: dict) -> List[str]:
    """Write ``study.json``, ``study.md`` and (with ``cfg.plots``) the plots into ``root``,
    appending ``invocation`` to the history kept in the previous ``study.json``."""
    path = os.path.join(root, "study.json")
    history: List[dict] = []
    try:
        with open(path) as f:
            history = list(json.load(f).get("invocations", []))
    except (OSError, ValueError):
        pass
    doc = build(cfg, runs, root, history + [invocation])
    write_json_atomic(path, doc)
    paths = [path, os.path.join(root, "study.md")]
    write_text_atomic(paths[1], markdown(doc))
    if cfg.plots and doc["cells"]:
        p = [os.path.join(root, name) for name in PLOTS]
        _per_split_plot(doc, p[0], "final_average_accuracy", "final avg. accuracy (%)", 100,
                        ylim=(0, 100))
        plot_memory(doc, p[1])
        _per_split_plot(doc, p[2], "train_seconds", "train wall time (s, slowest rank)")
        plot_accuracy_vs_memory(doc, p[3])
        paths += p
    return paths
