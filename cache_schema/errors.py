"""The errors every reader of a cache raises (imported by validate and layout alike)."""

from __future__ import annotations

from typing import Any


class CacheError(ValueError):
    """A cache that cannot be read or does not follow schema v2."""


class CacheMismatch(CacheError):
    """A cache that is valid but does not match what a run asked for; names the field."""

    def __init__(self, field: str, expected: Any, found: Any, path: str = "") -> None:
        self.field, self.expected, self.found, self.path = field, expected, found, path
        where = f" {path}" if path else ""
        super().__init__(
            f"cache{where} does not match the requested config: field '{field}' "
            f"is {found!r} in the cache but {expected!r} was requested"
        )
