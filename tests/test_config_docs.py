"""docs/config_reference.md is generated from the config schemas and must be current."""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass

import pytest

from engine.config import iter_schema, opt
from tools.config_docs import DOC, REGENERATE, discover, find_config_class, generate


def test_committed_reference_is_current():
    text = generate()
    assert DOC.is_file(), f"{DOC} is missing; generate it with: {REGENERATE}"
    assert DOC.read_text(encoding="utf-8") == text, (
        f"{DOC.name} is out of date with the config schemas (a key was added, removed or changed, or a task "
        f"config appeared); regenerate it with: {REGENERATE}")


def test_every_documented_key_has_help():
    entries, _ = discover()
    assert entries[0].cls.__name__ == "PretrainConfig"
    for e in entries:
        missing = [key for key, _, _, help_ in iter_schema(e.cls) if not help_.strip()]
        assert not missing, f"{e.module}.{e.cls.__name__}: config keys without a help text: {missing}"


@dataclass
class _Cfg:
    lr: float = opt(1e-4, "learning rate")


def test_discovery_convention():
    by_attr = types.ModuleType("fake_a")
    by_attr.CONFIG_CLASS = _Cfg
    assert find_config_class(by_attr) == (_Cfg, "CONFIG_CLASS")

    by_annotation = types.ModuleType("fake_b")

    def run(cfg: _Cfg, checkpoint=None):  # noqa: ARG001
        return None

    by_annotation.run = run
    cls, how = find_config_class(by_annotation)
    assert cls is _Cfg and "annotation" in how

    nothing = types.ModuleType("fake_c")
    nothing.run = lambda cfg: None
    assert find_config_class(nothing) == (None, "")

    wrong = types.ModuleType("fake_d")
    wrong.CONFIG_CLASS = dict
    with pytest.raises(TypeError, match="must be a dataclass"):
        find_config_class(wrong)


def test_generated_text_lists_keys_and_convention():
    text = generate()
    assert "CONFIG_CLASS" in text and REGENERATE in text
    assert "| `model.vision.width` |" in text and "| `loss.contrastive.delta` |" in text
    assert all(dataclasses.is_dataclass(e.cls) for e in discover()[0])


def test_a_task_spec_names_the_config_class():
    by_spec = types.ModuleType("fake_s")
    by_spec.SPEC = types.SimpleNamespace(config_cls=_Cfg)
    by_spec.CONFIG_CLASS = dict  # the spec comes first
    assert find_config_class(by_spec) == (_Cfg, "SPEC.config_cls")
    # the shared fine-tuning sections are documented once; a task lists its own sections
    text = generate()
    assert "## tasks.finetune_config.FinetuneConfig" in text
    vqa = text.split("## tasks.vqa.VQAConfig")[1].split("\n## ")[0]
    assert "| `decoder.num_layers` |" in vqa and "| `train.epochs` |" not in vqa and "FinetuneConfig" in vqa
