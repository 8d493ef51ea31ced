"""No code from a checkpoint file ever runs: a booby-trapped checkpoint (a valid-looking checkpoint
dict with one object whose unpickling would call ``exec``) is refused by every command and function
that reads a checkpoint, with one line naming the file (exit status 2 for the command-line tools),
and the marker file its code would create is never created. Our own checkpoints (pre-training and
fine-tuning, and those with numpy's RNG state as an array that earlier versions wrote) still load
and resume exactly."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import run_finetune
import run_pretrain
from engine.checkpoint import ALLOWED_GLOBALS, CheckpointError, load_checkpoint, read_torch_file, rng_state, set_rng_state
from engine.config import load_config
from engine.trainer import Trainer
from tasks.pretrain import PretrainConfig, run as pretrain
from tests.pretrain_helpers import DEMO, ROOT, step_losses, tiny_overrides
from tests.pretrain_helpers import pretrained, world  # noqa: F401 (module fixtures)
from tests.pretrain_helpers import one_thread  # noqa: F401 (autouse fixture: one thread per test)


class Payload:
    """Unpickles as ``exec(<code that creates marker>)``: what a malicious checkpoint holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.fixture
def evil(pretrained, tmp_path) -> tuple[Path, Path]:
    """``(checkpoint, marker)``: the tiny pre-training checkpoint plus one malicious entry, saved as
    ``checkpoint_last.pth`` and ``checkpoint_best.pth`` of a folder (for --resume)."""
    marker = tmp_path / "MARKER"
    ckpt = read_torch_file(pretrained)
    ckpt["extra"] = {"note": Payload(marker)}
    folder = tmp_path / "evil_run"
    folder.mkdir()
    for name in ("checkpoint_last.pth", "checkpoint_best.pth"):
        torch.save(ckpt, folder / name)
    return folder / "checkpoint_last.pth", marker


