"""benchmarks/srcl_transfer.py --quick: tiny pre-training per method, then fine-tuning and testing on
the four shapes tasks, rows and summary as the full benchmark writes them."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tests.pretrain_helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_quick_transfer_writes_rows_table_and_paired_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    transfer = load_benchmark("srcl_transfer")
    out = tmp_path / "transfer.json"
    assert transfer.main(["--quick", "--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {(r["method"], r["task"], r["seed"]) for r in rows} == {
        (m, t, 0) for m in ("infonce", "srcl") for t in ("retrieval", "vqa", "nlvr2", "caption")}
    assert all(set(r) == {"method", "task", "seed", "metric", "value"} and math.isfinite(r["value"]) for r in rows)
    # every value is the one in the fine-tuning run's own results file
    nlvr2 = json.loads((tmp_path / "work" / "runs" / "nlvr2_srcl_s0" / "results.json").read_text())
    row = next(r for r in rows if r["method"] == "srcl" and r["task"] == "nlvr2")
    assert row["value"] == nlvr2["test"]["accuracy"]
    assert nlvr2["test"]["n"] == 16  # the NLVR2 world with its own, larger test split
    srcl = next(e for e in report["summary"] if e["method"] == "srcl" and e["task"] == "vqa")
    infonce = next(e for e in report["summary"] if e["method"] == "infonce" and e["task"] == "vqa")
    assert math.isclose(srcl["diff_vs_infonce"]["mean"], srcl["mean"] - infonce["mean"], abs_tol=1e-9)
    assert "| SRCL |" in (tmp_path / "transfer_table.md").read_text()
