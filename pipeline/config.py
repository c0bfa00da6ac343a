"""Stage configs from dataclass defaults, a YAML file, flags and `--set key=value` overrides.

Precedence (lowest to highest): dataclass defaults < `--config FILE.yaml` < explicit flags
< `--set` overrides. The resolved config is what every output records.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from cache_schema.validate import read_yaml_mapping

T = TypeVar("T")


class ConfigError(click.UsageError):
    """A config file or override that cannot be applied to the stage's config."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


_SCALAR_NAMES = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _expected(annotation: Any) -> str:
    """How a field's type reads in a message: 'an integer', 'a list of numbers or null', ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        names = [_expected(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        inner = _PLURALS.get(args[0]) if args else None
        return f"a list of {inner}" if inner else "a list"
    if origin in (dict, Mapping) or annotation is dict or dataclasses.is_dataclass(annotation):
        return "a mapping"
    return _SCALAR_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _shown(value: Any) -> str:
    """A value as the user wrote it (YAML/JSON spelling: null, [1, 2])."""
    return (
        "null"
        if value is None
        else json.dumps(value, default=str)
        if isinstance(value, (list, tuple, dict))
        else repr(value)
    )


def _wrong(key: str, annotation: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key '{key}': expected {_expected(annotation)}, got {_shown(value)}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the field's declared type (int, float, bool, str, list, dataclass);
    a value of another shape (a list for a number, null for a required value) is a ConfigError
    naming the key and the expected type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except (ConfigError, ValueError, TypeError):
                continue
        raise _wrong(key, annotation, value)
    if annotation in _SCALAR_NAMES and (value is None or isinstance(value, (list, tuple, dict))):
        raise _wrong(key, annotation, value)
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise _wrong(key, annotation, value)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple or annotation is tuple else items
    if origin in (dict, Mapping) or annotation is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise _wrong(key, annotation, value)
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            raise _wrong(key, annotation, value)
        return _build(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise _wrong(key, annotation, value)
    if annotation is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise _wrong(key, annotation, value)
        try:
            return int(value)
        except ValueError:
            raise _wrong(key, annotation, value) from None
    if annotation is float:
        try:
            return float(value)
        except ValueError:
            raise _wrong(key, annotation, value) from None
    if annotation is str:
        return str(value)
    return value


def _build(cls: type[T], values: Mapping[str, Any], prefix: str = "") -> T:
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' for {cls.__name__}; known keys: {', '.join(sorted(types_))}"
        )
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """`a.b=1` -> {"a": {"b": 1}}; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A `--config` file's keys (dashes read as underscores); an empty file is {}."""
    missing = f"config file not found: {path}"
    data = read_yaml_mapping(path, ConfigError, missing, label="config file ", allow_empty=True)
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve_config(
    cls: type[T],
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> T:
    """Build `cls` from its defaults, `base` (e.g. a preset), a YAML file, flags, then overrides.

    Flags whose value is None (not given on the command line) are ignored.
    """
    values: dict[str, Any] = dict(base or {})
    if config_file:
        values = _merge(values, load_yaml(config_file))
    if flags:
        values = _merge(values, {k: v for k, v in flags.items() if v is not None and v != ()})
    values = _merge(values, parse_overrides(overrides))
    return _build(cls, values)


def config_options(func: Callable) -> Callable:
    """Add `--config FILE.yaml` and repeated `--set key=value` to a click command."""
    func = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override any config key (repeatable), e.g. --set lr=3e-4.",
    )(func)
    func = click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        default=None,
        help="YAML file with config keys (flags and --set win over it).",
    )(func)
    return func
