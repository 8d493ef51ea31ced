"""benchmarks/srcl_study.py --quick: the grid, the weight-AUC table, the heat-map of one batch, the
count of reused runs, and --finished-only summarising the same runs without training."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tests.pretrain_helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_quick_study_heatmap_auc_table_and_finished_only(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    study = load_benchmark("srcl_study")
    args = ["--quick", "--work-dir", str(tmp_path / "work"), "--methods", "infonce", "srcl", "--base-threads", "1"]
    out = tmp_path / "study.json"
    assert study.main(args + ["--heatmap", "srcl", "--heatmap-prob", "1.0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert Path(report["plots"]["heatmap"]).is_file()
    auc = report["heatmap"]["batch_auc"]["SRCL"]
    assert 0.0 <= auc <= 1.0 or math.isnan(auc)
    table = (tmp_path / "study_table.md").read_text()
    srcl = report["summary"]["1.00"]["srcl"]["final_diag/weight_auc"]["mean"]
    assert f"| 1.00 | SRCL | {srcl:.3f} ± " in table  # the weight-AUC table beside the recall table
    assert all(r["from_current_base"] for r in report["runs"])
    assert report["reused_runs"] == 0  # all trained by this invocation
    # summarising the finished runs trains nothing and gives the same numbers
    again = tmp_path / "again.json"
    assert study.main(args + ["--finished-only", "--out", str(again)]) == 0
    second = json.loads(again.read_text())
    assert second["summary"] == report["summary"] and second["settings"]["finished_only"]
    assert second["reused_runs"] == len(second["runs"]) == len(report["runs"])  # its wall time is not theirs
    # a method without runs is left out rather than trained
    assert study.main(args + ["--finished-only", "--variant", "srcl_d2:loss.contrastive.delta=2",
                              "--out", str(tmp_path / "third.json")]) == 0
    third = json.loads((tmp_path / "third.json").read_text())
    assert {r["method"] for r in third["runs"]} == {"infonce", "srcl"}
