"""Stage configs from dataclass defaults, a YAML file, flags and `--set key=value` overrides.

Precedence (lowest to highest): dataclass defaults < base (a preset, or a resumed run's config)
< `--config FILE.yaml` < explicit flags < `--set` overrides. The resolved config is what every
output records.

OmegaConf structured configs do the work: the dataclass is the schema, each layer is merged
into it (unknown keys and wrong types are OmegaConf's typed errors, re-raised here as one
ConfigError naming the key and the expected type), `--set` is an OmegaConf dotlist, and
`${key}` interpolations resolve before the dataclass is built. What OmegaConf does differently
from what our CLI promises is handled here, explicitly:

- unions of scalars (`float | str`, `int | str | None`): OmegaConf keeps '0.5' a string and
  refuses 1 for `float | str`; we try the members in declared order, so `--lambda 0.5` and
  `--set align_lambda=1` are numbers, `dino=0.5` a string;
- a comma-separated string for a list field (`--set encoders=dino,sam2`) is split into the list;
- a whole number written as a float is an integer for an int field (`--set steps=4e5`);
- a `--set` value for a string field is taken as typed (`vae=no`, `out=007`, `x=1e5` stay text;
  YAML would read them as false, 7, 100000.0); `key=` is the empty string, `key=null` is null;
- dashes in keys read as underscores; a `--set` value that is not valid YAML is kept as text.

Field types: scalars, `X | None`, lists of scalars, unions of scalars and nested dataclasses,
which OmegaConf 2.3 and 2.4 both hold. A type 2.3 cannot hold (Literal, a union with a list
member) fails when the schema is built, a programming error with OmegaConf's message;
tests/test_cli.py builds every stage config.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from cache_schema.validate import read_yaml_mapping

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(click.UsageError):
    """A config file or override that cannot be applied to the stage's config."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _union_args(annotation: Any) -> tuple[Any, ...]:
    """The members of a union annotation (None included), else ()."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return ()


def _strip_optional(annotation: Any) -> Any:
    """`X | None` -> X; any other annotation unchanged."""
    members = [a for a in _union_args(annotation) if a is not type(None)]
    return members[0] if len(members) == 1 else annotation


def _annotation_at(cls: type, path: list[str]) -> Any | None:
    """The declared type of the field at `path` (nested dataclasses), None if there is none."""
    annotation: Any = cls
    for part in path:
        owner = _strip_optional(annotation)
        if not dataclasses.is_dataclass(owner):
            return None
        annotation = _field_types(owner).get(part)
        if annotation is None:
            return None
    return annotation


def _is_list(annotation: Any) -> bool:
    annotation = _strip_optional(annotation)
    return typing.get_origin(annotation) in (list, tuple) or annotation in (list, tuple)


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


def _wrong(key: str, annotation: Any, value: Any, where: str = "") -> ConfigError:
    return ConfigError(f"config key '{key}': expected {_expected(annotation)}, got {_shown(value)}{where}")


def _lookup(tree: Any, path: list[str]) -> tuple[bool, Any]:
    """(found, value) at `path` in a plain nested mapping."""
    for part in path:
        if not isinstance(tree, Mapping) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def _translate(exc: OmegaConfBaseException, cls: type, layer: Any, where: str) -> ConfigError:
    """OmegaConf's typed error -> one ConfigError naming the key (and the file it came from)."""
    from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, ValidationError

    key = re.sub(r"(\[\d+\])+$", "", str(exc.full_key or ""))  # `encoders[1]`: the list field
    path = key.split(".")
    if isinstance(exc, ConfigKeyError):
        owner = _strip_optional(_annotation_at(cls, path[:-1]))
        if dataclasses.is_dataclass(owner):
            known = sorted(_field_types(owner))
            close = difflib.get_close_matches(path[-1], known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            return ConfigError(
                f"unknown config key '{key}' for {owner.__name__}{hint}{where}; known keys: {', '.join(known)}"
            )
    annotation = _annotation_at(cls, path)
    found, value = _lookup(layer, path)
    if isinstance(exc, ValidationError) and annotation is not None and found:
        return _wrong(key, annotation, value, where)
    message = str(exc.msg).splitlines()[0] if exc.msg else type(exc).__name__
    if isinstance(exc, InterpolationResolutionError) and found:
        message = f"{value!r} does not resolve ({message}); write \\${{ for a literal ${{"
    return ConfigError(f"config key '{key}': {message}{where}" if key else f"config: {message}{where}")


def _prepared(cls: type, tree: Mapping[str, Any], where: str = "", prefix: str = "") -> dict[str, Any]:
    """A layer as the schema takes it: comma-separated strings split for list fields, tuples as
    lists, a whole float as an int for an int field (OmegaConf refuses 4e5), a union's scalar as
    its first member type that takes it, recursively into nested dataclass fields. Unknown keys
    and wrong types are left for OmegaConf, except a scalar for a nested config (OmegaConf's
    error for it names no key)."""
    types_ = _field_types(cls)
    out: dict[str, Any] = {}
    for key, value in tree.items():
        annotation = types_.get(key)
        nested = _strip_optional(annotation)
        scalar = isinstance(value, (str, int, float, bool))
        if isinstance(value, str) and _is_list(annotation):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, float) and nested is int and value.is_integer():
            value = int(value)  # `steps: 4e5`
        elif scalar and len([a for a in _union_args(annotation) if a is not type(None)]) > 1:
            value = _first_member(value, annotation, prefix + key, where)
        elif dataclasses.is_dataclass(nested) and isinstance(value, Mapping):
            value = _prepared(nested, value, where, f"{prefix}{key}.")
        elif dataclasses.is_dataclass(nested) and value is not None:
            raise _wrong(prefix + key, annotation, value, where)
        out[key] = value
    return out


