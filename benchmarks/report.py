"""Targets, Markdown tables and the scaling plot, from the suite's ``results`` dict."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List

from .workloads import VARIANT_TITLES, VARIANTS

STEP_TARGET, ONLINE_TARGET, ONLINE_SPEEDUP, EXCHANGE_TARGET, BYTES_TOLERANCE = 1.05, 1.10, 2.0, 1.25, 0.05


def _ms(s: Dict) -> str:
    return f"{1e3 * s['median']:.3f}" if s and s.get("n") else "-"


def _kib(n: float) -> str:
    return f"{n / 1024:.1f}"


def _target(name: str, value: float, limit: float, op: str, note: str = "") -> Dict:
    met = (value <= limit) if op == "<=" else (value >= limit)
    if isinstance(value, float) and math.isnan(value):
        met = False
    return {"target": name, "value": value, "limit": f"{op} {limit}", "met": bool(met),
            "note": note}


def targets(results: Dict) -> List[Dict]:
    out = []
    for world, per_model in sorted(results.get("step_overhead", {}).items()):
        for model, v in per_model.items():
            if model != "resnet18":
                continue
            ratio = v["ours_async"]["step"]["median"] / v["incremental_b+r"]["step"]["median"]
            out.append(_target(f"step: ours async / incremental b+r, {model}, {world} rank(s)",
                               ratio, STEP_TARGET, "<="))
    for world, o in results.get("online", {}).items():
        t = o["train_call"]
        out.append(_target("online CL: ours async / incremental b+r (mlp, 1 rank)",
                           t["ours_async"]["median"] / t["incremental_b+r"]["median"],
                           ONLINE_TARGET, "<="))
        out.append(_target("online CL: stock ReplayPlugin / ours async (speed-up)",
                           t["stock_replay"]["median"] / t["ours_async"]["median"],
                           ONLINE_SPEEDUP, ">="))
    for world, ranks in sorted(results.get("memory", {}).items()):
        w = int(world)
        ours = max(r["ours_capacity"] for r in ranks)
        mem = results["meta"]["sizes"]["memory"]["mem_size"]
        out.append(_target(f"memory: ours samples per rank / ceil(M / world), {w} rank(s)",
                           ours / math.ceil(mem / w), 1.0, "<=",
                           f"stock holds {max(r['stock_samples'] for r in ranks)} per rank"))
    for world, rows in sorted(results.get("exchange", {}).items()):
        for row in rows:
            out.append(_target(f"exchange / bare all-to-all, {row['shape']} {row['dtype']}, "
                               f"r={row['r']}, {world} ranks", row["ratio"], EXCHANGE_TARGET, "<="))
    scaling = results.get("scaling", {})
    cases = sorted({(row["shape"], row["dtype"]) for rows in scaling.values() for row in rows})
    for shape, dtype in cases:
        for field in ("payload_received", "total_received", "total_sent"):
            values = [row[field] for rows in scaling.values() for row in rows
                      if (row["shape"], row["dtype"]) == (shape, dtype)]
            spread = max(values) / min(values) - 1 if min(values) > 0 else float("nan")
            out.append(_target(f"bytes per rank per step, {field}, {shape} {dtype}, "
                               f"worlds {','.join(sorted(scaling, key=int))}",
                               spread, BYTES_TOLERANCE, "<=", "relative spread max/min - 1"))
    return out


def _table(heading: str, notes: List[str], columns: List[str], rows: List[List]) -> List[str]:
    """A Markdown section: heading, notes, then a table of ``rows`` (cells already text)."""
    out = [heading, ""]
    if notes:
        out += [" ".join(notes), ""]
    out += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _by_world(part: Dict):
    """``(world, row)`` over a part's ``{world: [rows]}``, by increasing world size."""
    for world, rows in sorted(part.items(), key=lambda kv: int(kv[0])):
        for row in rows:
            yield world, row


