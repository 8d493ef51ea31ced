"""Typed run configuration: dataclass schemas, YAML files and command-line overrides.

Every run is described by a top-level dataclass (for example ``tasks.pretrain.PretrainConfig``)
whose fields are scalars, lists or nested dataclasses. A YAML file gives values for any subset of
the keys; ``--set section.key=value`` overrides them. Unknown keys and values of the wrong type
are errors that name the key and list the valid ones: a typo never silently falls back to a
default.

Field documentation lives in the schema (``field(metadata={"help": ...})``, see :func:`opt`) so
that the configuration reference in the docs is generated from it and cannot drift.
"""
from __future__ import annotations

import dataclasses
import io
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, TypeVar, Union, get_args, get_origin

from ruamel.yaml import YAML

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _yaml() -> YAML:
    y = YAML(typ="safe", pure=True)
    y.default_flow_style = False
    return y


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        inner = _type_name(args[0]) if args else "any"
        return f"list[{inner}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of {_fields_list(tp)}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"config key '{key}' may not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}; got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list ({_type_name(tp)}); got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}' expects {len(args)} values; got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true or false; got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' expects an integer; got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' expects a number; got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' expects a string; got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"config key '{key}' expects a mapping; got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported schema type {tp!r}")


def _fields_list(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, strictly: unknown keys and bad types raise."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or '<root>'}' must be a mapping; got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{(prefix + '.') if prefix else ''}{unknown[0]}' in {where}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}.{name}" if prefix else name)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as err:  # a schema's own check: a config error like any other
            raise ConfigError(str(err)) from None
    return obj


def to_dict(obj: Any) -> Any:
    """Plain nested dict/list form of a config (tuples become lists), ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must have the form key.subkey=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    value = _yaml().load(raw) if raw.strip() else None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars or flow lists) to ``data``."""
    for item in overrides or []:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping; a missing file or a non-mapping is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = _yaml().load(f)
        except Exception as err:  # ruamel raises several parser error types
            raise ConfigError(f"cannot parse YAML config {path}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Schema defaults <- YAML file <- overrides, validated strictly. Top-level keys that begin with
    ``x-`` are not part of the schema and are skipped: they hold settings for the programs that read
    the file before the run starts (the entry points)."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, {k: v for k, v in data.items() if not str(k).startswith("x-")})


def dump_yaml(obj: Any) -> str:
    buf = io.StringIO()
    _yaml().dump(to_dict(obj), buf)
    return buf.getvalue()


def save_config(obj: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dump_yaml(obj), encoding="utf-8")
    os.replace(tmp, path)


def iter_schema(cls: type, prefix: str = "") -> Iterator[tuple[str, str, Any, str]]:
    """Yield ``(key, type name, default, help)`` for every leaf key of a schema, depth first."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_schema(tp, key)
            continue
        yield key, _type_name(tp), to_dict(getattr(defaults, f.name)), f.metadata.get("help", "")


def schema_markdown(cls: type, title: str) -> str:
    """A Markdown table of every key of ``cls``: the config reference in the docs."""
    lines = [f"### {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tname, default, help_ in iter_schema(cls):
        d = "null" if default is None else repr(default) if isinstance(default, str) else str(default)
        lines.append(f"| `{key}` | {tname.replace('|', '&#124;')} | `{d}` | {help_} |")
    return "\n".join(lines) + "\n"
