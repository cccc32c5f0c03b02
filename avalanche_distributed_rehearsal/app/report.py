"""Turn the results dict of :func:`experiment.run` into a Markdown table, ``results.json``
and PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
import os
from typing import Dict, List

LABELS = {"incremental": "incremental (no replay)", "from_scratch": "from scratch (upper bound)",
          "stock_replay": "stock ReplayPlugin", "stock_replay_equal": "stock ReplayPlugin, M / N per rank",
          "ours": "ours (DistributedReplayPlugin)", "ours_local": "ours, rank-local sampling",
          "stock_der": "stock DER (Avalanche)", "der": "ours: DistributedDER",
          "stock_er_ace": "stock ER-ACE (Avalanche)", "er_ace": "ours: DistributedERACE"}


def _bytes(n: int) -> str:
    if not n:
        return "0"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summary_table(results: Dict) -> str:
    """One row per method: final average accuracy and average forgetting (percent), training
    wall time (slowest rank), overhead against incremental, buffer bytes per rank, and
    payload bytes a rank sends to other ranks per step (mean over ranks; 0 without our buffer)."""
    rows = ["| method | final avg. accuracy (%) | avg. forgetting (%) | train wall time (s) "
            "| overhead vs incremental | buffer bytes per rank | payload sent per step |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in results["methods"].items():
        overhead = m["overhead_vs_incremental"]
        overhead = "n/a" if overhead is None else f"{overhead * 100:+.0f}%"
        rows.append(f"| {LABELS.get(name, name)} | {m['final_average_accuracy'] * 100:.1f} "
                    f"| {m['average_forgetting'] * 100:.1f} | {m['train_seconds']:.1f} "
                    f"| {overhead} | {_bytes(m['buffer_bytes_per_rank'])} "
                    f"| {_bytes(round((m.get('exchanged_bytes_per_step') or {}).get('payload_sent', 0)))} |")
    return "\n".join(rows)


def matrix_table(matrix: List[List[float]]) -> str:
    """``R[i][j]`` in percent: row = after training on experience i, column = test experience j."""
    n = len(matrix[0])
    rows = ["| after \\ on | " + " | ".join(f"exp {j}" for j in range(n)) + " |",
            "|---|" + "---:|" * n]
    for i, row in enumerate(matrix):
        rows.append(f"| exp {i} | " + " | ".join(f"{v * 100:.1f}" for v in row) + " |")
    return "\n".join(rows)


def markdown_report(results: Dict) -> str:
    """The whole report: settings line, summary table, one accuracy matrix per method."""
    c, mach = results["config"], results["machine"]
    split = c.get("rank_split", "iid") + (f" (skew {c['skew']})" if c.get("rank_split") == "skewed" else "")
    extras = "".join([", augmented" if c.get("augment") else "",
                      ", uint8 inputs" if c.get("store_dtype") == "uint8" else ""])
    parts = [f"## Class-incremental {c['dataset']}: {results['n_experiences']} experiences, "
             f"{results['world_size']} rank(s), {split} split, M = {c['mem_size']}, seed {c['seed']}"
             f"{extras}",
             f"{mach['cpu_count']} CPU cores, torch {mach['torch']}, {mach['device']}; "
             f"total {results['total_seconds']:.1f} s", "", summary_table(results)]
    for name, m in results["methods"].items():
        parts += ["", f"### Accuracy matrix (%): {LABELS.get(name, name)}", "",
                  matrix_table(m["accuracy_matrix"])]
    return "\n".join(parts)


def plot_title(results: Dict) -> str:
    """What every plot of a run says it shows: data set, N, M, seed, split, model."""
    c = results["config"]
    split = c.get("rank_split", "iid") + (f" (skew {c['skew']})" if c.get("rank_split") == "skewed" else "")
    return (f"class-incremental {c['dataset']}, {results['n_experiences']} experiences: "
            f"N = {results['world_size']} rank(s), M = {c['mem_size']}, seed {c['seed']}, "
            f"{split} split, {c.get('model', 'mlp')}")


#: a marker, line style and size per method, so that methods whose curves coincide stay
#: visible (a larger hollow marker under a smaller filled one)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_STYLES = ("-", "--", "-.", ":")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_curves(results: Dict, path: str) -> None:
    """Average accuracy on the experiences seen so far after each experience, per method
    (each method's points shifted a little sideways, so that equal values stay apart).
    When two or more methods end above 50 % and lie within 40 points, a second panel
    zooms in on them."""
    plt = _pyplot()
    methods = list(results["methods"].items())
    curves = {name: [v * 100 for v in m["accuracy_curve"]] for name, m in methods}
    top = [c for c in curves.values() if c[-1] > 50]
    low = min((min(c) for c in top), default=0.0)
    zoom = len(top) > 1 and 100 - low < 40
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(12 if zoom else 7, 4.8), squeeze=False)
    axes = axes[0]
    for ax_i, ax in enumerate(axes):
        for k, (name, _) in enumerate(methods):
            curve = curves[name]
            if ax_i == 1 and curve[-1] <= 50:
                continue
            size = 11 - 5 * k / max(1, len(methods) - 1)  # first methods biggest: later ones on top
            dodge = 0.06 * (k - (len(methods) - 1) / 2)  # side by side where values coincide
            ax.plot([i + 1 + dodge for i in range(len(curve))], curve,
                    marker=_MARKERS[k % len(_MARKERS)], linestyle=_STYLES[k % len(_STYLES)],
                    markersize=size, linewidth=1.6, markeredgewidth=1.6,
                    markerfacecolor="none" if k % 2 == 0 else None, color=f"C{k}",
                    label=LABELS.get(name, name) if ax_i == 0 else None, zorder=2 + k)
        ax.set_xlabel("experiences trained", fontsize=11)
        ax.set_ylabel("avg. accuracy on seen experiences (%)", fontsize=11)
        ax.set_xticks(range(1, results["n_experiences"] + 1))
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.3)
        if ax_i == 0:
            ax.set_ylim(0, 104)
        else:
            ax.set_ylim(max(0.0, low - 2), 100.5)
            ax.set_title("zoom: methods that end above 50 %", fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=9, loc="lower center",
               ncol=min(4, len(methods)), frameon=False)
    fig.suptitle(plot_title(results), fontsize=11)
    rows = -(-len(methods) // min(4, len(methods)))
    fig.tight_layout(rect=(0, 0.06 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_matrices(results: Dict, path: str) -> None:
    """One heat map per method of ``R[i][j]`` (percent), three to a row; experiences not
    trained yet (``j > i``) are grey and carry no number."""
    import math

    plt = _pyplot()
    methods = list(results["methods"].items())
    cols = 2 if len(methods) == 4 else min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    n = results["n_experiences"]
    fig, axes = plt.subplots(rows, cols, figsize=(3.9 * cols + 1.2, 3.7 * rows + 0.9),
                             squeeze=False, constrained_layout=True)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#e6e6e6")
    im = None
    for k, ax in enumerate(axes.flat):
        if k >= len(methods):
            ax.axis("off")
            continue
        name, m = methods[k]
        mat = [[v * 100 if j <= i else float("nan") for j, v in enumerate(row)]
               for i, row in enumerate(m["accuracy_matrix"])]
        im = ax.imshow(mat, vmin=0, vmax=100, cmap=cmap)
        for i in range(len(mat)):
            for j in range(len(mat[i])):
                if j <= i:
                    ax.text(j, i, f"{mat[i][j]:.0f}", ha="center", va="center",
                            fontsize=11 if n <= 6 else 8,
                            color="white" if mat[i][j] < 60 else "black")
        final = m["final_average_accuracy"] * 100
        ax.set_title(f"{LABELS.get(name, name)}\nfinal avg. {final:.1f} %", fontsize=10)
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.tick_params(labelsize=9)
        if k // cols == rows - 1 or k + cols >= len(methods):
            ax.set_xlabel("test experience", fontsize=10)
        if k % cols == 0:
            ax.set_ylabel("after training on experience", fontsize=10)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, label="accuracy (%)")
    fig.suptitle(f"Accuracy matrix (%): {plot_title(results)}\n"
                 "row i: after training on experience i; column j: test experience j; "
                 "grey: not trained yet", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: Dict, output_dir: str, plots: bool = True) -> List[str]:
    """Write ``results.json``, ``results.md`` and (if ``plots``) ``accuracy_curves.png`` and
    ``accuracy_matrix.png`` into ``output_dir``; return the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, "results.json"), os.path.join(output_dir, "results.md")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(markdown_report(results) + "\n")
    if plots:
        paths.append(os.path.join(output_dir, "accuracy_curves.png"))
        plot_accuracy_curves(results, paths[-1])
        paths.append(os.path.join(output_dir, "accuracy_matrix.png"))
        plot_accuracy_matrices(results, paths[-1])
    return paths
