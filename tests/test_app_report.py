"""Summaries of the accuracy matrix, the Markdown report and the plots."""

from __future__ import annotations

import json

import pytest

from avalanche_distributed_rehearsal.app.evaluation import (accuracy_curve, average_accuracy,
                                                            average_forgetting)
from avalanche_distributed_rehearsal.app.report import (markdown_report, matrix_table, plot_title,
                                                        write_report)

R = [[1.0, 0.0, 0.0],
     [0.6, 0.9, 0.0],
     [0.4, 0.8, 0.7]]


def test_summaries_of_a_known_matrix():
    assert average_accuracy(R) == pytest.approx((0.4 + 0.8 + 0.7) / 3)
    # Avalanche's forgetting: best earlier accuracy minus final, experiences but the last
    assert average_forgetting(R) == pytest.approx(((1.0 - 0.4) + (0.9 - 0.8)) / 2)
    assert accuracy_curve(R) == pytest.approx([1.0, 0.75, (0.4 + 0.8 + 0.7) / 3])
    assert average_forgetting([[0.5]]) == 0.0


def _results():
    method = {"final_average_accuracy": average_accuracy(R), "average_forgetting": average_forgetting(R),
              "accuracy_curve": accuracy_curve(R), "accuracy_matrix": R, "train_seconds": 2.0,
              "overhead_vs_incremental": 0.5, "buffer_bytes_per_rank": 2048, "buffer_metrics": {}}
    inc = dict(method, overhead_vs_incremental=0.0, buffer_bytes_per_rank=0)
    return {"config": {"dataset": "digits", "mem_size": 200, "seed": 0},
            "machine": {"cpu_count": 2, "torch": "x", "device": "cpu"}, "world_size": 2,
            "n_experiences": 3, "total_seconds": 9.0, "methods": {"incremental": inc, "ours": method}}


def test_markdown_report():
    text = markdown_report(_results())
    assert "| ours (DistributedReplayPlugin) | 63.3 | 35.0 | 2.0 | +50% | 2.0 KiB |" in text
    assert "| incremental (no replay) | 63.3 | 35.0 | 2.0 | +0% | 0 |" in text
    assert "| exp 1 | 60.0 | 90.0 | 0.0 |" in matrix_table(R)
    assert text.count("### Accuracy matrix") == 2


def test_write_report_files(tmp_path):
    paths = write_report(_results(), str(tmp_path))
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["accuracy_curves.png", "accuracy_matrix.png", "results.json", "results.md"]
    for p in paths:
        if p.endswith(".png"):
            assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(tmp_path / "results.json"))["methods"]["ours"]["accuracy_matrix"] == R


def _png_size(path):
    import struct

    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plots_say_what_they_show_and_lay_six_matrices_out_in_a_grid(tmp_path):
    res = _results()
    res["config"].update(rank_split="skewed", skew=0.8, model="cnn")
    title = plot_title(res)
    for needle in ("digits", "N = 2", "M = 200", "seed 0", "skewed (skew 0.8)", "cnn"):
        assert needle in title, needle
    names = ("incremental", "from_scratch", "stock_replay", "stock_replay_equal", "ours", "ours_local")
    res["methods"] = {n: res["methods"]["ours"] for n in names}
    write_report(res, str(tmp_path))
    w, h = _png_size(tmp_path / "accuracy_matrix.png")
    assert w < 2 * h and w >= 1200  # 3 x 2 panels of readable size, not a 6 x 1 strip
    w, h = _png_size(tmp_path / "accuracy_curves.png")
    assert w >= 1200  # full range and a zoom on the methods that end above 50 %
