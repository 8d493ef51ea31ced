"""End-to-end pre-training on tiny synthetic data: run, checkpoint, exact resume, signals, NaN,
bad inputs, and 2-process torchrun equivalence."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.config import ConfigError, load_config
from engine.trainer import NonFiniteLossError, Trainer
from tasks.pretrain import PretrainConfig, run
from tests.pretrain_helpers import DEMO, ROOT, make_world, read_log, step_losses, tiny_overrides


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("shapes"))


def cfg_for(world: Path, out: Path, **extra) -> PretrainConfig:
    return load_config(PretrainConfig, DEMO, tiny_overrides(world, out, **extra))


def test_demo_run_writes_checkpoint_config_and_log(world, tmp_path):
    out = tmp_path / "run"
    state = run(cfg_for(world, out, **{"diagnostics.every": 2}))
    assert state.global_step == 12 and state.epoch == 2  # 48 pairs / batch 8 = 6 steps x 2 epochs
    ckpt = load_checkpoint(out / "checkpoint_last.pth")
    for key in ("model", "objective", "optimizer", "scheduler", "scaler", "state", "rng", "config", "tokenizer"):
        assert key in ckpt, key
    assert ckpt["state"]["global_step"] == 12
    assert (out / "config.yaml").is_file()
    log = read_log(out)
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all(r["loss"] == pytest.approx(r["loss_itc"] + r["loss_itm"] + r["loss_mlm"], rel=1e-5) for r in steps)
    # SRCL diagnostics were logged every 2 steps (weights average 1 over negatives)
    diag = [r for r in log if "diag/sim_auc" in r]
    assert len(diag) == 6 and all("diag/weight_auc" in r for r in diag)
    assert all(abs(r["srcl/w_mean"] - 1.0) < 1e-4 for r in steps)
    # the resolved config re-loads and names the trained vocabulary size
    again = load_config(PretrainConfig, out / "config.yaml")
    assert again.model.text.vocab_size == len(ckpt["tokenizer"]["vocab"])


@pytest.mark.parametrize("extra", [{}, {"loss.contrastive.length_weight": 0.5}], ids=["default", "length_queue"])
def test_resume_continues_exactly(world, tmp_path, monkeypatch, extra):
    """Also with the caption-length evidence: its length queue (full by step 4) is part of the state."""
    full = tmp_path / "full"
    run(cfg_for(world, full, **extra))
    part = tmp_path / "part"
    original = Trainer._stop_requested
    # interrupt after step 4 (mid-epoch: 6 steps per epoch), as a signal would
    monkeypatch.setattr(Trainer, "_stop_requested", lambda self, stop: self.state.global_step == 4 or original(self, stop))
    state = run(cfg_for(world, part, **extra))
    assert state.global_step == 4
    monkeypatch.setattr(Trainer, "_stop_requested", original)
    run(cfg_for(world, part, **extra), resume=str(part))
    a, b = step_losses(full), step_losses(part)
    assert sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


def _older_layout(path: Path) -> None:
    """Rewrite a checkpoint in the layout of the checkpoints this project wrote before the objective
    had its own entry: momentum copy and queues inside ``model``, momentum and queue size under
    ``model`` in the saved config."""
    ckpt = load_checkpoint(path)
    ckpt["model"].update(ckpt.pop("objective"))
    cfg = ckpt["config"]
    for key in ("momentum", "queue_size"):
        cfg["model"][key] = cfg["loss"].pop(key)
    torch.save(ckpt, path)


def test_resume_and_loading_of_the_older_checkpoint_layout_are_exact(world, tmp_path, monkeypatch):
    """A checkpoint with the momentum copy and queues in its ``model`` entry resumes bitwise (losses
    and final weights) and loads into the model and the objective (evaluation, --init-from)."""
    from objectives.pretrain import PretrainObjective
    from tasks.zero_shot import load_vlp_checkpoint

    one = {"train.num_threads": 1}
    full = tmp_path / "full"
    run(cfg_for(world, full, **one))
    part = tmp_path / "part"
    original = Trainer._stop_requested
    monkeypatch.setattr(Trainer, "_stop_requested", lambda self, stop: self.state.global_step == 4 or original(self, stop))
    assert run(cfg_for(world, part, **one)).global_step == 4
    monkeypatch.setattr(Trainer, "_stop_requested", original)
    _older_layout(part / "checkpoint_last.pth")
    assert "objective" not in load_checkpoint(part / "checkpoint_last.pth")
    model, _, cfg = load_vlp_checkpoint(str(part / "checkpoint_last.pth"))
    objective, _, _ = load_vlp_checkpoint(str(part / "checkpoint_last.pth"), objective=True)
    assert cfg.loss.queue_size == 32 and isinstance(objective, PretrainObjective)
    older = load_checkpoint(part / "checkpoint_last.pth")["model"]
    assert all(torch.equal(v, older[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, older[k]) for k, v in objective.state_dict().items() if k.startswith("visual_m."))
    run(cfg_for(world, part, **one), resume=str(part))
    assert step_losses(part) == step_losses(full)
    a, b = load_checkpoint(full / "checkpoint_last.pth"), load_checkpoint(part / "checkpoint_last.pth")
    for section in ("model", "objective"):
        assert sorted(a[section]) == sorted(b[section])
        assert all(torch.equal(v, b[section][k]) for k, v in a[section].items()), section


def test_sigterm_saves_and_exits_cleanly(world, tmp_path):
    out = tmp_path / "sig"
    args = [sys.executable, str(ROOT / "run_pretrain.py"), "--config", str(DEMO), "--set",
            *tiny_overrides(world, out, **{"train.epochs": 200})]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "log.jsonl").is_file() and len(read_log(out)) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "checkpoint saved" in output and "--resume" in output
    ckpt = load_checkpoint(out / "checkpoint_last.pth")
    assert ckpt["state"]["global_step"] >= 2


def test_signal_to_the_process_group_with_loader_workers_still_saves(world, tmp_path):
    """Batch schedulers (SIGTERM) and Ctrl-C (SIGINT) signal every process of the group, loader workers included:
    the workers must not die of it before the main process has saved its checkpoint."""
    out = tmp_path / "group"
    args = [sys.executable, str(ROOT / "run_pretrain.py"), "--config", str(DEMO), "--set",
            *tiny_overrides(world, out, **{"train.epochs": 200, "data.num_workers": 1})]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "log.jsonl").is_file() and len(read_log(out)) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "checkpoint saved" in output and "Traceback" not in output
    ckpt = load_checkpoint(out / "checkpoint_last.pth")
    assert ckpt["state"]["global_step"] >= 2


def test_collapse_check_warns_only_above_the_threshold(world, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        run(cfg_for(world, tmp_path / "warn", **{"diagnostics.collapse_check_step": 2,
                                                   "diagnostics.collapse_threshold": -1.0, "train.epochs": 1}))
    warned = [r.getMessage() for r in caplog.records if "still collapsed" in r.getMessage()]
    assert len(warned) == 2 and all(m.startswith("step 2:") for m in warned)  # image and text, once
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        run(cfg_for(world, tmp_path / "quiet", **{"diagnostics.collapse_check_step": 2,
                                                    "diagnostics.collapse_threshold": 1.0, "train.epochs": 1}))
    assert not any("still collapsed" in r.getMessage() for r in caplog.records)


def test_nan_loss_stops_naming_step_and_part(world, tmp_path, monkeypatch):
    from objectives.pretrain import PretrainObjective
    real = PretrainObjective.forward

    def poisoned(self, batch, *a, **k):
        out = real(self, batch, *a, **k)
        out["loss_mlm"] = out["loss_mlm"] * float("nan")
        out["loss"] = out["loss_itc"] + out["loss_mlm"]
        return out

    monkeypatch.setattr(PretrainObjective, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 0 .*loss"):
        run(cfg_for(world, tmp_path / "nan"))
    # skip policy: skips, counts, then gives up after max_nan_skips in a row
    with pytest.raises(NonFiniteLossError, match="max_nan_skips=2"):
        run(cfg_for(world, tmp_path / "nan2", **{"train.nan_policy": "skip", "train.max_nan_skips": 2}))
    skipped = [r for r in read_log(tmp_path / "nan2") if r.get("nan_skipped")]
    assert len(skipped) == 2


def test_unknown_config_key_and_missing_data_are_clear(world, tmp_path):
    with pytest.raises(ConfigError, match="train.batchsize"):
        load_config(PretrainConfig, DEMO, ["train.batchsize=8"])
    res = subprocess.run([sys.executable, str(ROOT / "run_pretrain.py"), "--config", str(DEMO), "--set",
                          "model.vision.widht=3"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "model.vision.widht" in res.stderr and "width" in res.stderr
    assert "Traceback" not in res.stderr
    missing = tmp_path / "nope.json"
    res = subprocess.run([sys.executable, str(ROOT / "run_pretrain.py"), "--config", str(DEMO), "--set",
                          *tiny_overrides(world, tmp_path / "o", **{"data.train_files": f"[{missing}]"})],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and str(missing) in res.stderr and "demo" in res.stderr
    assert "Traceback" not in res.stderr


def test_too_many_bad_images_stop_with_clear_error(world, tmp_path):
    records = json.loads((world / "pretrain.json").read_text())
    bad = tmp_path / "bad.json"
    for i, r in enumerate(records):
        if i % 3 == 0:
            r["image"] = f"images/missing_{i}.png"
    bad.write_text(json.dumps(records))
    with pytest.raises(RuntimeError, match="failed to load"):
        run(cfg_for(world, tmp_path / "b", **{"data.train_files": f"[{bad}]", "data.bad_check_after": 8}))
    # a low rate of bad images is tolerated and counted
    for i, r in enumerate(records):
        r["image"] = f"images/missing_{i}.png" if i == 5 else json.loads((world / "pretrain.json").read_text())[i]["image"]
    bad.write_text(json.dumps(records))
    state = run(cfg_for(world, tmp_path / "c", **{"data.train_files": f"[{bad}]", "data.max_bad_fraction": 0.2,
                                                   "data.bad_check_after": 8}))
    assert state.global_step == 12


@pytest.mark.distributed
def test_two_process_torchrun_matches_one_process(world, tmp_path):
    """Contrastive features are all-gathered: with the same global batch, 2 gloo processes give the
    same contrastive and MLM losses as 1 process (ITM hard negatives are drawn per process, so
    ITM is off here; see README)."""
    extra = {"loss.itm": 0.0, "train.epochs": 1, "train.max_steps": 4}
    one = tmp_path / "one"
    run(cfg_for(world, one, **extra))
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           str(ROOT / "run_pretrain.py"), "--config", str(DEMO), "--set", *tiny_overrides(world, two, **extra)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for key in ("loss_itc", "loss_mlm"):
        a, b = step_losses(one, key), step_losses(two, key)
        assert sorted(a) == sorted(b) == [1, 2, 3, 4]
        for s in a:
            assert b[s] == pytest.approx(a[s], rel=1e-4), (key, s)
