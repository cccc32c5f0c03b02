"""Targets, Markdown tables and the scaling plot, from the suite's ``results`` dict."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

from avalanche_distributed_rehearsal.core.overlap import median_error

from .timing import ratio as median_ratio
from .workloads import VARIANT_TITLES, VARIANTS

STEP_TARGET, ONLINE_TARGET, ONLINE_SPEEDUP, EXCHANGE_TARGET = 1.05, 1.10, 2.0, 1.25
STEP_OVER_BARE, HOST_OVER_TORCHRL, HOST_OVER_FLOOR = 2.0, 0.5, 4.0


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


def _relative_error(s: Dict) -> float:
    """The standard error of a :func:`~.timing.summarize` median, relative to it: from
    its quartiles, as ``async_mode="auto"`` estimates it
    (:func:`~avalanche_distributed_rehearsal.core.overlap.median_error`)."""
    if s["n"] < 2 or not s["median"] > 0:
        return float("nan")
    return median_error(s["p25"], s["p75"], s["n"]) / s["median"]


def _auto_choices(chooser) -> str:
    """What ``async_mode="auto"`` chose, in words (see ``workloads.auto_choices``)."""
    if not chooser:
        return "-"
    if not chooser["choices"]:
        return "no probe ended yet (warm-up or first probe)"
    return (f"{chooser['choices']} probe(s), {chooser['early_ends']} ended early; the last "
            f"chose {chooser['chosen']}, held {chooser['held']} steps")


def _same_as_sync(mode: Dict, sync: Dict, again: Optional[Dict],
                  names: str = "(g) sync again / (d) sync") -> str:
    """The note of an async / sync target: twice the ratio's standard error (from both
    medians' spreads), and the same ratio for two identical sync variants (A/A, ``names``),
    where the run has them."""
    two_se = 2 * mode["median"] / sync["median"] * math.hypot(_relative_error(mode),
                                                              _relative_error(sync))
    note = f"2 SE of the ratio = {two_se:.3f}"
    if again is None:
        return note
    return f"{note}; A/A: {names} = {again['median'] / sync['median']:.3f}"


def _gpu_targets(world: str, run: Dict) -> List[Dict]:
    """The GPU rows of the step-cost issue, from the ``gpu_step`` part."""
    out = []
    for model, v in run["models"].items():
        step, trace = v["step"], v["trace"]
        base = step["incremental_b+r"]
        shards = [n.split("@")[1] for n in step if n.startswith("ours_sync@")]
        for shard in shards:
            sync = step[f"ours_sync@{shard}"]
            again = step.get(f"ours_sync_again@{shard}")
            where = f"{model}, {shard} shard, {world} rank(s)"
            out.append(_target(f"gpu_step: ours (auto) / incremental b+r, {where}",
                               median_ratio(step[f"ours_auto@{shard}"], base), v["workload"]["target"],
                               "<="))
            for mode in ("auto", "async"):
                out.append(_target(f"gpu_step: ours {mode} / ours sync, {where}",
                                   median_ratio(step[f"ours_{mode}@{shard}"], sync), 1.0, "<=",
                                   _same_as_sync(step[f"ours_{mode}@{shard}"], sync, again,
                                                 "sync again / sync")))
            t = trace[f"ours_async@{shard}"]
            out.append(_target(f"gpu_step: host waits per step on the training thread, ours async - "
                               f"incremental b+r, {where}",
                               t["training_thread_per_step"]
                               - trace["incremental_b+r"]["training_thread_per_step"], 0.0, "<=",
                               f"counted: {', '.join(t['counted'])}; other threads (the worker) "
                               f"{t['other_threads_per_step']:.2f} per step"))
    return out


def targets(results: Dict) -> List[Dict]:
    out = []
    for world, per_model in sorted(results.get("step_overhead", {}).items()):
        for model, v in per_model.items():
            if model != "resnet18":
                continue
            ratio = v["ours_auto"]["step"]["median"] / v["incremental_b+r"]["step"]["median"]
            out.append(_target(f"step: ours (auto) / incremental b+r, {model}, {world} rank(s)",
                               ratio, STEP_TARGET, "<="))
    for world, per_model in sorted(results.get("step_overhead", {}).items()):
        for model, v in per_model.items():
            sync = v["ours_sync"]["step"]
            for mode in ("ours_auto", "ours_async"):
                out.append(_target(f"step: ours {mode[5:]} / ours sync, {model}, {world} rank(s)",
                                   v[mode]["step"]["median"] / sync["median"], 1.0, "<=",
                                   _same_as_sync(v[mode]["step"], sync,
                                                 v["ours_sync_again"]["step"])))
    for world, o in results.get("online", {}).items():
        t = o["train_call"]
        out.append(_target("online CL: ours (auto) / incremental b+r (mlp, 1 rank)",
                           t["ours_auto"]["median"] / t["incremental_b+r"]["median"],
                           ONLINE_TARGET, "<="))
        out.append(_target("online CL: stock ReplayPlugin / ours (auto) (speed-up)",
                           t["stock_replay"]["median"] / t["ours_auto"]["median"],
                           ONLINE_SPEEDUP, ">="))
        for mode in ("ours_auto", "ours_async"):
            out.append(_target(f"online CL: ours {mode[5:]} / ours sync",
                               t[mode]["median"] / t["ours_sync"]["median"], 1.0, "<=",
                               _same_as_sync(t[mode], t["ours_sync"], t["ours_sync_again"])))
    for world, ranks in sorted(results.get("memory", {}).items()):
        w = int(world)
        ours = max(r["ours_capacity"] for r in ranks)
        mem = results["meta"]["sizes"]["memory"]["mem_size"]
        out.append(_target(f"memory: ours samples per rank / ceil(M / world), {w} rank(s)",
                           ours / math.ceil(mem / w), 1.0, "<=",
                           f"stock holds {max(r['stock_samples'] for r in ranks)} per rank"))
    for world, rows in sorted(results.get("exchange", {}).items()):
        for row in rows:
            case = f"{row['shape']} {row['dtype']}, r={row['r']}, {world} ranks"
            out.append(_target(f"whole step / bare all-to-all of its records, {case}",
                               row["step_over_bare"], STEP_OVER_BARE, "<="))
            out.append(_target(f"the step's collective / bare all-to-all, {case}",
                               row["exchange_over_bare"], EXCHANGE_TARGET, "<=",
                               "the wait for the slowest rank included"))
            if "aligned_over_bare" in row:
                out.append(_target(f"the step's collective, ranks aligned / bare at that "
                                   f"point, {case}", row["aligned_over_bare"], EXCHANGE_TARGET,
                                   "<=", "each after a barrier, in alternating order: the "
                                   "collective without the skew"))
    for world, hc in results.get("host_cost", {}).items():
        s = hc["step"]
        if hc.get("torchrl"):
            out.append(_target("host time per step: ours (sync) / TorchRL extend + sample",
                               s["ours_sync"]["median"] / s["torchrl"]["median"],
                               HOST_OVER_TORCHRL, "<="))
        out.append(_target("host time per step: ours (sync) / bare copies of the same rows",
                           s["ours_sync"]["median"] / s["floor"]["median"], HOST_OVER_FLOOR, "<="))
        out.append(_target("training-thread time per step: ours async / ours sync",
                           s["ours_async"]["median"] / s["ours_sync"]["median"], 1.0, "<="))
    for world, rows in results.get("metadata_scaling", {}).items():
        for n in sorted({row["world"] for row in rows}):
            per_c = [row for row in rows if row["world"] == n]
            sent = [row["metadata_bytes_sent"] for row in per_c]
            out.append(_target(f"metadata bytes per rank per step, {n} ranks, classes "
                               f"{'/'.join(str(row['classes']) for row in per_c)}: max / min - 1",
                               max(sent) / min(sent) - 1, 0.0, "<=", "flat in the classes"))
    for world, run in sorted(results.get("gpu_step", {}).items()):
        out += _gpu_targets(world, run)
    for world, rows in sorted(results.get("scaling", {}).items(), key=lambda kv: int(kv[0])):
        w = int(world)
        for row in rows:
            if w == 1 or "steps" not in row:
                continue
            # uniform draws over equal full shards: each of the r draws of a step comes from
            # another rank with probability (w - 1) / w; the rows received from other ranks
            # per step, over steps x ranks draws, against that law (a z-score)
            draws = row["r"] * row["steps"] * w
            p = (w - 1) / w
            got = row["payload_received"] / (row["r"] * row["row_bytes"])
            z = (got - p) / math.sqrt(p * (1 - p) / draws)
            out.append(_target(f"records from other ranks per step / r = (w-1)/w, {row['shape']} "
                               f"{row['dtype']}, {w} ranks: |z|", abs(z), 3.0, "<=",
                               f"{got:.3f} of r against {p:.3f}: bytes per rank do not grow with w"))
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
    lines += _table("## Targets", [], ["target", "value", "limit", "met", "note"],
                    [[t["target"], f"{t['value']:.3f}", t["limit"], "yes" if t["met"] else "**no**",
                      t.get("note", "")] for t in results.get("targets", [])])

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
        lines += _table("What (f) auto chose by the end (its probes are in its times):", [],
                        ["model", "ranks", "auto"],
                        [[model, world, _auto_choices(v["ours_auto"].get("chooser"))]
                         for world, per_model in sorted(so.items())
                         for model, v in per_model.items()])
    for world, o in results.get("online", {}).items():
        cfg = meta["sizes"]["online"]
        base = o["train_call"]["incremental_b+r"]["median"]
        lines += _table(
            "## Online continual learning (`split_online_stream`, one `train()` per "
            f"experience, {cfg['model']}, {world} rank)",
            [f"b={cfg['b']}, r={cfg['r']}, M={cfg['mem_size']}, {o['experiences']} experiences "
             f"({cfg['warmup']} warm-up); median ms per `train()` call. What (f) auto "
             f"chose by the end: {_auto_choices(o.get('auto_chooser'))}."],
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
            "## 3. A whole step against a bare `all_to_all_single` of its records",
            ["step: one synchronous `RehearsalPipeline.augment` (checks, plan, serve, the one "
             "collective carrying every rank's metadata and the records, agreement, insertion, "
             "assembly); collective: that step's exchange stage (the message's assembly, the "
             "wait for the slowest rank, the all-to-all); aligned: a step's all-to-all call "
             "alone after a barrier just before it (no skew); bare there: at that same point "
             "of the step, after a barrier of its own, a bare all-to-all of the records' "
             "bytes (the two in alternating order); bare: the records' bytes only, same "
             "splits, preallocated tensors, after the step. Median ms, slowest rank per "
             "repeat."],
            ["ranks", "sample", "dtype", "r", "KiB of records/rank", "metadata B/rank",
             "step ms", "collective ms", "aligned ms", "bare there ms", "bare ms",
             "step / bare", "collective / bare", "aligned / bare there"],
            [[world, row["shape"], row["dtype"], row["r"], _kib(row["payload_bytes_received"]),
              row["metadata_bytes_per_rank"], _ms(row["step"]), _ms(row["exchange"]),
              _ms(row["aligned"]) if "aligned" in row else "-",
              _ms(row["aligned_bare"]) if "aligned_bare" in row else "-", _ms(row["bare"]),
              f"{row['step_over_bare']:.2f}", f"{row['exchange_over_bare']:.2f}",
              f"{row['aligned_over_bare']:.2f}" if "aligned" in row else "-"]
             for world, row in _by_world(ex)])
    sc = results.get("scaling", {})
    if sc:
        lines += _table(
            "## 4. Scaling: bytes per rank per step and step time",
            ["To and from the *other* ranks only; records = the representatives, metadata = "
             "every rank's header and candidate keys (the step's one collective carries both). "
             "Means over steps and ranks; step: median ms, slowest rank."],
            ["ranks", "sample", "dtype", "r", "records recv B", "records sent B",
             "metadata recv B", "metadata sent B", "step ms"],
            [[world, row["shape"], row["dtype"], row["r"], f"{row['payload_received']:,.0f}",
              f"{row['payload_sent']:,.0f}", f"{row['metadata_received']:,.0f}",
              f"{row['metadata_sent']:,.0f}",
              _ms(row["step"]) + (" (oversubscribed)" if row.get("oversubscribed") else "")]
             for world, row in _by_world(sc)])
    for world, hc in results.get("host_cost", {}).items():
        w = hc["workload"]
        s = hc["step"]
        base = s["ours_sync"]["median"]
        names = [n for n in ("ours_sync", "ours_async", "torchrl", "floor") if n in s]
        lines += _table(
            "## 5. Host time per step of the core (1 rank, CPU)",
            [f"b={w['b']}, c={w['c']}, r={w['r']}, {w['dim']} float32 values + class and task "
             f"labels per sample, M={w['mem_size']}; interleaved steps on full buffers, median "
             "us. ours_async: the training thread's time (the job runs on the worker)."],
            ["variant", "us per step", "/ ours sync"],
            [[n, f"{1e6 * s[n]['median']:.1f}", f"{s[n]['median'] / base:.2f}"] for n in names])
        lines += _table("### Stages of a synchronous step (mean us)", [],
                        list(hc["phases"]) + ["sum"],
                        [[f"{1e6 * v:.1f}" for v in hc["phases"].values()]
                         + [f"{1e6 * sum(hc['phases'].values()):.1f}"]])
        paused = hc.get("paused") or {}
        if paused:
            lines += _table(
                f"### After a pause of {paused['pause_ms']:g} ms (median us per step)",
                ["Each timed step after an untimed sleep, variants interleaved: how much "
                 "slower the same code runs when it follows a pause (as a step follows the "
                 "model's compute or a collective's wait) than back to back."],
                ["variant", "back to back", "after the pause", "paused / back to back"],
                [[n, f"{1e6 * s[n]['median']:.1f}", f"{1e6 * v['median']:.1f}",
                  f"{v['median'] / s[n]['median']:.2f}"] for n, v in paused["step"].items()])
    for world, rows in results.get("metadata_scaling", {}).items():
        lines += _table(
            "## 6. Metadata and host time per step at scale (simulated ledger, steady state)",
            ["One rank's replica of the ledger of N ranks and C classes, every shard full, "
             "c keys per rank per step; median us per step; deal: one re-deal (a structural "
             "step), where run."],
            ["ranks N", "classes C", "metadata sent B/rank", "metadata received B/rank",
             "agree us", "ledger us", "plan us", "deal s"],
            [[row["world"], row["classes"], f"{row['metadata_bytes_sent']:,}",
              f"{row['metadata_bytes_received']:,}", f"{1e6 * row['agree']['median']:.0f}",
              f"{1e6 * row['ledger']['median']:.0f}", f"{1e6 * row['plan']['median']:.0f}",
              f"{row['deal_seconds']:.2f}" if "deal_seconds" in row else "-"] for row in rows])
    for world, run in results.get("gpu_step", {}).items():
        lines += _gpu_tables(world, run, meta["sizes"]["gpu_step"])
    return "\n".join(lines)


def _gpu_tables(world: str, run: Dict, cfg: Dict) -> List[str]:
    lines = []
    counted = ("synchronising CUDA operations (sync debug mode)" if _device_of(run) == "cuda"
               else "host reads of values")
    for model, v in run["models"].items():
        w, step, trace = v["workload"], v["step"], v["trace"]
        base = step["incremental_b+r"]
        lines += _table(
            f"## 7. Training steps on {run.get('gpu', 'the CPU')} ({model}, {world} rank)",
            [f"b={w['b']}, r={w['r']}, c={w['c']}, M={cfg['mem_size']}, inputs "
             f"{'x'.join(map(str, w['shape']))}, experiences of {cfg['steps']} steps "
             f"({cfg['rounds']} rounds after {cfg['warmup_rounds']} warm-up); median ms per "
             f"step. Host waits: {counted} per step in a trace of {cfg['trace_steps']} steps, "
             "on the training thread and on the others (the worker)."],
            ["variant", "ms per step", "/ incremental b+r", "waits, training thread",
             "waits, other threads"],
            [[n, _ms(s), f"{median_ratio(s, base):.3f}",
              f"{trace[n]['training_thread_per_step']:.2f}",
              f"{trace[n]['other_threads_per_step']:.2f}"] for n, s in step.items()])
        lines += ["What auto chose by the end: "
                  + "; ".join(f"{n}: {_auto_choices(c)}" for n, c in v["auto_chooser"].items()),
                  ""]
    return lines


def _device_of(run: Dict) -> str:
    """``"cuda"`` when a ``gpu_step`` run traced a GPU, else ``"cpu"``."""
    return "cuda" if "gpu" in run else "cpu"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(results: Dict, path: str) -> bool:
    """Bytes per rank per step and step time against the world size; False without data."""
    sc = results.get("scaling", {})
    plt = _pyplot()
    if not sc or plt is None:
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
        ax1.plot(xs, [max(v, 1) / 1024 for v in series("payload_received")], "o-",
                 label=f"{shape} {dtype}: records received")
        ax1.plot(xs, [max(v, 1) / 1024 for v in series("metadata_received")], "x--",
                 label=f"{shape} {dtype}: metadata received")
        ax2.plot(xs, [1e3 * v for v in series("step", "median")], "o-", label=f"{shape} {dtype}")
    ax1.set(xlabel="world size", ylabel="KiB per rank per step", xscale="log", yscale="log",
            title="Bytes per rank per step (other ranks)")
    ax2.set(xlabel="world size", ylabel="ms (median, slowest rank)", xscale="log",
            title="Step time (CPU-oversubscribed beyond the core count)")
    for ax in (ax1, ax2):
        ax.set_xticks([int(w) for w in worlds], [str(w) for w in worlds])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_metadata(results: Dict, path: str) -> bool:
    """Metadata bytes and host time per step against N, one line per number of classes."""
    rows = [row for rs in results.get("metadata_scaling", {}).values() for row in rs]
    plt = _pyplot()
    if not rows or plt is None:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    markers = "os^Dv"
    for i, classes in enumerate(sorted({row["classes"] for row in rows})):
        mine = sorted((row for row in rows if row["classes"] == classes), key=lambda r: r["world"])
        xs = [row["world"] for row in mine]
        ax1.plot(xs, [row["metadata_bytes_received"] / 1024 for row in mine],
                 markers[i % 5] + "-", label=f"C = {classes}", alpha=0.8)
        ax2.plot(xs, [1e6 * (row["agree"]["median"] + row["ledger"]["median"]
                             + row["plan"]["median"]) for row in mine],
                 markers[i % 5] + "-", label=f"C = {classes}", alpha=0.8)
    ax1.set(xlabel="ranks N", ylabel="KiB received per rank per step", xscale="log",
            yscale="log", title="Metadata per rank per step (the lines coincide)")
    ax2.set(xlabel="ranks N", ylabel="us per step", xscale="log", yscale="log",
            title="Host time: agreement + ledger + plan")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
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
    png = os.path.join(out, "metadata_scaling.png")
    if plot_metadata(results, png):
        paths.append(png)
    return paths