def markdown(results: Dict) -> str:
    meta = results["meta"]
    m = meta["machine"]
    lines = [f"# Benchmark results{' (smoke sizes)' if meta['smoke'] else ''}", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}, {meta['seconds']} s  ",
             f"Machine: {m.get('cpu', '?')}, {m.get('cpu_count')} cores, "
             f"{m.get('memory_gib', '?')} GiB, {m.get('platform')}; torch {m.get('torch')}, "
             f"avalanche {m.get('avalanche', '?')}; device **{m.get('device')}**"
             f"{', ' + m['gpu'] if 'gpu' in m else ''}  ",
             f"Load average at start / end: {meta['load_average_start']} / "
             f"{meta['load_average_end']}", ""]
    if meta.get("skipped"):
        lines += ["Skipped: " + "; ".join(f"{k} ({v})" for k, v in meta["skipped"].items()), ""]
    lines += _table("## Targets", [], ["target", "value", "limit", "met"],
                    [[t["target"], f"{t['value']:.3f}", t["limit"], "yes" if t["met"] else "**no**"]
                     for t in results.get("targets", [])])

    so = results.get("step_overhead", {})
    if so:
        cfg = meta["sizes"]["step_overhead"]
        rows = []
        for world, per_model in sorted(so.items()):
            for model, v in per_model.items():
                base = v["incremental_b+r"]["step"]["median"]
                rows += [[model, world, VARIANT_TITLES[name], _ms(v[name]["step"]),
                          f"{v[name]['step']['median'] / base:.3f}", _ms(v[name]["amortised"])]
                         for name in VARIANTS]
        lines += _table("## 1. Training-step overhead (Avalanche `Naive`, class-incremental)",
                        [f"b={cfg['b']}, r={cfg['r']}, c={cfg['c']}, M={cfg['mem_size']}, inputs "
                         f"{'x'.join(map(str, cfg['shape']))}; median per-step ms (max over "
                         "ranks) and the ratio to (b), both from the same run; amortised = a "
                         "whole `train()` call / its steps."],
                        ["model", "ranks", "variant", "step ms", "/ (b)", "amortised ms"], rows)
    for world, o in results.get("online", {}).items():
        cfg = meta["sizes"]["online"]
        base = o["train_call"]["incremental_b+r"]["median"]
        lines += _table(
            "## Online continual learning (`split_online_stream`, one `train()` per "
            f"experience, {cfg['model']}, {world} rank)",
            [f"b={cfg['b']}, r={cfg['r']}, M={cfg['mem_size']}, {o['experiences']} experiences "
             f"({cfg['warmup']} warm-up); median ms per `train()` call."],
            ["variant", "ms per train()", "/ (b)", "buffer samples at end"],
            [[VARIANT_TITLES[name], _ms(o["train_call"][name]),
              f"{o['train_call'][name]['median'] / base:.3f}", o["buffer_samples"].get(name, "")]
             for name in VARIANTS])
    mem = results.get("memory", {})
    if mem:
        cfg = meta["sizes"]["memory"]
        lines += _table(
            f"## Buffer memory per rank (M={cfg['mem_size']}, "
            f"{'x'.join(map(str, cfg['shape']))} float32)", [],
            ["ranks", "ours samples/rank (max)", "ours bytes/rank (max)", "stock samples/rank",
             "stock bytes/rank"],
            [[world, max(r["ours_samples"] for r in ranks), f"{max(r['ours_bytes'] for r in ranks):,}",
              max(r["stock_samples"] for r in ranks), f"{max(r['stock_bytes'] for r in ranks):,}"]
             for world, ranks in sorted(mem.items(), key=lambda kv: int(kv[0]))])
    ops = results.get("buffer_ops", {})
    if ops:
        lines += _table(
            "## 2. Buffer operations (torch only, full shards; median ms, max over ranks)", [],
            ["ranks", "sample", "dtype", "per rank", "c", "r", "insert c", "plan",
             "local draw r", "exchange step"],
            [[world, row["shape"], row["dtype"], row["per_rank"], row["c"], row["r"],
              _ms(row["insert"]), _ms(row["plan"]), _ms(row["local_draw"]), _ms(row["exchange"])]
             for world, row in _by_world(ops)])
    ex = results.get("exchange", {})
    if ex:
        lines += _table(
            "## 3. Exchange step against a bare `all_to_all_single` of the same bytes",
            ["bare: into a preallocated receive tensor (the target's reference); bare, fresh: "
             "into a newly allocated one, as `draw` must return new tensors."],
            ["ranks", "sample", "dtype", "r", "KiB received/rank", "ours ms", "bare ms",
             "ratio", "bare, fresh ms", "ratio to fresh"],
            [[world, row["shape"], row["dtype"], row["r"], _kib(row["bytes_received"]),
              _ms(row["ours"]), _ms(row["bare"]), f"{row['ratio']:.2f}",
              _ms(row.get("bare_fresh")),
              f"{row['ratio_fresh']:.2f}" if "ratio_fresh" in row else "-"]
             for world, row in _by_world(ex)])
    sc = results.get("scaling", {})
    if sc:
        lines += _table(
            "## 4. Scaling: bytes per rank per step and exchange time",
            ["Payload includes a rank's rows for itself; off-rank = the part that leaves the "
             "rank. Metadata = all-gathered class counts. Means over steps and ranks."],
            ["ranks", "sample", "dtype", "r", "payload recv B", "payload sent B",
             "off-rank sent B", "metadata recv B", "total recv B", "exchange ms"],
            [[world, row["shape"], row["dtype"], row["r"], f"{row['payload_received']:,.0f}",
              f"{row['payload_sent']:,.0f}", f"{row['off_rank_sent']:,.0f}",
              f"{row['metadata_received']:,.0f}", f"{row['total_received']:,.0f}",
              _ms(row["exchange"]) + (" (oversubscribed)" if row.get("oversubscribed") else "")]
             for world, row in _by_world(sc)])
    return "\n".join(lines)


