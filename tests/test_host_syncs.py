"""The training loop moves logged values to the host only when it writes a log line: the number of
host transfers it makes (``Tensor.item``, ``float(tensor)``, ``bool(tensor)``, ``tolist``) does not
grow with the steps and micro-batches between two log lines; and the logged numbers are the means
of the micro-batch values, as Python floats would give them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from engine import distributed as D
from engine.trainer import NonFiniteLossError, OptimConfig, ScheduleConfig, Trainer, TrainConfig

TRAINER_FILE = str(Path(__file__).resolve().parents[1] / "engine" / "trainer.py")
MICRO = 2  # micro-batches per optimiser step


class ToyTask:
    """A linear model on fixed random data; every micro-batch logs two loss parts and a statistic."""

    def __init__(self, steps: int, nan_at: int = -1) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = [[(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(MICRO)]
                     for _ in range(steps)]
        self.nan_at = nan_at
        self.values: list[list[float]] = []  # per step, the micro-batches' "loss_a"

    def steps_per_epoch(self) -> int:
        return len(self.data)

    def train_batches(self, epoch: int, start_step: int):
        for step in self.data[start_step:]:
            yield [{"x": x, "y": y} for x, y in step]

    def train_step(self, model, batch: dict, state) -> dict:
        err = model(batch["x"]) - batch["y"]
        loss_a, loss_b = err.square().mean(), err.abs().mean()
        if state.global_step == self.nan_at:
            loss_b = loss_b * float("nan")
        self.values.append([float(loss_a.detach())])
        return {"loss": loss_a + loss_b, "loss_a": loss_a, "loss_b": loss_b, "err_max": err.detach().abs().max(),
                "_pairs": batch["x"].shape[0]}

    def evaluate(self, model, epoch: int):
        return None

    def checkpoint_extra(self) -> dict:
        return {}


def _fit(tmp_path: Path, steps: int, log_every: int, nan_at: int = -1):
    cfg = TrainConfig(output_dir=str(tmp_path), epochs=1, batch_size=8 * MICRO, grad_accum=MICRO, log_every=log_every,
                      save_every=10_000, progress=False, num_threads=1, device="cpu")
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    trainer = Trainer(cfg, OptimConfig(lr=1e-2), ScheduleConfig(warmup_steps=0), model,
                      [{"params": list(model.parameters())}], D.DistInfo(), cfg)
    task = ToyTask(steps, nan_at)
    trainer.fit(task)
    return task


@pytest.fixture
def host_syncs(monkeypatch):
    """Counts the trainer's own calls that move a tensor's value to the host."""
    calls: list[str] = []
    for name in ("item", "__float__", "__bool__", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if sys._getframe(1).f_code.co_filename == TRAINER_FILE:
                calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_host_syncs_happen_per_log_line_not_per_micro_batch(tmp_path, host_syncs):
    _fit(tmp_path / "short", steps=3, log_every=3)  # one log line
    short = len(host_syncs)
    host_syncs.clear()
    task = _fit(tmp_path / "long", steps=12, log_every=12)  # one log line, four times the steps
    assert len(host_syncs) == short <= 4, host_syncs  # the log line: the non-finite check, the means
    # the logged means are those of the micro-batch values (Python float arithmetic, as ever)
    record = json.loads((tmp_path / "long" / "log.jsonl").read_text().splitlines()[0])
    per_step = [sum(v[0] / MICRO for v in task.values[s * MICRO:(s + 1) * MICRO]) for s in range(12)]
    expect = 0.0
    for v in per_step:
        expect += v
    assert record["step"] == 12 and record["loss_a"] == expect / 12
    assert set(record) >= {"loss", "loss_a", "loss_b", "err_max", "lr", "pairs_per_s"}


def test_a_non_finite_loss_stops_at_the_next_log_line_naming_its_step(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2 \(epoch 0\): loss = nan; lower the "
                                                  r"learning rate"):
        _fit(tmp_path / "nan", steps=8, log_every=4, nan_at=2)
    # no log line and no checkpoint with the diverged weights
    assert not (tmp_path / "nan" / "log.jsonl").exists() and not (tmp_path / "nan" / "checkpoint_last.pth").exists()
