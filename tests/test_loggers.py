"""Logging sinks: what goes to log.jsonl goes to TensorBoard (read back with tensorboard's own
reader), a resume drops the events after its step, and the errors name the key and the package."""
from __future__ import annotations

import json
import sys
import time

import pytest

from engine.loggers import LoggerError, build_loggers, check_logger_names, scalars


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_jsonl_value_reaches_tensorboard(tmp_path):
    loggers = build_loggers(["jsonl", "tensorboard"], tmp_path)
    records = [{"step": s, "loss": 1.0 / s, "lr": 1e-4 * s, "epoch": 0, "note": "text", "nan": float("nan")}
               for s in (1, 2, 3)]
    for r in records:
        loggers.log(r)
    loggers.close()
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    events = _events(tmp_path / "tensorboard")
    assert set(events) == {"loss", "lr", "epoch"}  # numbers only; the step is the x axis
    for key in ("loss", "lr"):
        assert [s for s, _ in events[key]] == [1, 2, 3]
        assert [v for _, v in events[key]] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_resume_drops_the_events_after_its_step(tmp_path):
    first = build_loggers(["jsonl", "tensorboard"], tmp_path)
    for s in range(1, 6):
        first.log({"step": s, "loss": float(s)})
    first.close()
    again = build_loggers(["jsonl", "tensorboard"], tmp_path, resume_step=3)  # killed after step 5, resumed at 3
    for s in range(3, 6):
        again.log({"step": s, "loss": 10.0 + s})
    again.close()
    assert _events(tmp_path / "tensorboard")["loss"] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]


def test_names_are_checked():
    with pytest.raises(ValueError, match="train.loggers: unknown"):
        check_logger_names(["jsonl", "mlflow"])
    with pytest.raises(ValueError, match="must include 'jsonl'"):
        check_logger_names(["tensorboard"])


def test_missing_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    with pytest.raises(LoggerError, match=r"^train.loggers: 'wandb' needs the wandb package \(pip install wandb\)$"):
        build_loggers(["jsonl", "wandb"], tmp_path)


def test_scalars_keep_finite_numbers():
    assert scalars({"step": 3, "a": 1, "b": 2.5, "c": True, "d": "x", "e": float("inf")}) == {"a": 1.0, "b": 2.5}


def test_wandb_offline_run_holds_every_value(tmp_path, monkeypatch):
    """A real offline W&B run (no network): its run file holds each logged key and value (history items
    are stored as the key and the value's JSON text)."""
    import wandb  # noqa: F401  (installed by the test requirements)
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = build_loggers(["jsonl", "wandb"], tmp_path / "run", config={"train": {"lr": 1e-4}})
    for s, loss in ((1, 0.625), (2, 0.3125)):
        loggers.log({"step": s, "loss/itc_special": loss, "note": "not a number"})
    loggers.close()
    [run_file] = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + 60  # W&B's writer process may still be flushing when finish() returns
    while b"0.3125" not in (data := run_file.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"loss/itc_special" in data and b"0.625" in data and b"0.3125" in data
    assert b"not a number" not in data


def test_a_training_run_logs_to_tensorboard_what_it_logs_to_jsonl(tmp_path):
    """train.loggers=[jsonl, tensorboard] in a real (tiny) pre-training run: every numeric value of
    every log.jsonl line is in the event file, at its step."""
    from engine.config import load_config
    from tasks.pretrain import PretrainConfig, run
    from tests.pretrain_helpers import DEMO, make_world, tiny_overrides
    world = make_world(tmp_path / "world")
    out = tmp_path / "run"
    run(load_config(PretrainConfig, DEMO, tiny_overrides(world, out, **{
        "train.max_steps": 3, "train.epochs": 1, "train.num_threads": 1, "train.loggers": "[jsonl, tensorboard]"})))
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    events = _events(out / "tensorboard")
    for line in lines:
        for key, value in scalars(line).items():
            assert (line["step"], pytest.approx(value, rel=1e-6)) in [(s, v) for s, v in events[key]], key


def test_unknown_logger_is_a_config_error(tmp_path):
    from engine.config import ConfigError, load_config
    from tasks.pretrain import PretrainConfig
    from tests.pretrain_helpers import DEMO
    with pytest.raises((ConfigError, ValueError), match="train.loggers: unknown"):
        load_config(PretrainConfig, DEMO, ["train.loggers=[jsonl, mlflow]"])