def plot(results: Dict, path: str) -> bool:
    """Bytes per rank per step and exchange time against the world size; False without matplotlib."""
    sc = results.get("scaling", {})
    if not sc:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    worlds = sorted(sc, key=int)
    cases = sorted({(row["shape"], row["dtype"]) for rows in sc.values() for row in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for shape, dtype in cases:
        def series(key, sub=None):
            vals = []
            for w in worlds:
                row = next(r for r in sc[w] if (r["shape"], r["dtype"]) == (shape, dtype))
                vals.append(row[key][sub] if sub else row[key])
            return vals
        xs = [int(w) for w in worlds]
        ax1.plot(xs, [v / 1024 for v in series("total_received")], "o-",
                 label=f"{shape} {dtype}: received")
        ax1.plot(xs, [v / 1024 for v in series("off_rank_sent")], "x--",
                 label=f"{shape} {dtype}: off-rank sent")
        ax2.plot(xs, [1e3 * v for v in series("exchange", "median")], "o-", label=f"{shape} {dtype}")
    ax1.set(xlabel="world size", ylabel="KiB per rank per step", xscale="log", yscale="log",
            title="Bytes per rank per step")
    ax2.set(xlabel="world size", ylabel="ms (median, max over ranks)", xscale="log",
            title="Exchange step time (CPU-oversubscribed beyond the core count)")
    for ax in (ax1, ax2):
        ax.set_xticks([int(w) for w in worlds], [str(w) for w in worlds])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(results: Dict, out: str) -> List[str]:
    paths = [os.path.join(out, "results.json"), os.path.join(out, "results.md")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=1, sort_keys=False)
    with open(paths[1], "w") as f:
        f.write(markdown(results) + "\n")
    png = os.path.join(out, "scaling.png")
    if plot(results, png):
        paths.append(png)
    return paths
