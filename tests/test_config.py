"""Config schema: strict keys, types, overrides, round trip."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from engine.config import (ConfigError, apply_overrides, dump_yaml, from_dict, load_config, opt,
                           read_yaml, schema_markdown, to_dict)


@dataclass
class Inner:
    lr: float = opt(1e-4, "learning rate")
    kind: Literal["a", "b"] = opt("a", "kind")
    path: Optional[str] = opt(None, "a path")


@dataclass
class Outer:
    inner: Inner = opt(Inner, "inner section")
    steps: int = opt(10, "steps")
    flag: bool = opt(False, "flag")
    files: list[str] = opt(["x.json"], "files")
    betas: tuple[float, float] = opt((0.9, 0.999), "betas")


def test_defaults_and_nested_values():
    cfg = from_dict(Outer, {"inner": {"lr": 3}, "steps": 5})
    assert cfg.inner.lr == 3.0 and isinstance(cfg.inner.lr, float)
    assert cfg.steps == 5 and cfg.inner.kind == "a" and cfg.files == ["x.json"]


def test_unknown_key_names_key_and_lists_valid():
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {"inner": {"lrr": 1.0}})
    msg = str(e.value)
    assert "inner.lrr" in msg and "kind" in msg and "lr" in msg and "path" in msg
    with pytest.raises(ConfigError, match="stepz"):
        from_dict(Outer, {"stepz": 1})


@pytest.mark.parametrize("data,key", [
    ({"steps": "ten"}, "steps"),
    ({"steps": 1.5}, "steps"),
    ({"flag": "yes"}, "flag"),
    ({"inner": {"kind": "c"}}, "inner.kind"),
    ({"inner": {"lr": "fast"}}, "inner.lr"),
    ({"files": "x.json"}, "files"),
    ({"betas": [0.9]}, "betas"),
    ({"inner": 3}, "inner"),
])
def test_wrong_types_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data)
    assert f"'{key}'" in str(e.value)


def test_overrides_parse_yaml_scalars(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 3\ninner:\n  lr: 0.5\n")
    cfg = load_config(Outer, p, ["inner.lr=1e-3", "flag=true", "files=[a.json, b.json]", "inner.path=null",
                                 "inner.kind=b"])
    assert cfg.inner.lr == 1e-3 and cfg.flag is True and cfg.files == ["a.json", "b.json"]
    assert cfg.inner.path is None and cfg.inner.kind == "b" and cfg.steps == 3
    with pytest.raises(ConfigError, match="inner.nope"):
        load_config(Outer, p, ["inner.nope=1"])
    with pytest.raises(ConfigError, match="key.subkey=value"):
        apply_overrides({}, ["novalue"])


def test_round_trip_through_yaml(tmp_path):
    cfg = from_dict(Outer, {"inner": {"kind": "b", "path": "p"}, "betas": [0.8, 0.9]})
    p = tmp_path / "out.yaml"
    p.write_text(dump_yaml(cfg))
    again = from_dict(Outer, read_yaml(p))
    assert to_dict(again) == to_dict(cfg)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.yaml"):
        load_config(Outer, tmp_path / "nothere.yaml")


def test_schema_markdown_lists_every_leaf():
    md = schema_markdown(Outer, "Outer")
    for key in ("inner.lr", "inner.kind", "inner.path", "steps", "flag", "files", "betas"):
        assert f"`{key}`" in md


def test_a_schemas_own_check_is_a_clear_cli_error(capsys):
    """validate() failures (value out of range) reach the user as a one-line error, exit 2."""
    import run_finetune

    with pytest.raises(ConfigError, match=r"loss.label_smoothing must be in \[0, 1\); got 1.0"):
        from tasks.vqa import VQAConfig
        load_config(VQAConfig, None, ["loss.label_smoothing=1.0"])
    assert run_finetune.main(["--task", "caption_shapes", "--set", "loss.label_smoothing=-0.1"]) == 2
    err = capsys.readouterr().err
    assert "loss.label_smoothing must be in [0, 1); got -0.1" in err and "Traceback" not in err


def test_include_merges_files_under_the_including_one(tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "base.yaml").write_text("inner: {lr: 0.5, kind: b}\nsteps: 7\nfiles: [a.json, b.json]\n")
    (tmp_path / "more.yaml").write_text("include: presets/base.yaml\ninner: {path: p}\n")
    main = tmp_path / "main.yaml"
    main.write_text("include: [more.yaml]\ninner: {lr: 0.25}\nfiles: [c.json]\n")
    cfg = load_config(Outer, main, ["inner.kind=a"])
    # mappings merge key by key; lists and scalars replace; the including file wins, --set last
    assert cfg.inner.lr == 0.25 and cfg.inner.path == "p" and cfg.inner.kind == "a" and cfg.steps == 7
    assert cfg.files == ["c.json"]
    from engine.config import load_config_data
    assert load_config_data(main) == {"inner": {"lr": 0.25, "kind": "b", "path": "p"}, "steps": 7, "files": ["c.json"]}
    # unknown keys in an included file are errors as anywhere else
    (tmp_path / "presets" / "base.yaml").write_text("inner: {lrr: 1}\n")
    with pytest.raises(ConfigError, match="inner.lrr"):
        load_config(Outer, main)


@pytest.mark.parametrize("text,match", [
    ("include: nothere.yaml\n", "nothere.yaml not found"),
    ("include: {a: 1}\n", "'include' must be a file name"),
    ("include: c.yaml\n", r"cycle \(c.yaml -> c.yaml\)"),
])
def test_bad_include_is_a_clear_error(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(Outer, p)
