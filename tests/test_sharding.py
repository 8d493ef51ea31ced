"""Sharded training (train.sharding = zero | fsdp) on 2 CPU processes (gloo) gives the losses and the
final weights of plain DDP and of one process, and its checkpoints save and resume exactly.

One ``torchrun`` launch runs every setting (this file is also the worker script: see ``__main__``),
because starting processes is the expensive part. ITM is off: its hard negatives are drawn per
process (see tests/test_pretrain_run.py::test_two_process_torchrun_matches_one_process).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.checkpoint import load_checkpoint  # noqa: E402
from tests.pretrain_helpers import DEMO, make_world, step_losses, tiny_overrides  # noqa: E402

STEPS, STOP_AT = 4, 2
# optim.eps: AdamW turns a gradient element far below eps into an update of lr * g / eps, so
# with the default 1e-8 the float32 rounding of near-zero gradients (which differs with the
# per-process batch shapes) moves weights by ~1e-5 within 4 steps; 1e-6 keeps that below the
# comparison's tolerance without changing what is compared.
EXTRA = {"loss.itm": 0.0, "train.epochs": 1, "train.max_steps": STEPS, "optim.grad_clip": 1.0, "optim.eps": 1e-6}


def _config(world: Path, out: Path, sharding: str):
    from engine.config import load_config
    from tasks.pretrain import PretrainConfig
    return load_config(PretrainConfig, DEMO, tiny_overrides(world, out, **EXTRA, **{"train.sharding": sharding}))


def _worker(world: Path, base: Path) -> None:
    """Run in each torchrun process: DDP, then zero and fsdp each interrupted at STOP_AT and resumed."""
    from engine.trainer import Trainer
    from tasks.pretrain import run

    run(_config(world, base / "none", "none"))
    original = Trainer._stop_requested
    for sharding in ("zero", "fsdp"):
        out = base / sharding
        Trainer._stop_requested = lambda self, stop: self.state.global_step == STOP_AT or original(self, stop)
        assert run(_config(world, out, sharding)).global_step == STOP_AT
        Trainer._stop_requested = original
        assert run(_config(world, out, sharding), resume=str(out)).global_step == STEPS


def _model_state(out: Path) -> dict:
    """The model's and the objective's (momentum copy, queues) state of the run's last checkpoint."""
    ckpt = load_checkpoint(out / "checkpoint_last.pth")
    return {**ckpt["model"], **{"objective." + k: v for k, v in ckpt["objective"].items()}}


@pytest.mark.distributed
def test_zero_and_fsdp_match_ddp_and_one_process(tmp_path):
    from tasks.pretrain import run

    world = make_world(tmp_path / "shapes")
    one = tmp_path / "one"
    run(_config(world, one, "none"))
    base = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
           __file__, str(world), str(base)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]

    reference = _model_state(one)
    for setting in ("none", "zero", "fsdp"):
        out = base / setting
        for key in ("loss", "loss_itc", "loss_mlm", "grad_norm"):
            a, b = step_losses(one, key), step_losses(out, key)
            assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), (setting, key)
            for s in a:
                assert b[s] == pytest.approx(a[s], rel=1e-4), (setting, key, s)
        state = _model_state(out)  # full, unsharded, same keys (momentum copy and queues included)
        assert sorted(state) == sorted(reference), setting
        for k, v in reference.items():
            assert state[k].shape == v.shape and not hasattr(state[k], "full_tensor"), (setting, k)
            if v.is_floating_point():
                torch.testing.assert_close(state[k], v, rtol=1e-3, atol=2e-5, msg=f"{setting}: {k}")
            else:
                assert torch.equal(state[k], v), (setting, k)
    # the optimiser state is saved in the one-process format whatever the sharding
    ref_opt = load_checkpoint(one / "checkpoint_last.pth")["optimizer"]
    for setting in ("zero", "fsdp"):
        opt = load_checkpoint(base / setting / "checkpoint_last.pth")["optimizer"]
        # (resuming under FSDP initialises the state of parameters that never had a gradient, here
        # itm_head with loss.itm=0, to zero moments: torch.distributed.checkpoint does that)
        assert set(opt["state"]) >= set(ref_opt["state"]), setting
        for i in set(opt["state"]) - set(ref_opt["state"]):
            assert setting == "fsdp" and not opt["state"][i]["exp_avg"].any(), (setting, i)
        assert [g["params"] for g in opt["param_groups"]] == [g["params"] for g in ref_opt["param_groups"]]
        for i, st in ref_opt["state"].items():
            torch.testing.assert_close(opt["state"][i]["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-2, atol=1e-9)


def test_sharding_is_a_no_op_with_one_process(tmp_path):
    from tasks.pretrain import run

    world = make_world(tmp_path / "shapes")
    a, b = tmp_path / "a", tmp_path / "b"
    run(_config(world, a, "none"))
    run(_config(world, b, "fsdp"))
    assert step_losses(a) == step_losses(b)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
