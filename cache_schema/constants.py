"""Names and versions of the cache contract (schema v1). See ../README.md "Cache format"."""

from __future__ import annotations

SCHEMA_VERSION = 1

# zarr store: array names
LATENTS = "latents"  # [N, C, T', h, w] float16, VAE posterior mean * scale
TARGETS = "targets"  # [N, T, H, W, D] float16, fused per-encoder L2-normalised tokens
LABELS = "labels"  # [N] int64, -1 = unlabelled
VIDEO_INDEX = "video_index"  # [N] int32, index into attrs["sources"]
START_FRAME = "start_frame"  # [N] int32
VALID = "valid"  # [N] uint8, 0 = clip failed at extraction
BLOCK_DONE = "block_done"  # [num_blocks] uint8, 1 = block complete (written last)

STORE_ARRAYS = (LATENTS, TARGETS, LABELS, VIDEO_INDEX, START_FRAME, VALID, BLOCK_DONE)

# zarr store: required root attributes
STORE_ATTRS = (
    "schema_version",
    "fingerprint",
    "spec",
    "grid",
    "patch_size",
    "latent_shape",
    "encoders",
    "target_dim",
    "class_names",
    "num_clips",
    "block_size",
    "num_blocks",
    "sources",
)

REPORT_FILE = "report.json"

# WebDataset shards
SHARD_PATTERN = "shard-{:06d}.tar"
SHARD_INDEX = "index.json"
KEY_FORMAT = "{:09d}"
SAMPLE_LATENT = "latent.npy"
SAMPLE_TARGET = "target.npy"
SAMPLE_CLASS = "cls"
SAMPLE_META = "json"

INDEX_FIELDS = (
    "schema_version",
    "fingerprint",
    "spec",
    "encoders",
    "grid",
    "latent_shape",
    "target_dim",
    "class_names",
    "num_samples",
    "shards",
)

# layout fields shared by a store and a shard index (what `compatible` compares)
LAYOUT_FIELDS = (
    "schema_version",
    "fingerprint",
    "grid",
    "patch_size",
    "latent_shape",
    "encoders",
    "target_dim",
)