def _first_member(value: Any, annotation: Any, key: str, where: str) -> Any:
    """A union field's scalar as its first member type that takes it (declared order)."""
    from omegaconf.errors import ValidationError
    from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode

    nodes = {int: IntegerNode, float: FloatNode, bool: BooleanNode}
    for member in (a for a in typing.get_args(annotation) if a is not type(None)):
        if member is str:
            return str(value)
        if member in nodes:
            try:
                return nodes[member]().validate_and_convert(value)
            except ValidationError:
                continue
    raise _wrong(key, annotation, value, where)


def _merge_layer(cfg: DictConfig, cls: type, layer: Mapping[str, Any], where: str = "") -> DictConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layer = _prepared(cls, layer, where)
    try:
        return OmegaConf.merge(cfg, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _translate(exc, cls, layer, where) from None


def _to_object(cfg: DictConfig, cls: type[T]) -> T:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:  # an interpolation that does not resolve, or to a wrong type
        raise _translate(exc, cls, OmegaConf.to_container(cfg, resolve=False), "") from None


_EMPTY = "''"  # `--set key=` is the empty string (a bare `key=` reads as null in a dotlist)


def _dotlist(overrides: Iterable[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """`--set` items as one nested mapping (values read as YAML by OmegaConf) and each dotted
    key's text as typed."""
    import yaml
    from omegaconf import OmegaConf

    tree = OmegaConf.create()
    raw_by_key: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key, raw = key.strip().replace("-", "_"), raw.strip()
        try:
            layer = OmegaConf.from_dotlist([f"{key}={raw or _EMPTY}"])
        except yaml.YAMLError:  # `{a`, `[1,`: the text itself
            layer = OmegaConf.create()
            OmegaConf.update(layer, key, raw)
        tree = OmegaConf.merge(tree, layer)
        raw_by_key[key] = raw
    return OmegaConf.to_container(tree), raw_by_key  # type: ignore[return-value]


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """`a.b=1` -> {"a": {"b": 1}}; values are read as YAML (OmegaConf's dotlist)."""
    return _dotlist(overrides)[0]


def _override_layer(cls: type, overrides: Iterable[str]) -> dict[str, Any]:
    """parse_overrides, with a string field's value kept as typed (`vae=no` is 'no', not false)."""
    tree, raw_by_key = _dotlist(overrides)
    for key, raw in raw_by_key.items():
        path = key.split(".")
        found, value = _lookup(tree, path)
        text = _strip_optional(_annotation_at(cls, path)) is str
        if found and text and isinstance(value, (bool, int, float)):
            _lookup(tree, path[:-1])[1][path[-1]] = raw
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
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(cls)
    cfg = _merge_layer(cfg, cls, base or {})
    if config_file:
        cfg = _merge_layer(cfg, cls, load_yaml(config_file), f" (in config file {config_file})")
    given = {k: v for k, v in (flags or {}).items() if v is not None and v != ()}
    cfg = _merge_layer(cfg, cls, given)
    cfg = _merge_layer(cfg, cls, _override_layer(cls, overrides))
    return _to_object(cfg, cls)


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
