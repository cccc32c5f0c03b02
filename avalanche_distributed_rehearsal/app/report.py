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


def plot_accuracy_curves(results: Dict, path: str) -> None:
    """Average accuracy on the experiences seen so far after each experience, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in results["methods"].items():
        curve = [v * 100 for v in m["accuracy_curve"]]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=LABELS.get(name, name))
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("avg. accuracy on seen experiences (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(range(1, results["n_experiences"] + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_matrices(results: Dict, path: str) -> None:
    """One heat map per method of ``R[i][j]`` (percent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["methods"].items())
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.4), squeeze=False,
                             constrained_layout=True)
    for k, (ax, (name, m)) in enumerate(zip(axes[0], methods)):
        mat = [[v * 100 for v in row] for row in m["accuracy_matrix"]]
        im = ax.imshow(mat, vmin=0, vmax=100, cmap="viridis")
        n = len(mat)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{mat[i][j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if mat[i][j] < 60 else "black")
        ax.set_title(LABELS.get(name, name), fontsize=8)
        ax.set_xlabel("test experience")
        if k == 0:
            ax.set_ylabel("after training on experience")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy (%)")
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