def outcome(fn, *args):
    """``fn(*args)``, or the exception it raised (checked only after the marker)."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001
        return err


def assert_refused(message: str, path: Path, marker: Path) -> None:
    assert not marker.exists(), "code from the checkpoint ran"
    lines = [line for line in message.strip().splitlines() if line.strip()]
    assert len(lines) == 1, message
    assert str(path) in lines[0] and "builtins.exec" in lines[0] and "nothing from the file was run" in lines[0], message


def assert_cli_refused(rc, stderr: str, path: Path, marker: Path) -> None:
    assert not marker.exists(), "code from the checkpoint ran"
    assert rc == 2, (rc, stderr)
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert_refused(errors[0], path, marker)


def test_the_payload_runs_when_unpickled(evil):
    """The fixture really is malicious: the checkpoint names ``exec``, and unpickling the entry it
    holds (plain pickle, as an unrestricted load would) creates the marker."""
    path, marker = evil
    assert "builtins.exec" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.is_file()


# ---------------------------------------------------------------------- functions (in-process)
def _tiny_vlp(world, tmp_path):
    from models.vlp import VLPModel

    cfg = load_config(PretrainConfig, DEMO, tiny_overrides(world, tmp_path, **{"model.text.vocab_size": 120}))
    return VLPModel(cfg.model)


def _reader(name: str, world: Path, pretrained: Path, tmp_path: Path):
    """A function that reads the checkpoint ``p`` through the entry point ``name``."""
    if name == "load_checkpoint":
        return load_checkpoint
    if name == "loading.read_checkpoint":  # tools.inspect, ALBEF/BLIP loading, model.*_weights
        from models.loading import read_checkpoint
        return read_checkpoint
    if name == "loading.load_checkpoint_into":  # every --checkpoint, --init-from
        from models.loading import load_checkpoint_into
        return lambda p: load_checkpoint_into(_tiny_vlp(world, tmp_path), p)
    if name == "loading.load_encoder_weights":  # model.vision_weights
        from models.loading import load_encoder_weights

        def load(p):
            model = _tiny_vlp(world, tmp_path)
            model.cfg = dataclasses.replace(model.cfg, vision_weights=str(p))
            return load_encoder_weights(model)
        return load
    if name == "zero_shot.load_vlp_checkpoint":
        from tasks.zero_shot import load_vlp_checkpoint
        return load_vlp_checkpoint
    if name == "srcl_diagnostics.diagnose_checkpoint":
        from tasks.srcl_diagnostics import diagnose_checkpoint
        return lambda p: diagnose_checkpoint(str(p), str(world), progress=False)
    if name == "srcl_diagnostics.diagnose_checkpoint(helper)":
        from tasks.srcl_diagnostics import diagnose_checkpoint
        return lambda p: diagnose_checkpoint(str(pretrained), str(world), helper=str(p), progress=False)
    if name == "common.load_selected_checkpoint":
        from tasks.common import load_selected_checkpoint
        return lambda p: load_selected_checkpoint(_tiny_vlp(world, tmp_path), Path(p).parent)
    if name == "pretrain.load_helper":
        from tasks.pretrain import load_helper
        return lambda p: load_helper(str(p), None, torch.device("cpu"))
    if name == "inspect.describe":
        from tools.inspect import describe
        return lambda p: describe(p, [])
    raise AssertionError(name)


@pytest.mark.parametrize("name", [
    "load_checkpoint", "loading.read_checkpoint", "loading.load_checkpoint_into", "loading.load_encoder_weights",
    "zero_shot.load_vlp_checkpoint", "srcl_diagnostics.diagnose_checkpoint",
    "srcl_diagnostics.diagnose_checkpoint(helper)", "common.load_selected_checkpoint",
    "pretrain.load_helper", "inspect.describe"])
def test_every_reader_refuses_a_malicious_checkpoint(name, evil, world, pretrained, tmp_path):
    path, marker = evil
    if name == "common.load_selected_checkpoint":
        path = path.parent / "checkpoint_best.pth"
    err = outcome(_reader(name, world, pretrained, tmp_path), path)
    assert not marker.exists(), "code from the checkpoint ran"
    assert isinstance(err, CheckpointError), repr(err)
    assert_refused(str(err), path, marker)


# ---------------------------------------------------------------------- commands (in-process main)
MODEL = [o for o in tiny_overrides(Path("."), Path(".")) if o.startswith(("model.", "tokenizer."))]


def task_overrides(task: str, world: Path, out: Path) -> list[str]:
    """Tiny data and settings for each fine-tuning task family on the tiny world."""
    w = world
    data = {
        "retrieval": {"data.train_files": f"[{w / 'retrieval_train.json'}]", "data.val_file": w / "retrieval_val.json",
                      "data.test_file": w / "retrieval_test.json", "eval.k_test": 4, "eval.progress": "false"},
        "vqa": {"data.train_files": f"[{w / 'vqa_train.json'}]", "data.val_file": w / "vqa_val.json",
                "data.test_file": w / "vqa_test.json", "data.test_gt_file": w / "vqa_test_gt.json",
                "data.answer_list": w / "answer_list.json"},
        "nlvr2": {"data.train_files": f"[{w / 'nlvr2_train.json'}]", "data.dev_files": f"[{w / 'nlvr2_dev.json'}]",
                  "data.test_files": f"[{w / 'nlvr2_test.json'}]"},
        "caption": {"data.train_files": f"[{w / 'caption_train.json'}]", "data.val_file": w / "caption_val.json",
                    "data.test_file": w / "caption_test.json", "data.val_gt_file": w / "caption_val_gt.json",
                    "data.test_gt_file": w / "caption_test_gt.json"},
    }[task]
    common = {"data.image_root": w, "x-synthetic": "null", "data.num_workers": 0, "train.output_dir": out,
              "train.batch_size": 8, "train.max_steps": 2, "train.progress": "false", "train.num_threads": 1}
    return MODEL + [f"{k}={v}" for k, v in {**data, **common}.items()]


FINETUNE = [  # (task, arguments; EVIL = the malicious checkpoint, EVILDIR = its folder, GOOD = ours)
    ("retrieval", ["--checkpoint", "EVIL"]),
    ("retrieval", ["--checkpoint", "EVIL", "--zero-shot"]),
    ("retrieval", ["--checkpoint", "EVIL", "--evaluate"]),
    ("retrieval", ["--resume", "EVILDIR"]),
    ("retrieval", ["--checkpoint", "GOOD", "--resume", "EVILDIR"]),  # the trainer's resume
    ("vqa", ["--checkpoint", "EVIL"]),
    ("vqa", ["--checkpoint", "EVIL", "--evaluate"]),
    ("vqa", ["--resume", "EVILDIR"]),
    ("nlvr2", ["--checkpoint", "EVIL"]),
    ("nlvr2", ["--checkpoint", "EVIL", "--evaluate"]),
    ("nlvr2", ["--resume", "EVILDIR"]),
    ("caption", ["--checkpoint", "EVIL"]),
    ("caption", ["--checkpoint", "EVIL", "--evaluate"]),
    ("caption", ["--checkpoint", "EVIL", "--predict", "IMAGE"]),
    ("caption", ["--resume", "EVILDIR"]),
]


@pytest.mark.parametrize("task,args", FINETUNE, ids=[f"{t}:{' '.join(a)}" for t, a in FINETUNE])
def test_run_finetune_refuses_a_malicious_checkpoint(task, args, evil, world, pretrained, tmp_path, capsys):
    path, marker = evil
    image = next((world / "images").rglob("*.png"))
    subst = {"EVIL": str(path), "EVILDIR": str(path.parent), "GOOD": str(pretrained), "IMAGE": str(image)}
    argv = ["--task", f"{task}_shapes", *[subst.get(a, a) for a in args],
            "--set", *task_overrides(task, world, tmp_path / "out")]
    rc = outcome(run_finetune.main, argv)
    assert_cli_refused(rc, capsys.readouterr().err, path, marker)


def _bert_dir(path: Path, tmp_path: Path) -> Path:
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"hidden_size": 32}))
    (bert / "pytorch_model.bin").write_bytes(path.read_bytes())
    return bert


PRETRAIN = ["--resume EVILDIR", "--resume EVIL", "--init-from EVIL", "loss.contrastive.helper_checkpoint=EVIL",
            "model.vision_weights=EVIL", "model.text_weights=BERTDIR"]


@pytest.mark.parametrize("how", PRETRAIN)
def test_run_pretrain_refuses_a_malicious_checkpoint(how, evil, world, tmp_path, capsys):
    path, marker = evil
    subst = {"EVIL": str(path), "EVILDIR": str(path.parent)}
    overrides = tiny_overrides(world, tmp_path / "out", **{"train.num_threads": 1})
    if how.startswith("--"):
        flag, value = how.split()
        extra = [flag, subst[value]]
    else:
        key, value = how.split("=")
        if value == "BERTDIR":
            subst["BERTDIR"] = str(_bert_dir(path, tmp_path))
            path = Path(subst["BERTDIR"]) / "pytorch_model.bin"
        overrides.append(f"{key}={subst[value]}")
        extra = []
    rc = outcome(run_pretrain.main, ["--config", str(DEMO), *extra, "--set", *overrides])
    assert_cli_refused(rc, capsys.readouterr().err, path, marker)


def test_tool_mains_refuse_a_malicious_checkpoint(evil, world, capsys):
    from tasks import srcl_diagnostics
    from tools import inspect

    path, marker = evil
    assert_cli_refused(outcome(inspect.main, [str(path)]), capsys.readouterr().err, path, marker)
    rc = outcome(srcl_diagnostics.main, [str(path), "--data", str(world)])
    assert_cli_refused(rc, capsys.readouterr().err, path, marker)


# ---------------------------------------------------------------------- the entry scripts (subprocess)
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_entry_scripts_refuse_a_malicious_checkpoint(evil, world, tmp_path):
    path, marker = evil
    runs = {
        "run_pretrain.py": _cli("run_pretrain.py", "--config", str(DEMO), "--resume", str(path.parent), "--set",
                                *tiny_overrides(world, tmp_path / "p", **{"train.num_threads": 1})),
        "run_finetune.py": _cli("run_finetune.py", "--task", "retrieval_shapes", "--checkpoint", str(path),
                                "--zero-shot", "--set", *task_overrides("retrieval", world, tmp_path / "r")),
        "tools.inspect": _cli("-m", "tools.inspect", str(path)),
        "tasks.srcl_diagnostics": _cli("-m", "tasks.srcl_diagnostics", str(path), "--data", str(world)),
    }
    for script, res in runs.items():
        assert not marker.exists(), f"code from the checkpoint ran ({script})"
        assert_cli_refused(res.returncode, res.stderr, path, marker)


# ---------------------------------------------------------------------- our own checkpoints
@pytest.fixture
def weights_only_loads(monkeypatch) -> list:
    """Every torch.load call must be weights-only; returns the list of loaded files."""
    calls = []
    real = torch.load

    def spy(f, *args, **kwargs):
        assert kwargs.get("weights_only") is True, f"torch.load({f}) without weights_only=True"
        calls.append(str(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def _legacy(path: Path) -> None:
    """Rewrite a checkpoint with numpy's RNG state as an ndarray, as earlier versions wrote it."""
    ckpt = read_torch_file(path)
    for r in ckpt["rng"]:
        name, key, *rest = r["numpy"]
        r["numpy"] = (name, np.asarray(key, dtype=np.uint32), *rest)
    torch.save(ckpt, path)
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(path)


