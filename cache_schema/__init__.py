"""The contract for every on-disk hand-off between stages (schema v2): the feature store, the
shard sets, target formats, the training run directory, output folders and their locks.
Imports nothing from stages/. See ../DESIGN.md section 3."""

from .checksum import sample_checksum, verify_checksum, with_checksum
from .constants import SCHEMA_VERSION
from .errors import CacheError, CacheMismatch
from .fingerprint import canonical_json, fingerprint
from .layout import ClipArray, EncoderEntry, ShardFile, ShardLayout, StoreLayout
from .outputs import OutputError, OutputLock, prepare_output
from .run import RunDir, RunError
from .validate import (
    compatible,
    content_fingerprint,
    encoder_entries,
    kind_of,
    open_group,
    read_index,
    read_layout,
    read_shard_layout,
    store_layout,
    validate_shards,
    validate_store,
)

__all__ = [
    "SCHEMA_VERSION",
    "CacheError",
    "CacheMismatch",
    "ClipArray",
    "EncoderEntry",
    "OutputError",
    "OutputLock",
    "RunDir",
    "RunError",
    "ShardFile",
    "ShardLayout",
    "StoreLayout",
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
    "read_shard_layout",
    "sample_checksum",
    "store_layout",
    "validate_shards",
    "validate_store",
    "verify_checksum",
    "with_checksum",
]
