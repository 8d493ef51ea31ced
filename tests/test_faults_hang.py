"""Nothing hangs: a failure in or beside a data-loading worker ends the run (and its workers) within
seconds with a non-zero exit; a signal to the process group still ends in a checkpoint (that test
is in test_pretrain_run.py); the process-group timeout comes from the config."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import run_finetune
from engine import distributed as D
from engine.loader import DataLoaderWorkerError, SafeDataLoader, live_worker_pids
from tests.pretrain_helpers import DEMO, ROOT, make_world, tiny_overrides

MODEL_KEYS = ("model.vision.", "model.text.", "model.embed_dim")
RUN_TIMEOUT_S = 90  # a run that fails on its first batches takes ~5-15 s on a loaded 2-core machine


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The tiny shapes world plus a truncated copy of one image (images/truncated.png)."""
    root = make_world(tmp_path_factory.mktemp("shapes_faults"))
    data = next((root / "images" / "test").glob("*.png")).read_bytes()
    (root / "images" / "truncated.png").write_bytes(data[: len(data) // 2])
    return root


# ---------------------------------------------------------------------- subprocess runs
def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of the process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


def run_cli(script: str, args: list[str], timeout: float = RUN_TIMEOUT_S) -> tuple[int, str, str, float]:
    """Run an entry point in its own process group; fail if it hangs or leaves a process behind.
    Returns (exit code, stdout, stderr, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{script} hung (killed after {timeout} s); stderr tail:\n{err[-2000:]}")
    seconds = time.time() - t0
    deadline = time.time() + 3
    while _group_members(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    left = _group_members(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"processes left behind by {script}: {left}"
    return proc.returncode, out, err, seconds


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def pretrain_args(world: Path, out: Path, **extra) -> list[str]:
    o = {"data.num_workers": 1, "train.num_threads": 1, **extra}
    return ["--config", str(DEMO), "--set", *tiny_overrides(world, out, **o)]


def test_pretrain_stopped_by_unreadable_images_while_workers_run_exits(world, tmp_path):
    """Bad images stop the run in the main process while a loader worker is busy: the run and the
    worker end within seconds, with one line naming the images and the config key."""
    records = json.loads((world / "pretrain.json").read_text())
    for i in range(20, 34):  # more than data.max_bad_fraction allows, after the first images (which exist)
        records[i]["image"] = f"images/missing_{i}.png"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    rc, _, err, _ = run_cli("run_pretrain.py", pretrain_args(world, tmp_path / "o", **{"data.train_files": f"[{bad}]"}))
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    (line,) = error_lines(err)
    assert "failed to load" in line and "missing_" in line and "data.max_bad_fraction" in line


def finetune_args(task: str, world: Path, out: Path, **extra) -> list[str]:
    keys = MODEL_KEYS + (("loss.queue_size",) if task.startswith("retrieval") else ())  # the tasks with a queue
    model = [o for o in tiny_overrides(world, out) if o.startswith(keys)]
    o = {"data.image_root": str(world), "x-synthetic": "null", "data.num_workers": 1,
         "train.output_dir": str(out), "train.epochs": 1, "train.max_steps": 1, "train.progress": "false",
         "train.num_threads": 1, "schedule.warmup_steps": 1, "tokenizer.vocab_size": 120, **extra}
    return ["--task", task, "--set", *model, *[f"{k}={v}" for k, v in o.items()]]


def with_truncated_image(src: Path, dst: Path, index: int) -> Path:
    records = json.loads(src.read_text())
    records[index]["image"] = "images/truncated.png"
    dst.write_text(json.dumps(records))
    return dst


def retrieval_files(world: Path) -> dict:
    return {"data.train_files": f"[{world / 'retrieval_train.json'}]", "data.val_file": str(world / "retrieval_val.json"),
            "data.test_file": str(world / "retrieval_test.json"), "train.batch_size": 8, "eval.k_test": 4,
            "eval.batch_size": 4, "eval.itm_batch_size": 8, "eval.progress": "false"}


def test_retrieval_with_a_truncated_test_image_exits_naming_the_record(world, tmp_path):
    files = retrieval_files(world)
    bad = files["data.test_file"] = with_truncated_image(world / "retrieval_test.json", tmp_path / "bad_test.json", 3)
    rc, _, err, _ = run_cli("run_finetune.py", finetune_args("retrieval_shapes", world, tmp_path / "o", **files))
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    (line,) = error_lines(err)
    assert str(bad) in line and "record 3" in line and "truncated.png" in line


def vqa_files(world: Path) -> dict:
    return {"data.train_files": f"[{world / 'vqa_train.json'}]", "data.val_file": str(world / "vqa_val.json"),
            "data.test_file": str(world / "vqa_test.json"), "data.test_gt_file": str(world / "vqa_test_gt.json"),
            "data.answer_list": str(world / "answer_list.json"), "data.eval_batch_size": 4, "train.batch_size": 8}


def test_vqa_with_a_truncated_val_image_exits_naming_the_question(world, tmp_path):
    val = json.loads((world / "vqa_val.json").read_text())
    bad = with_truncated_image(world / "vqa_val.json", tmp_path / "bad_val.json", 2)
    files = {**vqa_files(world), "data.val_file": str(bad)}
    rc, _, err, _ = run_cli("run_finetune.py", finetune_args("vqa_shapes", world, tmp_path / "o", **files))
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    (line,) = error_lines(err)
    assert str(bad) in line and f"question_id {val[2]['question_id']}" in line and "truncated.png" in line


def test_a_missing_image_root_is_one_line_before_any_loader_starts(world, tmp_path, capsys):
    import run_pretrain
    missing = {"data.image_root": str(tmp_path / "no" / "such")}
    assert run_pretrain.main(pretrain_args(world, tmp_path / "p", **missing)) == 2
    assert run_finetune.main(finetune_args("vqa_shapes", world, tmp_path / "v", **vqa_files(world), **missing)) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == err.splitlines() and len(error_lines(err)) == 2
    assert all(f"data.image_root={missing['data.image_root']}: no such directory" in l for l in error_lines(err))
    # an image_root that holds none of the annotations' images is caught too
    assert run_pretrain.main(pretrain_args(world, tmp_path / "p", **{"data.image_root": str(tmp_path)})) == 2
    assert "none of the first 16 images" in capsys.readouterr().err
    assert live_worker_pids() == []


def test_a_bug_in_a_worker_with_the_iteration_still_open_does_not_hang(tmp_path):
    """An unexpected exception type keeps its traceback, and the interpreter still exits at once
    although the traceback keeps the open iteration (and its workers) referenced."""
    script = tmp_path / "bug.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import torch\n"
        "from torch.utils.data import Dataset\n"
        "from engine.loader import SafeDataLoader\n"
        "class Bug(Dataset):\n"
        "    def __len__(self): return 16\n"
        "    def __getitem__(self, i): return torch.zeros(1) if i < 4 else None + 1\n"
        "it = iter(SafeDataLoader(Bug(), batch_size=2, num_workers=2))\n"
        "held = [it, next(it)]\n"
        "for _ in range(8): held.append(next(it))\n")
    rc, _, err, seconds = run_cli(str(script), [], timeout=60)
    assert rc == 1 and "TypeError" in err and "Traceback" in err
    assert seconds < 30


# ---------------------------------------------------------------------- the loader itself, in process
class Numbers(Dataset):
    """0..n-1; index ``bad`` raises ValueError naming a record; items from ``slow_from`` on take
    ``delay`` seconds."""

    def __init__(self, n: int = 24, bad: int = -1, delay: float = 0.0, slow_from: int = 0) -> None:
        self.n, self.bad, self.delay, self.slow_from = n, bad, delay, slow_from

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.delay and i >= self.slow_from:
            time.sleep(self.delay)
        if i == self.bad:
            raise ValueError(f"'ann.json' record {i}: cannot load image 'x.png': truncated")
        return torch.tensor([i])


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_worker_error_is_the_workers_one_line_message_and_the_workers_are_gone():
    it = iter(SafeDataLoader(Numbers(bad=9), batch_size=2, num_workers=2))
    next(it)
    pids = live_worker_pids()
    assert len(pids) == 2
    with pytest.raises(DataLoaderWorkerError) as info:
        for _ in it:
            pass
    err = info.value
    assert str(err).startswith("'ann.json' record 9: cannot load image 'x.png': truncated (in data-loading worker ")
    assert err.type_name == "ValueError" and err.data_error and "__getitem__" in err.worker_traceback
    assert not any(alive(p) for p in pids) and live_worker_pids() == []


def test_workers_ignore_stop_signals_while_used_and_stop_with_the_iteration():
    it = iter(SafeDataLoader(Numbers(n=16, delay=0.02), batch_size=1, num_workers=2))
    got = [int(next(it))]
    pids = live_worker_pids()
    for p in pids:  # as a batch scheduler or Ctrl-C signals the whole group
        os.kill(p, signal.SIGTERM)
        os.kill(p, signal.SIGINT)
    got += [int(b) for b in it]
    assert got == list(range(16))
    assert not any(alive(p) for p in pids)


def test_an_error_in_the_consumer_or_an_early_stop_shuts_the_workers_down():
    loader = SafeDataLoader(Numbers(), batch_size=1, num_workers=2)
    pids: list[int] = []

    def consume():
        for _ in loader:
            pids.extend(live_worker_pids())
            raise KeyError("in the consumer")

    with pytest.raises(KeyError):
        consume()
    assert len(pids) == 2 and not any(alive(p) for p in pids)
    for _, _ in zip(range(3), loader):  # stops early
        pids = live_worker_pids()
    assert live_worker_pids() == [] and not any(alive(p) for p in pids)


def test_persistent_workers_live_across_passes_and_go_with_their_loader():
    loader = SafeDataLoader(Numbers(n=8), batch_size=2, num_workers=2, persistent_workers=True)
    first = [b.tolist() for b in loader]
    pids = live_worker_pids()
    assert len(pids) == 2 and [b.tolist() for b in loader] == first and live_worker_pids() == pids
    del loader
    assert live_worker_pids() == [] and not any(alive(p) for p in pids)


def test_a_busy_worker_that_ignores_every_signal_is_killed(monkeypatch):
    from torch.utils.data import _utils
    monkeypatch.setattr(_utils, "MP_STATUS_CHECK_INTERVAL", 0.2)  # torch's own join and SIGTERM: quick
    deaf = lambda _w: [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)]  # noqa: E731
    it = iter(SafeDataLoader(Numbers(n=8, delay=60.0, slow_from=1), batch_size=1, num_workers=1, worker_init_fn=deaf))
    next(it)  # the worker is now busy with item 1 (60 s) and deaf to SIGTERM
    (pid,) = live_worker_pids()
    t0 = time.time()
    it.close()
    assert not alive(pid) and time.time() - t0 < 10


def test_an_error_in_a_training_worker_of_a_finetuning_task_shuts_the_workers_down():
    """SampledTrainData: the training loader of every fine-tuning task."""
    from engine.trainer import TrainConfig
    from tasks.train_data import SampledTrainData

    from datasets.formats import epoch_and_index

    class Epochs(Numbers):  # a training dataset: its indices carry their epoch
        def set_epoch(self, epoch: int) -> None:
            pass

        def __getitem__(self, index):
            return super().__getitem__(epoch_and_index(index, 0)[1])

    data = SampledTrainData(Epochs(bad=13), lambda items: {"x": torch.stack(items)}, TrainConfig(batch_size=2, seed=0),
                            D.DistInfo(), num_workers=2)
    with pytest.raises(DataLoaderWorkerError, match="record 13: cannot load image"):
        for _ in data.batches(0, 0):
            assert len(live_worker_pids()) == 2
    assert live_worker_pids() == []


# ---------------------------------------------------------------------- the process-group timeout
class _Started(Exception):
    pass


@pytest.fixture
def fake_two_processes(monkeypatch):
    """WORLD_SIZE=2 with a process-group start that records its timeout and stops the run."""
    seen = {}

    def init_process_group(backend, timeout):
        seen["timeout_s"] = timeout.total_seconds()
        raise _Started

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(D.dist, "init_process_group", init_process_group)
    return seen


def test_dist_timeout_reaches_the_process_group_of_every_entry_point(world, tmp_path, fake_two_processes):
    import run_pretrain
    with pytest.raises(_Started):
        run_pretrain.main(pretrain_args(world, tmp_path / "p", **{"train.dist_timeout_s": 77}))
    assert fake_two_processes.pop("timeout_s") == 77
    with pytest.raises(_Started):  # the default: torch's 30 min
        run_pretrain.main(pretrain_args(world, tmp_path / "p"))
    assert fake_two_processes.pop("timeout_s") == 1800
    for task in run_finetune.TASKS:  # every fine-tuning task starts its processes through start_run
        if task.endswith("_shapes"):
            with pytest.raises(_Started):
                run_finetune.main(finetune_args(task, world, tmp_path / task, **{"train.dist_timeout_s": 33}))
            assert fake_two_processes.pop("timeout_s") == 33, task


def test_dist_timeout_must_be_positive(world, tmp_path, capsys):
    import run_pretrain
    assert run_pretrain.main(pretrain_args(world, tmp_path / "p", **{"train.dist_timeout_s": 0})) == 2
    assert "train.dist_timeout_s must be positive" in capsys.readouterr().err