def test_own_checkpoints_hold_only_plain_values(pretrained, world, tmp_path):
    """A pre-training and a fine-tuning checkpoint load with torch's weights-only reader and no
    allow-list at all (numpy's RNG key is stored as a list)."""
    out = tmp_path / "ft"
    assert run_finetune.main(["--task", "retrieval_shapes", "--checkpoint", str(pretrained),
                              "--set", *task_overrides("retrieval", world, out)]) == 0
    for path in (pretrained, out / "checkpoint_last.pth", out / "checkpoint_best.pth"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], path
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt["rng"][0]["numpy"][1], list) and len(ckpt["rng"][0]["numpy"][1]) == 624


def test_rng_state_round_trip_new_and_legacy_numpy_state(tmp_path):
    np.random.seed(5)
    state = rng_state()
    assert isinstance(state["numpy"][1], list) and len(state["numpy"][1]) == 624  # plain ints, no ndarray
    expect = (np.random.random(3), torch.rand(3))
    for legacy in (False, True):
        s = dict(state)
        if legacy:
            name, key, *rest = s["numpy"]
            s["numpy"] = (name, np.asarray(key, dtype=np.uint32), *rest)
        torch.save({"model": {}, "rng": [s]}, tmp_path / "c.pth")
        np.random.seed(0), torch.manual_seed(0)
        set_rng_state(load_checkpoint(tmp_path / "c.pth")["rng"][0])
        np.testing.assert_array_equal(np.random.random(3), expect[0])
        assert torch.equal(torch.rand(3), expect[1])


