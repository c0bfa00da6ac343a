"""Names and versions of the cache contract (schema v2). See ../DESIGN.md section 3."""

from __future__ import annotations

SCHEMA_VERSION = 2

# zarr store: array names
LATENTS = "latents"  # [N, C, T', h, w] float16, VAE posterior mean * scale
TARGETS_GROUP = "targets"  # targets/<encoder>/values [N, T_e, H, W, *] and targets/<encoder>/scales
TARGET_VALUES = "values"  # dtype and last axis by the encoder's target format (cache_schema.formats)
TARGET_SCALES = "scales"  # float16 [N, T_e, H, W, groups]; absent for float16
TOKEN_NORMS = "norms"  # float16 [N, T_e, H, W]: each token's L2 norm before it was normalised

# An encoder's layout entry says under RAW_TOKENS how its raw tokens (before the per-token L2
# normalisation; iREPA's spatial z-score needs them) are rebuilt. Stores written before norms were
# kept have no such field: their raw tokens are lost.
RAW_TOKENS = "raw_tokens"
RAW_FROM_NORMS = "norms"  # values hold unit tokens; raw = unit token x its stored norm
RAW_IN_VALUES = "values"  # values hold the raw tokens (an encoder stored at its own time grid)
PCA_GROUP = "pca"  # pca/<encoder>/mean [D] and pca/<encoder>/components [k, D], float32
PCA_MEAN = "mean"
PCA_COMPONENTS = "components"
LABELS = "labels"  # [N] int64, -1 = unlabelled
VIDEO_INDEX = "video_index"  # [N] int32, index into the `sources` attribute
START_FRAME = "start_frame"  # [N] int32
FLIP = "flip"  # [N] uint8, 1 = horizontally mirrored frames (computed from the mirrored pixels)
VALID = "valid"  # [N] uint8, 0 = clip failed at extraction
BLOCK_DONE = "block_done"  # [num_blocks] uint8, 1 = block complete (written last)
CLIP_CRC = "clip_crc"  # [N, A] uint32: crc32 of each row of each per-clip array (cache_schema/integrity.py)
INTEGRITY_ATTR = "integrity"  # root attribute: {"array": CLIP_CRC, "hash": "crc32", "columns": [array paths]}
META_ARRAYS = (LABELS, VIDEO_INDEX, START_FRAME, FLIP)  # per-clip metadata known before any block
# Text conditioning (stores extracted with --base PIPELINE from a captioned manifest; the layout's
# `text` entry says so): each clip's prompt embeddings and mask, and the empty prompt's once.
TEXT_GROUP = "text"
TEXT_EMBEDS = "text/embeds"  # [N, L, D] float16, zero past each prompt's length
TEXT_MASK = "text/mask"  # [N, L] uint8, the tokenizer's attention mask
TEXT_EMPTY_EMBEDS = "text/empty_embeds"  # [L, D] float16: the empty prompt (classifier-free guidance)
TEXT_EMPTY_MASK = "text/empty_mask"  # [L] uint8
TEXT_DTYPE = "float16"  # see cache_schema/text.py for why not bfloat16


def values_path(encoder: str) -> str:
    """A store's array of an encoder's stored target values."""
    return f"{TARGETS_GROUP}/{encoder}/{TARGET_VALUES}"


def scales_path(encoder: str) -> str:
    """A store's array of an encoder's quantisation scales (formats with scales only)."""
    return f"{TARGETS_GROUP}/{encoder}/{TARGET_SCALES}"


def norms_path(encoder: str) -> str:
    """A store's array of an encoder's token norms (entries with raw_tokens = RAW_FROM_NORMS)."""
    return f"{TARGETS_GROUP}/{encoder}/{TOKEN_NORMS}"


STORE_ARRAYS = (LATENTS, LABELS, VIDEO_INDEX, START_FRAME, FLIP, VALID, BLOCK_DONE)

# zarr store: required root attributes
STORE_ATTRS = (
    "schema_version",
    "fingerprint",
    "spec",
    "derived",
    "grid",
    "patch_size",
    "latent_shape",
    "encoders",
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
LATENTS_ONLY_DIR = "latents-only"  # the same samples without targets (training after alignment ends)
KEY_FORMAT = "{:09d}"  # the store row of the clip
SAMPLE_LATENT = "latent.npy"
SAMPLE_CLASS = "cls"
SAMPLE_META = "json"
SAMPLE_CHECKSUM = "crc32.txt"  # zlib crc32 (8 hex digits) of every other member, see checksum.py


SAMPLE_TEXT = "text.npy"  # float16 [n, D]: the prompt's n = sum(mask) embeddings (the zero tail dropped)
SAMPLE_TEXT_MASK = "text_mask.npy"  # uint8 [L]
TEXT_EMPTY_FILE = "text-empty.npz"  # the empty prompt's embeds [L, D] and mask [L] (sha256 in index.json)


def pca_file(encoder: str) -> str:
    """A shard set's PCA basis of one encoder (sha256 in index.json `pca_files`)."""
    return f"pca-{encoder}.npz"


def sample_values(encoder: str) -> str:
    """Shard member holding an encoder's stored target values."""
    return f"{encoder}.npy"


def sample_scales(encoder: str) -> str:
    """Shard member holding an encoder's quantisation scales (formats with scales only)."""
    return f"{encoder}.scale.npy"


def sample_norms(encoder: str) -> str:
    """Shard member holding an encoder's token norms, float16 [T_e, H, W] (see RAW_TOKENS)."""
    return f"{encoder}.norm.npy"


INDEX_FIELDS = (
    "schema_version",
    "fingerprint",
    "spec",
    "derived",
    "encoders",
    "grid",
    "latent_shape",
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
)

V1_MESSAGE = (
    "was written by an older align4gen (cache schema v1: one fused float16 targets array). This "
    "version reads schema v2 only; re-extract with `pipeline extract` (`--target-format float16` "
    "keeps v1's float16 values) and pack again"
)
