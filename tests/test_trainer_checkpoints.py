"""What the training loop keeps in ``train.output_dir``: ``checkpoint_last.pth`` and, with a val
metric, ``checkpoint_best.pth`` by default (a paper-scale checkpoint is about 3 GB), a copy per epoch
only with ``train.keep_epoch_checkpoints``; no file the run did not write is touched. And the batch
geometry check: one line with the sizes and the ``--set`` that fixes it."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from engine import distributed as D
from engine.config import ConfigError, load_config
from engine.batching import EpochBatchSampler, check_batch_size
from engine.trainer import OptimConfig, ScheduleConfig, Trainer, TrainConfig
from tests.pretrain_helpers import ROOT


class EpochTask:
    """A linear model on fixed data, 2 steps an epoch; the val metric of epoch e is ``metrics[e]``."""

    def __init__(self, metrics: list[float]) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(2)]
        self.metrics = metrics

    def steps_per_epoch(self) -> int:
        return len(self.data)

    def train_batches(self, epoch: int, start_step: int):
        for x, y in self.data[start_step:]:
            yield [{"x": x, "y": y}]

    def train_step(self, model, batch: dict, state) -> dict:
        return {"loss": (model(batch["x"]) - batch["y"]).square().mean(), "_pairs": 4}

    def evaluate(self, model, epoch: int):
        return {"acc": self.metrics[epoch]} if self.metrics else None

    def checkpoint_extra(self) -> dict:
        return {}


def _fit(out, metrics: list[float], **train) -> set[str]:
    cfg = TrainConfig(output_dir=str(out), epochs=3, batch_size=4, log_every=1, save_every=1000, progress=False,
                      num_threads=1, device="cpu", **train)
    model = nn.Linear(3, 1)
    trainer = Trainer(cfg, OptimConfig(lr=1e-2), ScheduleConfig(warmup_steps=0), model,
                      [{"params": list(model.parameters())}], D.DistInfo(), cfg)
    trainer.fit(EpochTask(metrics), metric_key="acc" if metrics else None)
    return {p.name for p in out.iterdir() if p.suffix == ".pth"}


def test_a_run_keeps_the_last_and_the_best_checkpoint_only_by_default(tmp_path):
    assert TrainConfig().keep_epoch_checkpoints is False
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a file the run did not write stays as it is
    assert _fit(out, [0.5, 0.4, 0.7]) == {"checkpoint_last.pth", "checkpoint_best.pth"}
    assert (out / "notes.txt").read_text() == "mine"
    best = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert best["state"]["global_step"] == 6 and best["state"]["best_metric"] == pytest.approx(0.7)
    # without a val metric (pre-training): the last checkpoint only
    assert _fit(tmp_path / "no_val", []) == {"checkpoint_last.pth"}
    # asked for: a copy at every epoch's end too
    assert _fit(tmp_path / "epochs", [0.5, 0.4, 0.7], keep_epoch_checkpoints=True) == {
        "checkpoint_last.pth", "checkpoint_best.pth", "checkpoint_00.pth", "checkpoint_01.pth", "checkpoint_02.pth"}


def test_the_paper_configs_keep_no_per_epoch_checkpoints():
    from tasks.pretrain_config import PretrainConfig

    assert load_config(PretrainConfig, ROOT / "configs/pretrain.yaml", []).train.keep_epoch_checkpoints is False


def test_batch_geometry_errors_name_the_sizes_and_the_fix():
    with pytest.raises(ConfigError, match=r"^the training set has 36 samples, fewer than one global batch of "
                                          r"train\.batch_size=256 \(1 process\(es\) x train\.grad_accum=1\); lower the "
                                          r"batch to at most the data: --set train\.batch_size=36$"):
        EpochBatchSampler(36, 256, 1, 0, 1, seed=0)
    with pytest.raises(ConfigError, match=r"12 samples.*\(4 process\(es\) x train\.grad_accum=2\).*"
                                          r"--set train\.batch_size=8$"):
        check_batch_size(12, 64, 2, 4)
    with pytest.raises(ConfigError, match=r"--set train\.batch_size=4 train\.grad_accum=1$"):
        check_batch_size(5, 64, 4, 2)
    with pytest.raises(ConfigError, match=r"at most 2 process\(es\)$"):
        check_batch_size(2, 64, 1, 4)
    with pytest.raises(ConfigError, match=r"train\.batch_size=30 does not split into 4 process\(es\) x "
                                          r"train\.grad_accum=2 .*--set train\.batch_size=24$"):
        check_batch_size(100, 30, 2, 4)
    assert len(EpochBatchSampler(36, 36, 1, 0, 1, seed=0)) == 1
