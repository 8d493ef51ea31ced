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
    assert report["reference"] == "srcl" and report["reference_table_markdown"].startswith("| partial captions |")
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


def _run(prob, method, seed, std, sem, clean):
    return {"prob": prob, "method": method, "seed": seed, "final_diagnostics": {},
            "eval": {"own": {"standard": {"r_mean": std}, "semantic": {"r_mean": sem}},
                     "clean": {"standard": {"r_mean": clean}}}}


def test_reference_table_pairs_by_seed_and_skips_unpaired_runs():
    study = load_benchmark("srcl_study")
    ref = {0: (10.0, 20.0, 30.0), 1: (12.0, 22.0, 33.0)}
    new = {0: (11.0, 19.0, 30.5), 1: (15.0, 21.0, 32.0), 2: (99.0, 99.0, 99.0)}  # seed 2 has no reference run
    results = ([_run("0.50", "srcl", s, *v) for s, v in ref.items()]
               + [_run("0.50", "srcl_x", s, *v) for s, v in new.items()]
               + [_run("0.50", "infonce", s, 0.0, 0.0, 0.0) for s in ref])
    methods = ["infonce", "srcl", "srcl_x"]
    summary = study.summarise(results, methods, [0.5], [0, 1, 2], reference="srcl")
    assert "diff_vs_reference" not in summary["0.50"]["srcl"]["own/standard/r_mean"]
    table = study.reference_table(summary, methods, "srcl").splitlines()
    assert table[0].startswith("| partial captions | method | standard R_mean vs SRCL |")
    rows = table[2:]
    assert len(rows) == 1  # neither InfoNCE nor the reference itself get a row
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    expect = []
    for k in range(3):
        diffs = [new[s][k] - ref[s][k] for s in ref]
        expect.append(f"{sum(diffs) / len(diffs):+.1f} ({sum(d > 0 for d in diffs)}/{len(diffs)})")
    assert cells == ["0.50", "srcl_x", *expect] == ["0.50", "srcl_x", "+2.0 (2/2)", "-1.0 (0/2)", "-0.2 (1/2)"]


def test_reference_must_be_a_studied_method(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    study = load_benchmark("srcl_study")
    args = ["--quick", "--work-dir", str(tmp_path / "work"), "--methods", "infonce", "srcl", "--reference", "srcl_d8"]
    assert study.main(args) == 2
    assert "--reference srcl_d8 is not one of the study's methods" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # refused before anything was made


def test_final_diagnostics_judge_with_the_helper_the_last_steps_used(monkeypatch, tmp_path):
    """A run whose helper keeps a weight at the end (constant alpha 1) is diagnosed with that helper
    and alpha; the default linear decay ends at alpha 0, so its diagnostics leave the helper out.
    The heat-map's runs are read the same way, from the config saved in their checkpoints."""
    import engine.checkpoint as C
    import tasks.srcl_diagnostics as D
    from engine.config import load_config, to_dict
    from tasks.pretrain import PretrainConfig
    study = load_benchmark("srcl_study")
    calls = []
    monkeypatch.setattr(D, "diagnose_checkpoint", lambda *a, **k: calls.append((a, k)) or {})
    helper = str(tmp_path / "helper.pth")
    base = ["loss.contrastive.kind=srcl", f"loss.contrastive.helper_checkpoint={helper}"]
    for extra, want in (([], (None, None)),
                        (["loss.contrastive.alpha_schedule=constant", "loss.contrastive.alpha_start=1"], (helper, 1.0)),
                        (["loss.contrastive.alpha_end=0.25"], (helper, 0.25))):
        cfg = load_config(PretrainConfig, study.DEMO_CONFIG, base + extra)
        study.final_diagnostics("run.pth", "world", cfg)
        args, kw = calls[-1]
        assert args[:3] == ("run.pth", "world", "test") and (kw["helper"], kw["alpha"]) == want
        # without a config, the one saved in the checkpoint (as the heat-map reads its runs)
        monkeypatch.setattr(C, "load_checkpoint", lambda path, c=cfg: {"config": to_dict(c)})
        study.final_diagnostics("run.pth", "world", keep_batch=True)
        args, kw = calls[-1]
        assert (kw["helper"], kw["alpha"], kw["keep_batch"]) == (*want, True)


def test_variant_values_name_the_world_and_the_base():
    """``{prob}`` in a variant's value becomes each world's probability (one helper per world);
    ``@base`` the base checkpoint; the variant's keys win over the built-in method's and the run settings."""
    study = load_benchmark("srcl_study")
    variants = {"srcl_hl": {"loss.contrastive.kind": "srcl",
                            "loss.contrastive.helper_checkpoint": "w/runs/p{prob}_h_s0/checkpoint_last.pth"},
                "srcl_helper": {"loss.contrastive.delta": "4"}, "srcl_lr": {"optim.lr": "1e-3"}}
    for pk in ("0.50", "1.00"):
        over = study.method_overrides("srcl_hl", variants, pk, "base.pth", False)
        assert over["loss.contrastive.helper_checkpoint"] == f"w/runs/p{pk}_h_s0/checkpoint_last.pth"
        assert over["optim.lr"] == study.RUN_OVERRIDES["optim.lr"]
    helper = study.method_overrides("srcl_helper", variants, "0.50", "base.pth", False)
    assert helper["loss.contrastive.helper_checkpoint"] == "base.pth" and helper["loss.contrastive.delta"] == "4"
    assert study.method_overrides("srcl_lr", variants, "0.50", "base.pth", False)["optim.lr"] == "1e-3"
    scratch = study.method_overrides("infonce", variants, "0.00", "base.pth", True)
    assert scratch["optim.lr"] == study.SCRATCH_OVERRIDES["optim.lr"] and "schedule.warmup_steps" in scratch


def test_a_missing_helper_is_refused_before_anything_trains(tmp_path, monkeypatch, capsys):
    """A ``--variant`` whose helper checkpoint (after ``{prob}``) is not a file is refused with one line
    naming the method, the world and the path, before the worlds and the base are made."""
    monkeypatch.chdir(ROOT)
    study = load_benchmark("srcl_study")
    (tmp_path / "p0.00_h.pth").write_bytes(b"")  # the clean world's helper exists, the p 1.0 one does not
    args = ["--quick", "--work-dir", str(tmp_path / "work"), "--methods", "srcl_h",
            "--variant", f"srcl_h:loss.contrastive.kind=srcl,loss.contrastive.helper_checkpoint={tmp_path}/p{{prob}}_h.pth"]
    assert study.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: method srcl_h on the world 1.00: loss.contrastive.helper_checkpoint {tmp_path}/p1.00_h.pth "
                   "is not a file"]
    assert not (tmp_path / "work").exists()
