"""What every subcommand does the same way: build its validated config, turn known failures
into one clear message (exit 1) instead of a traceback, and refuse bad values (exit 2)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import click

T = TypeVar("T")


def default(cls: type, name: str) -> Any:
    """A stage config's default for `name` (dataclass default or default_factory): the one place
    the CLI's help texts take their "[default]" from."""
    import dataclasses

    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def help_default(cls: type, name: str, none: str = "none") -> str:
    """`default` as a help text shows it: a list comma-joined, None as `none`."""
    value = default(cls, name)
    if value is None:
        return none
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def resolve_stage_config(
    cls: type[T], config_file: str | None, overrides: tuple[str, ...], flags: Mapping[str, Any], base=None
) -> T:
    """The stage config from defaults < base < file < flags < --set, validated (a usage error names the key)."""
    from pipeline.config import ConfigError, resolve_config

    cfg = resolve_config(cls, config_file, overrides, flags, base=base)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return cfg


def _known_errors() -> tuple[type[BaseException], ...]:
    import cache_schema
    from stages.common.models.vae import WeightsNotFoundError

    return (
        cache_schema.CacheError,
        cache_schema.OutputError,
        WeightsNotFoundError,
        ValueError,
        FileExistsError,
        FileNotFoundError,
        RuntimeError,
    )


def user_message(exc: BaseException, out: str | None = None) -> str | None:
    """The one-line message for a failure a user can act on, or None for a bug (keep the traceback).
    `out` is the command's output folder: a disk-full error that names no file names it."""
    from stages.common.runtime import disk_full_message, is_disk_full, worker_error_message

    if is_disk_full(exc):
        return disk_full_message(exc, out, "Free space and rerun the same command to resume.")
    if isinstance(exc, OSError) and not isinstance(exc, (FileExistsError, FileNotFoundError)):
        return None
    if isinstance(exc, _known_errors()):
        return worker_error_message(exc)
    return None


@contextlib.contextmanager
def cli_errors(out: str | None = None) -> Iterator[None]:
    """Known failures -> `Error: <message>` and exit 1 (a disk-full OSError names the file, else
    `out`, and the free space of that filesystem). ALIGN4GEN_DEBUG=1 keeps the traceback instead."""
    import os

    try:
        yield
    except click.ClickException:
        raise
    except Exception as exc:
        message = user_message(exc, out)
        if message is None or os.environ.get("ALIGN4GEN_DEBUG"):
            raise
        raise click.ClickException(message) from None