def test_legacy_numpy_globals_are_read_from_numpy_1_and_2_files(tmp_path):
    """numpy 2 pickles its arrays under ``numpy._core``, numpy 1 under ``numpy.core``: both load."""
    torch.save({"model": {}, "rng": [{"numpy": np.random.get_state()}]}, tmp_path / "np2.pth")
    with zipfile.ZipFile(tmp_path / "np2.pth") as src, zipfile.ZipFile(tmp_path / "np1.pth", "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(info.filename, data)
    for name, module in (("np2.pth", "numpy._core.multiarray"), ("np1.pth", "numpy.core.multiarray")):
        assert f"{module}._reconstruct" in torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / name)
        key = load_checkpoint(tmp_path / name)["rng"][0]["numpy"][1]
        np.testing.assert_array_equal(key, np.random.get_state()[1])
    assert set(ALLOWED_GLOBALS) == {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
                                    "numpy.ndarray", "numpy.dtype", f"{type(np.dtype(np.uint32)).__module__}."
                                    f"{type(np.dtype(np.uint32)).__qualname__}"}
    # any other numpy array (float64, object) is refused
    torch.save({"model": {}, "x": np.zeros(2)}, tmp_path / "f64.pth")
    with pytest.raises(CheckpointError, match="Float64DType"):
        load_checkpoint(tmp_path / "f64.pth")


def _interrupt_at(monkeypatch, step: int) -> None:
    original = Trainer._stop_requested
    monkeypatch.setattr(Trainer, "_stop_requested", lambda self, stop: self.state.global_step == step or original(self, stop))


def test_pretraining_resumes_exactly_from_a_legacy_checkpoint(world, tmp_path, monkeypatch, weights_only_loads):
    def cfg(out):
        return load_config(PretrainConfig, DEMO, tiny_overrides(world, out, **{"train.num_threads": 1}))

    pretrain(cfg(tmp_path / "full"))
    part = tmp_path / "part"
    with monkeypatch.context() as m:
        _interrupt_at(m, 4)
        assert pretrain(cfg(part)).global_step == 4
    _legacy(part / "checkpoint_last.pth")
    pretrain(cfg(part), resume=str(part))
    assert str(part / "checkpoint_last.pth") in weights_only_loads
    a, b = step_losses(tmp_path / "full"), step_losses(part)
    assert sorted(b) == list(range(1, 13))
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


@pytest.mark.parametrize("legacy", [False, True])
def test_finetuning_resumes_exactly_through_the_safe_reader(legacy, pretrained, world, tmp_path, monkeypatch,
                                                            weights_only_loads):
    def finetune(out, *extra):
        return run_finetune.main(["--task", "retrieval_shapes", "--checkpoint", str(pretrained), *extra, "--set",
                                  *task_overrides("retrieval", world, out), "train.max_steps=4", "train.log_every=1"])

    assert finetune(tmp_path / "full") == 0
    part = tmp_path / "part"
    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        assert finetune(part) == 0
    if legacy:
        _legacy(part / "checkpoint_last.pth")
    assert finetune(part, "--resume", str(part)) == 0
    assert str(part / "checkpoint_last.pth") in weights_only_loads
    a, b = step_losses(tmp_path / "full"), step_losses(part)
    assert sorted(b) == [1, 2, 3, 4] and sorted(a) == [1, 2, 3, 4]
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
