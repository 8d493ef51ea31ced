"""Tiny pre-training runs shared by the end-to-end tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shapesworld.config import ShapesConfig
from shapesworld.write import ensure_shapes

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/demo/pretrain.yaml"

TINY_SHAPES = ShapesConfig(seed=3, image_size=32, num_train_images=48, num_val_images=8, num_test_images=8,
                           captions_per_image=2, vqa_questions_per_image=1, nlvr2_pairs=(8, 4, 4))


# a model small enough that a step takes milliseconds
TINY_MODEL = {
    "model.vision.img_size": 32, "model.vision.patch_size": 8, "model.vision.width": 32,
    "model.vision.depth": 1, "model.vision.num_heads": 2,
    "model.text.hidden_size": 32, "model.text.num_text_layers": 1, "model.text.num_fusion_layers": 1,
    "model.text.num_heads": 2, "model.text.intermediate_size": 64, "model.embed_dim": 16,
}


def make_world(root: Path) -> Path:
    ensure_shapes(root, TINY_SHAPES)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster on a shared, loaded CPU (a module that
    imports this fixture gets it for every test)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The tiny shapes world, written once per test module that imports this fixture."""
    return make_world(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def pretrained(world, tmp_path_factory) -> Path:
    """A tiny pre-training checkpoint (one epoch on the tiny world), once per test module."""
    return tiny_pretrain_checkpoint(world, tmp_path_factory.mktemp("pre"))


def tiny_pretrain_checkpoint(world: Path, out: Path) -> Path:
    """A tiny pre-training checkpoint of this project: one epoch on the tiny ``world``, one thread."""
    from engine.config import load_config
    from tasks.pretrain import PretrainConfig, run

    torch.set_num_threads(1)
    run(load_config(PretrainConfig, DEMO, tiny_overrides(world, out, **{"train.epochs": 1, "train.num_threads": 1})))
    return out / "checkpoint_last.pth"


def tiny_overrides(data_root: Path, out_dir: Path, **extra) -> list[str]:
    """A model small enough that a step takes milliseconds; no dropout, so runs are comparable."""
    o = {
        **TINY_MODEL, "model.text.hidden_dropout": 0.0, "model.text.attention_dropout": 0.0,
        "loss.queue_size": 32, "loss.contrastive.queue_start_step": 0,
        "tokenizer.vocab_size": 120,
        "data.train_files": f"[{data_root / 'pretrain.json'}]", "data.image_root": str(data_root),
        "x-synthetic": "null", "data.num_workers": 0,
        "train.output_dir": str(out_dir), "train.batch_size": 8, "train.epochs": 2,
        "train.log_every": 1, "train.save_every": 1000, "train.progress": "false",
        "schedule.warmup_steps": 2, "diagnostics.every": 0,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def read_log(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_losses(out_dir: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_log(out_dir) if key in r}


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (an installed package named ``benchmarks`` may shadow the folder)."""
    import importlib.util
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(name, root / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
