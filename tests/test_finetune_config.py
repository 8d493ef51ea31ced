"""tasks/finetune_config.py: a fine-tuning run takes its model section from the checkpoint; the task
config may change only the allow-listed keys; the shared sections are defined once."""
from __future__ import annotations

import dataclasses

import pytest

from engine.config import ConfigError, from_dict, load_config_data, to_dict
from models.vlp import VLPConfig
from tasks.finetune_config import MODEL_MAY_DIFFER, MODEL_OWN, FinetuneConfig, model_from_checkpoint
from tests.pretrain_helpers import ROOT

TINY = {"vision": {"img_size": 32, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2},
        "text": {"vocab_size": 120, "hidden_size": 32, "num_text_layers": 1, "num_fusion_layers": 1, "num_heads": 2,
                 "intermediate_size": 64, "hidden_dropout": 0.0, "attention_dropout": 0.0},
        "embed_dim": 16, "temp": 0.05}


def saved() -> dict:
    return to_dict(from_dict(VLPConfig, TINY))


def test_keys_the_config_does_not_set_are_the_checkpoints():
    task = from_dict(VLPConfig, {})  # the schema's ViT-B defaults
    got = model_from_checkpoint(task, saved(), "ck.pth", given={})
    assert to_dict(got) == saved()
    # image size, dropout, drop path: set, they win; set to the checkpoint's value: fine
    given = {"vision": {"img_size": 64, "width": 32, "num_heads": 2, "drop_path": 0.1}, "text": {"hidden_dropout": 0.1}}
    got = model_from_checkpoint(from_dict(VLPConfig, given), saved(), "ck.pth", given=given)
    assert got.vision.img_size == 64 and got.text.hidden_dropout == 0.1 and got.vision.drop_path == 0.1
    assert got.vision.width == 32 and got.text.hidden_size == 32 and got.text.attention_dropout == 0.0
    assert got.temp == 0.05


def test_an_architecture_key_that_differs_is_one_line_naming_it():
    given = {"vision": {"width": 64, "num_heads": 2, "img_size": 48}, "text": {"num_heads": 4}}
    with pytest.raises(ConfigError) as err:
        model_from_checkpoint(from_dict(VLPConfig, given), saved(), "ck.pth", given=given)
    msg = str(err.value)
    assert "\n" not in msg and "ck.pth" in msg
    assert "model.vision.width: checkpoint 32, config 64" in msg
    assert "model.text.num_heads: checkpoint 2, config 4" in msg
    assert "img_size: checkpoint" not in msg  # allowed to differ


def test_without_given_keys_every_key_of_the_config_is_compared():
    """run(cfg) called with a config object: all of cfg.model is what the caller set."""
    cfg = from_dict(VLPConfig, {**TINY, "text": {**TINY["text"], "hidden_dropout": 0.1},
                                "vision": {**TINY["vision"], "drop_path": 0.2}})
    got = model_from_checkpoint(cfg, saved(), "ck.pth")
    assert got.text.hidden_dropout == 0.1 and got.vision.drop_path == 0.2
    with pytest.raises(ConfigError, match="model.embed_dim: checkpoint 16, config 256"):
        model_from_checkpoint(from_dict(VLPConfig, {k: v for k, v in TINY.items() if k != "embed_dim"}), saved(), "c")


def test_weight_files_are_never_the_checkpoints():
    """A pre-training checkpoint names the CLIP / BERT files it started from: a run from it (or a
    resume of that run without --checkpoint) must not read them."""
    ck = {**saved(), "vision_weights": "pretrained/clip.pt", "text_weights": "pretrained/bert"}
    got = model_from_checkpoint(from_dict(VLPConfig, {}), ck, "ck.pth", given={})
    assert got.vision_weights is None and got.text_weights is None and got.vision.width == 32


def test_older_and_foreign_checkpoints():
    task = from_dict(VLPConfig, TINY)
    old = saved()
    del old["text"]["layer_norm_eps"], old["temp_max"]  # a checkpoint older than these keys
    old["removed_key"] = 1  # a key this version does not have
    got = model_from_checkpoint(dataclasses.replace(task, temp_max=0.4), old, "old.pth", given={"temp_max": 0.4})
    assert got.temp_max == 0.4 and got.text.layer_norm_eps == task.text.layer_norm_eps
    assert model_from_checkpoint(task, None, "albef.pth", given={}) is task  # no config of ours: as it is


def test_the_allow_list_names_existing_keys():
    leaves = set()

    def walk(d, prefix=""):
        for k, v in d.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else leaves.add(prefix + k)

    walk(to_dict(VLPConfig()))
    assert set(MODEL_MAY_DIFFER) | set(MODEL_OWN) <= leaves
    assert {"vision.img_size", "vision.drop_path", "text.hidden_dropout", "vision.grad_checkpointing"} \
        <= set(MODEL_MAY_DIFFER)


def test_shared_sections_are_defined_once():
    from tasks.caption import CaptionConfig
    from tasks.nlvr2 import NLVR2Config
    from tasks.retrieval import RetrievalConfig
    from tasks.vqa import VQAConfig

    shared = {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert shared == {"model", "tokenizer", "optim", "schedule", "train"}
    for cls in (RetrievalConfig, VQAConfig, NLVR2Config, CaptionConfig):
        assert issubclass(cls, FinetuneConfig)
        own = {n for n, f in cls.__dataclass_fields__.items() if f not in FinetuneConfig.__dataclass_fields__.values()}
        assert shared.isdisjoint(own), cls


@pytest.mark.parametrize("config,preset", [
    ("configs/retrieval_flickr.yaml", "vit_b16_bert_base"), ("configs/vqa.yaml", "vit_b16_bert_base"),
    ("configs/nlvr2.yaml", "vit_b16_bert_base"), ("configs/caption_coco.yaml", "vit_b16_bert_base"),
    ("configs/pretrain.yaml", "vit_b16_bert_base"), ("configs/demo/vqa.yaml", "demo_tiny"),
    ("configs/demo/retrieval.yaml", "demo_tiny"), ("configs/demo/pretrain.yaml", "demo_tiny")])
def test_configs_take_the_architecture_from_a_model_preset(config, preset):
    model = load_config_data(ROOT / config)["model"]
    arch = load_config_data(ROOT / f"configs/models/{preset}.yaml")["model"]
    for section in ("vision", "text"):
        for key, value in arch[section].items():
            if key != "img_size":  # fine-tuning at 384 px
                assert model[section][key] == value, (config, section, key)
    assert model["embed_dim"] == arch["embed_dim"]
