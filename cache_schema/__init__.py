"""The contract for every on-disk hand-off between stages (schema v2): the feature store, the
shard sets, target formats, the training run directory, output folders and their locks.
Imports nothing from stages/. See ../DESIGN.md section 3."""

from .checksum import sample_checksum, verify_checksum, with_checksum
from .constants import SCHEMA_VERSION
from .fingerprint import canonical_json, fingerprint
from .outputs import OutputError, OutputLock, prepare_output
from .run import RunDir, RunError
from .validate import (
    CacheError,
    CacheMismatch,
    compatible,
    content_fingerprint,
    encoder_entries,
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
    "OutputError",
    "OutputLock",
    "RunDir",
    "RunError",
    "canonical_json",
    "compatible",
    "content_fingerprint",
    "encoder_entries",
    "fingerprint",
    "kind_of",
    "open_group",
    "prepare_output",
    "read_index",
    "read_layout",
    "sample_checksum",
    "validate_shards",
    "validate_store",
    "verify_checksum",
    "with_checksum",
]
