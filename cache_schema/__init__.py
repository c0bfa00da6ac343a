"""The contract between stages (schema v1): names, fingerprint, validation. Imports no stage."""

from .constants import SCHEMA_VERSION
from .fingerprint import canonical_json, fingerprint
from .validate import (
    CacheError,
    CacheMismatch,
    compatible,
    encoder_slices,
    kind_of,
    open_group,
    read_index,
    read_layout,
    validate_shards,
    validate_store,
)

__all__ = [
    "SCHEMA_VERSION",
    "CacheError",
    "CacheMismatch",
    "canonical_json",
    "compatible",
    "encoder_slices",
    "fingerprint",
    "kind_of",
    "open_group",
    "read_index",
    "read_layout",
    "validate_shards",
    "validate_store",
]
