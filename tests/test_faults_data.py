"""Never lose or overwrite data: the synthetic world stays in its own folder and never writes over
a file it did not write; a new run does not replace another run's checkpoints; one run per output
folder (a lock); a resume with a changed config is refused before anything is written (or the
accepted changes are applied and named); orphaned temporary files and repeated log lines after a
resume are cleaned up; a full disk is one line and leaves the previous checkpoint intact."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_finetune
import run_pretrain
from engine import checkpoint as C
from engine.config import load_config
from engine.trainer import Trainer, lr_lambda
from shapesworld.__main__ import main as shapes_cli
from shapesworld.config import ShapesConfig
from shapesworld.preset import prepare
from shapesworld.write import ensure_shapes
from tasks.pretrain import PretrainConfig, run as pretrain
from tests.pretrain_helpers import DEMO, ROOT, TINY_SHAPES, make_world, read_log, tiny_overrides
from tests.pretrain_helpers import one_thread  # noqa: F401 (autouse fixture: one thread per test)

DEMO_RETRIEVAL = ROOT / "configs/demo/retrieval.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("shapes_faults"))


def overrides(world: Path, out: Path, **extra) -> list[str]:
    o = {"train.max_steps": 2, "train.num_threads": 1}
    o.update(extra)
    return tiny_overrides(world, out, **o)


def cli(*args: str) -> int:
    return run_pretrain.main(["--config", str(DEMO), *args])


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ the synthetic world's folder
def test_demo_config_pointed_at_your_data_uses_it_and_writes_nothing_there(world, tmp_path, monkeypatch, capsys):
    user = tmp_path / "mine"
    (user / "pics").mkdir(parents=True)
    images = sorted((world / "images/train").iterdir())[:19]
    for i, p in enumerate(images):
        shutil.copy(p, user / "pics" / f"photo{i}.png")
    (user / "pretrain.json").write_text(json.dumps(
        [{"image": f"pics/photo{i}.png", "caption": f"my own caption number {i}"} for i in range(19)]))
    (user / "test.json").write_text("[]")
    before = snapshot(user)
    monkeypatch.chdir(tmp_path)  # the demo's data/shapes would be tmp_path/data/shapes
    o = [x for x in overrides(world, tmp_path / "out") if not x.startswith(("x-synthetic=", "data.train_files=",
                                                                            "data.image_root="))]
    o += [f"data.train_files=[{user / 'pretrain.json'}]", f"data.image_root={user}"]
    assert prepare(DEMO, o) is None  # the demo's x-synthetic section, but the run's data lies elsewhere
    state = pretrain(load_config(PretrainConfig, DEMO, o))
    assert state.global_step == 2
    assert "pre-training: 19 pairs" in capsys.readouterr().out  # the user's records, not the shapes world
    assert snapshot(user) == before  # byte-identical, nothing added
    assert not (tmp_path / "data").exists()  # no data path lies in data/shapes: nothing generated


def test_demo_paths_still_generate_the_world_in_its_own_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = ",".join(f"{k}: {v}" for k, v in {"seed": 3, "image_size": 32, "num_train_images": 16, "num_val_images": 2,
                                              "num_test_images": 2, "captions_per_image": 1, "vqa_questions_per_image": 1,
                                              "nlvr2_pairs": [2, 1, 1]}.items())
    o = [x for x in overrides(tmp_path, tmp_path / "out") if not x.startswith(("x-synthetic=", "data.train_files=",
                                                                               "data.image_root="))]
    assert cli("--set", *o, "x-synthetic={" + tiny + "}") == 0  # one command: the world, then the run
    assert (tmp_path / "data/shapes/pretrain.json").is_file() and (tmp_path / "data/shapes/.shapes_written.json").is_file()
    # a file of yours in that folder is never written over: one line, exit 2, the file unchanged
    (tmp_path / "data/shapes/caption_val.json").write_text("my edits")
    capsys.readouterr()
    rc = cli("--set", *o, "x-synthetic={" + tiny.replace("seed: 3", "seed: 4") + "}",
             f"train.output_dir={tmp_path / 'out2'}")
    assert rc == 2
    assert "caption_val.json" in error_line(capsys.readouterr().err)
    assert (tmp_path / "data/shapes/caption_val.json").read_text() == "my edits"


def test_generator_never_writes_over_or_deletes_files_it_did_not_write(tmp_path, capsys):
    cfg = ShapesConfig(**{**TINY_SHAPES.__dict__, "root": str(tmp_path)})
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "pretrain.json").write_text("[mine]")
    with pytest.raises(FileExistsError, match="pretrain.json"):
        ensure_shapes(folder, cfg)
    assert sorted(os.listdir(folder)) == [".shapes.lock", "pretrain.json"]  # nothing else written
    assert (folder / "pretrain.json").read_text() == "[mine]"
    os.remove(folder / "pretrain.json")
    ensure_shapes(folder, cfg)
    # changed since the generator wrote it: refused too
    (folder / "vqa_val.json").write_text("[]")
    foreign_image = folder / "images/train/000099.png"  # not the generator's: an image of a smaller
    foreign_image.write_bytes(b"mine")                # world must not delete it either
    smaller = ShapesConfig(**{**cfg.__dict__, "num_train_images": 40})
    with pytest.raises(FileExistsError, match="vqa_val.json"):
        ensure_shapes(folder, smaller)
    assert (folder / "vqa_val.json").read_text() == "[]"
    os.remove(folder / "vqa_val.json")
    ensure_shapes(folder, smaller)
    assert foreign_image.read_bytes() == b"mine"
    assert not (folder / "images/train/000045.png").exists()  # its own stale images do go
    # the command line: one line, exit 2
    (folder / "scenes.json").write_text("{}")
    assert shapes_cli(["--out", str(folder), "--seed", "9", "--num-train-images", "4", "--workers", "1"]) == 2
    assert "scenes.json" in capsys.readouterr().err


# ------------------------------------------------------------------ output folders
def test_new_run_refuses_a_folder_holding_a_checkpoint_overwrite_replaces_it(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("--set", *overrides(world, out)) == 0
    ckpt = (out / "checkpoint_last.pth").read_bytes()
    capsys.readouterr()
    assert cli("--set", *overrides(world, out, **{"train.max_steps": 1})) == 2
    line = error_line(capsys.readouterr().err)
    assert str(out) in line and "checkpoint_last.pth" in line and "--resume" in line and "--overwrite" in line
    assert (out / "checkpoint_last.pth").read_bytes() == ckpt
    # --overwrite: a new run from step 0 replaces checkpoint and log
    assert cli("--overwrite", "--set", *overrides(world, out, **{"train.max_steps": 1})) == 0
    assert C.load_checkpoint(out / "checkpoint_last.pth")["state"]["global_step"] == 1
    assert [r["step"] for r in read_log(out)] == [1]
    # an evaluation-only run in the same folder is not refused, and writes no checkpoint
    ckpt = (out / "checkpoint_last.pth").read_bytes()
    model = [x for x in overrides(world, out) if x.startswith(("model.vision.", "model.text.", "model.embed_dim",
                                                                "model.queue_size"))]
    rc = run_finetune.main(["--task", "retrieval_shapes", "--checkpoint", str(out / "checkpoint_last.pth"), "--zero-shot",
                            "--set", *model, f"data.test_file={world / 'retrieval_test.json'}", f"data.image_root={world}",
                            "x-synthetic=null", "data.num_workers=0", f"train.output_dir={out}", "train.progress=false",
                            "eval.k_test=4", "eval.progress=false"])
    assert rc == 0
    assert (out / "checkpoint_last.pth").read_bytes() == ckpt and list(out.glob("results_zero_shot_test*.json"))


def test_one_run_per_folder_and_a_killed_runs_lock_does_not_block(world, tmp_path, capsys):
    import fcntl
    out = tmp_path / "locked"
    out.mkdir()
    with open(out / ".run.lock", "a+") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        assert cli("--set", *overrides(world, out)) == 2
        line = error_line(capsys.readouterr().err)
        assert "in use by another run" in line and "pid 4242" in line and str(out) in line
    assert not (out / "checkpoint_last.pth").exists()
    # a run killed with SIGKILL while holding the lock: the kernel released it
    code = (f"import fcntl, os, signal; f = open({str(out / '.run.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write('pid %d' % os.getpid()); f.flush(); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    assert cli("--set", *overrides(world, out)) == 0


# ------------------------------------------------------------------ resume
def test_resume_refuses_changes_that_cannot_continue_before_writing_anything(world, tmp_path, capsys):
    out = tmp_path / "r"
    assert cli("--set", *overrides(world, out)) == 0
    files = snapshot(out)
    for change in ({"model.vision.depth": 2, "train.batch_size": 16}, {"train.seed": 7},
                   {"train.precision": "fp16"}, {"data.max_words": 5}):
        capsys.readouterr()
        assert cli("--resume", str(out), "--set", *overrides(world, out, **change)) == 2, change
        line = error_line(capsys.readouterr().err)
        assert all(k in line for k in change) and "cannot resume" in line, line
        assert snapshot(out) == files  # config.yaml, checkpoint and log untouched
    # accepted changes are named and applied: a lower learning rate and a longer run
    capsys.readouterr()
    assert cli("--resume", str(out), "--set", *overrides(world, out, **{"train.max_steps": 4, "optim.lr": 1e-4,
                                                                       "optim.lr_vision": 1e-4})) == 0
    printed = capsys.readouterr().out
    assert "changed settings" in printed and "optim.lr: 0.0005 -> 0.0001" in printed and "train.max_steps: 2 -> 4" in printed
    log = {r["step"]: r for r in read_log(out)}
    assert sorted(log) == [1, 2, 3, 4]
    f = lr_lambda(load_config(PretrainConfig, DEMO, overrides(world, out)).schedule, 4)
    assert log[3]["lr"] == pytest.approx(1e-4 * f(3)) and log[4]["lr"] == pytest.approx(1e-4 * f(4))


def test_resume_rules_of_the_fine_tuning_tasks():
    from tasks.resume import resume_changes
    base = {"train": {"epochs": 1, "batch_size": 8, "precision": "fp32"}, "eval": {"k_test": 16, "batch_size": 8},
            "data": {"val_file": "v.json", "test_file": "t.json", "image_root": "a"},
            "generation": {"num_beams": 3, "use_cache": True}, "model": {"text": {"vocab_size": 500}}}

    def changed(task, **kv):
        new = json.loads(json.dumps(base))
        for key, value in kv.items():
            section, name = key.split("__")
            new.setdefault(section, {})[name] = value
        accepted, refused = resume_changes(base, new, task)
        return sorted(a.split(":")[0] for a in accepted), sorted(r.split(":")[0] for r in refused)

    assert changed("retrieval", eval__batch_size=64, train__epochs=3, data__test_file="x.json",
                   data__image_root="b") == (
        ["data.image_root", "data.test_file", "eval.batch_size", "train.epochs"], [])
    assert changed("retrieval", eval__k_test=4, data__val_file="w.json")[1] == ["data.val_file", "eval.k_test"]
    assert changed("caption", generation__num_beams=1, generation__use_cache=False) == (
        ["generation.use_cache"], ["generation.num_beams"])
    assert changed("vqa", train__precision="bf16") == (["train.precision"], [])
    assert changed("nlvr2", train__precision="fp16")[1] == ["train.precision"]
    assert changed("nlvr2", train__future_key=1) == ([], [])  # absent from the saved config: not compared
    new = json.loads(json.dumps(base))
    new["model"]["text"]["vocab_size"] = 30522  # set from the tokenizer (the checkpoint's): not compared
    assert resume_changes(base, new, "pretrain") == ([], [])


def test_fine_tuning_resume_with_a_changed_batch_is_refused_and_a_new_run_too(world, tmp_path, capsys):
    out = tmp_path / "ft"
    model = [x for x in overrides(world, out) if x.startswith(("model.vision.", "model.text.", "model.embed_dim",
                                                                "model.queue_size"))]
    sets = model + [f"data.train_files=[{world / 'retrieval_train.json'}]", f"data.val_file={world / 'retrieval_val.json'}",
                    f"data.test_file={world / 'retrieval_test.json'}", f"data.image_root={world}", "x-synthetic=null",
                    "data.num_workers=0", f"train.output_dir={out}", "train.batch_size=8", "train.max_steps=1",
                    "train.progress=false", "train.num_threads=1", "eval.k_test=4", "eval.progress=false"]
    assert run_finetune.main(["--task", "retrieval_shapes", "--set", *sets]) == 0
    files = snapshot(out)
    capsys.readouterr()
    assert run_finetune.main(["--task", "retrieval_shapes", "--resume", str(out), "--set", *sets,
                              "train.batch_size=16", "eval.k_test=8"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "train.batch_size: 8 -> 16" in line and "eval.k_test: 4 -> 8" in line
    assert run_finetune.main(["--task", "retrieval_shapes", "--set", *sets]) == 2
    assert "--overwrite" in error_line(capsys.readouterr().err)
    assert snapshot(out) == files


# ------------------------------------------------------------------ clean-up after kills
class Killed(BaseException):
    pass


def test_resume_after_a_kill_drops_repeated_log_lines_and_orphaned_tmp_files(world, tmp_path, monkeypatch):
    out = tmp_path / "k"
    original = Trainer._stop_requested

    def kill_after_step_3(self, stop):  # after step 3 was logged, before anything saved it (save_every 2)
        if self.state.global_step == 3:
            raise Killed
        return original(self, stop)

    monkeypatch.setattr(Trainer, "_stop_requested", kill_after_step_3)
    with pytest.raises(Killed):
        pretrain(load_config(PretrainConfig, DEMO, overrides(world, out, **{"train.max_steps": 5, "train.save_every": 2})))
    monkeypatch.setattr(Trainer, "_stop_requested", original)
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    for name in ("checkpoint_last.pth.k3j_8xq1.tmp", "config.yaml.tmp", "results.json.tmp"):  # killed writes
        (out / name).write_bytes(b"partial")
    (out / "notes.tmp").write_text("mine")  # not a pattern of ours
    pretrain(load_config(PretrainConfig, DEMO, overrides(world, out, **{"train.max_steps": 5, "train.save_every": 2})),
             resume=str(out))
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in out.glob("*.tmp")) == ["notes.tmp"]


def test_truncate_log_keeps_what_the_checkpoint_covers(tmp_path):
    from engine.rundir import truncate_log
    path = tmp_path / "log.jsonl"
    lines = [{"step": 1, "loss": 1}, {"step": 2, "loss": 1}, {"step": 2, "epoch": 0, "eval/acc": 3},
             {"step": 3, "loss": 1}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "lo')  # a line cut by a kill
    assert truncate_log(path, 2) == 2
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:3]
    # resumed from a checkpoint saved before the end-of-epoch evaluation: that evaluation runs again
    assert truncate_log(path, 2, drop_eval_at_step=True) == 1
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:2]
    assert list(tmp_path.iterdir()) == [path]


# ------------------------------------------------------------------ full disk
TORCH_ERROR = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 470")


@pytest.mark.parametrize("error", [TORCH_ERROR, OSError(errno.ENOSPC, "No space left on device")],
                         ids=["torch-unexpected-pos", "ENOSPC"])
def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(world, tmp_path, monkeypatch, capsys, error):
    out = tmp_path / "full"
    real, calls = torch.save, []

    def failing_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            return real(obj, f, *a, **k)
        f.write(b"PK\x03\x04 partial")
        raise error

    monkeypatch.setattr(C.torch, "save", failing_save)
    rc = cli("--set", *overrides(world, out, **{"train.max_steps": 3, "train.save_every": 1}))
    monkeypatch.setattr(C.torch, "save", real)
    assert rc == 1
    line = error_line(capsys.readouterr().err)
    assert str(out / "checkpoint_last.pth") in line and " free of " in line and "intact" in line
    assert C.load_checkpoint(out / "checkpoint_last.pth")["state"]["global_step"] == 1
    assert not list(out.glob("*.tmp"))


def test_full_disk_on_a_real_small_file_system(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here ({res.stderr.strip() or res.returncode}); the monkeypatched "
                    "writer test covers the same path")
    try:
        path = mnt / "checkpoint_last.pth"
        small = {"model": {"w": torch.arange(50_000, dtype=torch.float32)}}  # 200 kB
        C.atomic_torch_save(small, path)
        with open(mnt / "filler", "wb") as f:  # leave about 100 kB
            f.write(b"\0" * (shutil.disk_usage(mnt).free - 100_000))
        with pytest.raises(OSError) as info:
            C.atomic_torch_save({"model": {"w": torch.zeros(300_000)}}, path)  # 1.2 MB
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg and " free of " in msg and "intact" in msg, msg
        assert torch.equal(C.read_torch_file(path)["model"]["w"], small["model"]["w"])
        assert sorted(os.listdir(mnt)) == ["checkpoint_last.pth", "filler"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_elsewhere_than_a_checkpoint_is_one_line_too(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "fulllog"

    def no_space(self, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "_log", no_space)
    assert cli("--set", *overrides(world, out)) == 1
    line = error_line(capsys.readouterr().err)
    assert "no space left on device" in line and str(out) in line and " free of " in line
