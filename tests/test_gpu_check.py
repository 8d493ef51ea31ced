"""benchmarks/gpu_check.sh in its CPU dry run: every part runs (tiny model, eager-backend compile)
and leaves its JSON, and the summary holds the headline numbers, so the script is known to work
before a GPU is at hand."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("env", "pretrain_base", "pretrain_ckpt", "pretrain_compile", "retrieval", "loader", "pretrain_compile_ckpt")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_gpu_check_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "gpu"
    res = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", "--out", str(out),
                          "--peak-tflops", "1", "--budget", "400"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["peak_tflops"] == 1.0
    logs = {p: (out / f"{p}.log").read_text()[-2000:] if (out / f"{p}.log").exists() else "" for p in PARTS}
    for name in PARTS[:-1]:
        assert summary["parts"][name]["status"] == "ok", (name, summary["parts"][name], logs[name])
    # torch.compile + checkpointing under CPU bf16 autocast fails in torch 2.14 (a recomputation
    # mismatch in torch.utils.checkpoint): the script must record that as a failure, with the error
    last = summary["parts"]["pretrain_compile_ckpt"]
    assert last["status"] == "ok" or (last["status"] == "failed" and "backward" in last["error"]), last
    expect = {"pretrain_base": ("off", False), "pretrain_ckpt": ("torch", False), "pretrain_compile": ("off", True)}
    if last["status"] == "ok":
        expect["pretrain_compile_ckpt"] = ("torch", True)
    for name, (ckpt, compiled) in expect.items():
        p = summary["parts"][name]
        assert (p["checkpointing"], p["compile"], p["precision"], p["batch"]) == (ckpt, compiled, "bf16", 2), name
        assert p["pairs_per_s"] > 0 and p["peak_mem_mib"] > 0 and p["steps_timed"] >= 1, name
        # model FLOPs (checkpointing's recomputation not counted) x pairs/s over a 1 TFLOP/s "peak"
        assert p["fraction_of_peak"] == pytest.approx(p["flops_per_pair_model"] * p["pairs_per_s"] / 1e12), name
        assert (p["flops_per_pair_analytic"] > p["flops_per_pair_model"]) == (ckpt == "torch"), name
        rows = json.loads((out / f"{name}.json").read_text())["rows"]
        assert rows[0]["compile_backend"] == ("eager" if compiled else None)
    assert json.loads((out / "retrieval.json").read_text())
    loader = json.loads((out / "loader.json").read_text())
    assert {"stages", "readers", "loader", "workers_needed"} <= set(loader)
