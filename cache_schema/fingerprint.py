"""A stable fingerprint of what a cache holds: same spec -> same hash, on any machine."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any


def _canonical(value: Any) -> Any:
    """Normalise values whose JSON form could differ between runs (tuples, floats, paths)."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        return float(repr(value)) if math.isfinite(value) else str(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy scalars
        return _canonical(value.item())
    return str(value)


def canonical_json(spec: dict[str, Any]) -> str:
    """Key-order-insensitive, whitespace-free JSON: the bytes the fingerprint hashes."""
    return json.dumps(_canonical(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint(spec: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of `spec`."""
    return hashlib.sha256(canonical_json(spec).encode("ascii")).hexdigest()
