"""End-to-end retrieval on a tiny shapes world: fine-tune from a tiny pre-training checkpoint,
--evaluate, --zero-shot, bad input, and 1-process vs 2-process (torchrun, gloo) evaluation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_finetune
from engine.checkpoint import load_checkpoint
from tests.pretrain_helpers import ROOT, read_log, tiny_overrides
from tests.pretrain_helpers import pretrained, world  # noqa: F401 (module fixtures)
from tests.pretrain_helpers import one_thread  # noqa: F401 (autouse fixture: one thread per test)

MODEL_KEYS = ("model.vision.", "model.text.", "model.embed_dim", "loss.queue_size")


def rt_overrides(world: Path, out: Path, **extra) -> list[str]:
    """The tiny model of the pre-training tests plus tiny retrieval data and evaluation settings."""
    model = [o for o in tiny_overrides(world, out) if o.startswith(MODEL_KEYS)]
    o = {
        "data.train_files": f"[{world / 'retrieval_train.json'}]", "data.val_file": str(world / "retrieval_val.json"),
        "data.test_file": str(world / "retrieval_test.json"), "data.image_root": str(world),
        "x-synthetic": "null", "data.num_workers": 0,
        "train.output_dir": str(out), "train.batch_size": 8, "train.epochs": 2, "train.max_steps": 3,
        "train.log_every": 1, "train.progress": "false", "train.num_threads": 1, "schedule.warmup_steps": 1,
        "eval.k_test": 4, "eval.batch_size": 3, "eval.itm_batch_size": 5, "eval.progress": "false",
    }
    o.update(extra)
    return model + [f"{k}={v}" for k, v in o.items()]


def finetune_cli(*args: str, **overrides) -> int:
    world, out = overrides.pop("world"), overrides.pop("out")
    return run_finetune.main(["--task", "retrieval_shapes", *args, "--set", *rt_overrides(world, out, **overrides)])


def results(out: Path, tag: str) -> dict:
    return json.loads((out / f"results_{tag}_test.json").read_text())


def test_finetune_then_evaluate_and_zero_shot(world, pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    assert finetune_cli("--checkpoint", str(pretrained), world=world, out=out) == 0
    printed = capsys.readouterr().out
    assert "protocol: fine-tuned" in printed and "score rule: albef" in printed and "R@1" in printed
    assert (out / "checkpoint_best.pth").is_file() and (out / "config.yaml").is_file()
    res = results(out, "finetuned")
    assert res["protocol"] == "finetuned" and res["score_rule"] == "albef" and res["k_test"] == 4
    assert res["evaluated_checkpoint"].endswith("checkpoint_best.pth") and res["steps"] == 3
    m = res["metrics"]
    assert set(m) == {f"{d}_r{k}" for d in ("txt", "img") for k in (1, 5, 10)} | {"txt_r_mean", "img_r_mean", "r_mean"}
    assert m["r_mean"] == pytest.approx(sum(m[f"{d}_r{k}"] for d in ("txt", "img") for k in (1, 5, 10)) / 6)
    ranked = json.loads((out / "ranked_finetuned_test.json").read_text())
    assert len(ranked["i2t"]) == res["num_images"] == 8 and len(ranked["t2i"]) == res["num_captions"] == 16
    assert all(len(r) == 4 and len(set(r)) == 4 for r in ranked["i2t"] + ranked["t2i"])
    # training used the pre-training forward without MLM; val was evaluated; best kept by val r_mean
    log = read_log(out)
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 3 and all("loss_mlm" not in r and "loss_itm" in r for r in steps)
    assert all(r["loss"] == pytest.approx(r["loss_itc"] + r["loss_itm"], rel=1e-5) for r in steps)
    evals = [r for r in log if "eval/r_mean" in r]
    assert evals and res["best_val_r_mean"] == pytest.approx(max(r["eval/r_mean"] for r in evals))
    ckpt = load_checkpoint(out / "checkpoint_best.pth")
    assert "tokenizer" in ckpt and ckpt["config"]["eval"]["k_test"] == 4

    # --evaluate of the best checkpoint reproduces the final test numbers
    ev = tmp_path / "ev"
    assert finetune_cli("--checkpoint", str(out / "checkpoint_best.pth"), "--evaluate", world=world, out=ev) == 0
    assert results(ev, "evaluate")["metrics"] == m
    assert not (ev / "checkpoint_last.pth").exists()

    # --zero-shot evaluates the pre-training checkpoint as it is, and says which protocol it follows
    zs = tmp_path / "zs"
    assert finetune_cli("--checkpoint", str(pretrained), "--zero-shot", world=world, out=zs,
                        **{"eval.score_rule": "blip"}) == 0
    printed = capsys.readouterr().out
    assert "protocol: zero-shot" in printed and "COCO-fine-tuned" in printed and "score rule: blip" in printed
    z = results(zs, "zero_shot")
    assert z["protocol"] == "zero_shot" and z["score_rule"] == "blip" and "COCO-fine-tuned" in z["protocol_text"]
    assert (zs / "ranked_zero_shot_test.json").is_file()


def test_from_scratch_warns_and_trains(world, tmp_path, caplog):
    out = tmp_path / "scratch"
    with caplog.at_level("WARNING"):
        assert finetune_cli(world=world, out=out, **{"train.max_steps": 1, "tokenizer.vocab_size": 120}) == 0
    assert "from scratch" in caplog.text
    assert results(out, "finetuned")["checkpoint"] is None


def test_bad_test_file_and_missing_checkpoint_are_clear(world, pretrained, tmp_path, capsys):
    records = json.loads((world / "retrieval_test.json").read_text())
    records[2]["image"] = "images/test/missing.png"
    bad = tmp_path / "bad_test.json"
    bad.write_text(json.dumps(records))
    rc = finetune_cli("--checkpoint", str(pretrained), "--evaluate", world=world, out=tmp_path / "b",
                      **{"data.test_file": str(bad)})
    err = capsys.readouterr().err
    assert rc == 2 and "record 2" in err and "images/test/missing.png" in err and str(bad) in err
    records = json.loads((world / "retrieval_test.json").read_text())
    records[4]["caption"] = []
    bad.write_text(json.dumps(records))
    rc = finetune_cli("--checkpoint", str(pretrained), "--evaluate", world=world, out=tmp_path / "b",
                      **{"data.test_file": str(bad)})
    err = capsys.readouterr().err
    assert rc == 2 and "record 4" in err and "no captions" in err and "Traceback" not in err
    assert finetune_cli("--zero-shot", world=world, out=tmp_path / "c") == 2
    assert "--checkpoint" in capsys.readouterr().err


@pytest.mark.distributed
def test_two_process_evaluation_matches_one_process(world, pretrained, tmp_path):
    """Evaluation work is split over processes by image chunk and gathered: 2 gloo processes give
    the same ranked lists, scores and recalls as 1 process."""
    extra = {"eval.save_scores": "true", "eval.batch_size": 2, "eval.k_test": 6}
    one = tmp_path / "one"
    assert finetune_cli("--checkpoint", str(pretrained), "--evaluate", world=world, out=one, **extra) == 0
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
           str(ROOT / "run_finetune.py"), "--task", "retrieval_shapes", "--checkpoint", str(pretrained), "--evaluate",
           "--set", *rt_overrides(world, two, **extra)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 process(es)" in res.stdout
    a, b = results(one, "evaluate"), results(two, "evaluate")
    assert a["metrics"] == b["metrics"] and a["itc_only_metrics"] == b["itc_only_metrics"]
    assert b["processes"] == 2
    ra, rb = (json.loads((d / "ranked_evaluate_test.json").read_text()) for d in (one, two))
    assert ra["i2t"] == rb["i2t"] and ra["t2i"] == rb["t2i"]
    for key in ("i2t_scores", "t2i_scores"):
        assert torch.allclose(torch.tensor(ra[key]), torch.tensor(rb[key]), atol=1e-6)
    # the scores are not degenerate: the comparison means something
    assert len({round(s, 6) for row in ra["i2t_scores"] for s in row}) > 10


def test_the_architecture_comes_from_the_checkpoint(world, pretrained, tmp_path, capsys):
    """A config without a model section evaluates the tiny checkpoint with the checkpoint's model;
    the image size may be set; a width other than the checkpoint's is one line naming the key."""
    from engine.config import read_yaml

    config = tmp_path / "no_model.yaml"
    config.write_text("tokenizer: {max_length: 30}\n")
    out = tmp_path / "zs"
    sets = [o for o in rt_overrides(world, out) if not o.startswith("model.")] + ["model.vision.img_size=48"]
    args = ["--task", "retrieval_shapes", "--config", str(config), "--checkpoint", str(pretrained), "--zero-shot"]
    assert run_finetune.main([*args, "--set", *sets]) == 0
    saved = load_checkpoint(pretrained)["config"]["model"]
    used = read_yaml(out / "config_zero_shot.yaml")["model"]
    assert used["vision"] == {**saved["vision"], "img_size": 48} and used["text"] == saved["text"]
    assert used["embed_dim"] == saved["embed_dim"] == 16
    capsys.readouterr()
    assert run_finetune.main([*args, "--set", *sets, "model.vision.width=64", "model.vision.num_heads=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.vision.width: checkpoint 32, config 64" in err and "\n" not in err
    assert "model.vision.img_size: checkpoint" not in err  # allowed to differ
