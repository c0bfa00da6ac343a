"""Creating, opening and writing the schema-v2 zarr store: one clip per chunk, one block per shard.

One block of clips maps to exactly one zarr shard of every per-clip array (and one chunk of
`clip_crc`, its rows' checksums), so ranks that own different blocks never write the same object,
and a block is written whole, checksums included, before its `block_done` marker. The root attributes are written last at creation: a store whose creation
was interrupted has no `schema_version` and is created again.
"""

from __future__ import annotations

import errno
import json
import warnings
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr
import zarr.codecs

from cache_schema import SCHEMA_VERSION, store_layout
from cache_schema import constants as C
from cache_schema.formats import PCABasis
from cache_schema.integrity import crc_rows, integrity_attr
from cache_schema.layout import EncoderEntry, TextEntry

from .config import CODEC_NAMES


def compressors_for(codec: str, level: int = 3) -> Any:
    """zarr v3 bytes-to-bytes codecs for a codec name (measured in bench/extract.py)."""
    if codec == "zstd":
        return [zarr.codecs.ZstdCodec(level=level)]
    if codec == "blosc":
        return [zarr.codecs.BloscCodec(cname="zstd", clevel=level, shuffle="bitshuffle")]
    if codec == "none":
        return None
    raise ValueError(f"codec: unknown codec {codec!r}; choose one of {', '.join(CODEC_NAMES)}")


@dataclass
class StorePlan:
    """Shapes and per-clip metadata known before any block is computed."""

    num_clips: int
    block_size: int
    latent_shape: tuple[int, int, int, int]
    grid: tuple[int, int, int]
    encoders: list[EncoderEntry]  # layout entries (TargetPlan.entry())
    labels: np.ndarray
    video_index: np.ndarray
    start_frame: np.ndarray
    flip: np.ndarray
    text: TextEntry | None = None  # prompt embeddings per clip (--base)
    empty_prompt: tuple[np.ndarray, np.ndarray] | None = None  # float16 [L, D], uint8 [L]: stored once

    @property
    def num_blocks(self) -> int:
        return max(1, -(-self.num_clips // self.block_size))

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_size
        return start, min(start + self.block_size, self.num_clips)


def _per_clip_array(group: zarr.Group, name: str, shape: tuple, dtype: str, block: int, compressors) -> None:
    group.create_array(
        name,
        shape=shape,
        chunks=(1, *shape[1:]),
        shards=(block, *shape[1:]),
        dtype=dtype,
        compressors=compressors,
        fill_value=0,
    )


def create_store(
    url: str, plan: StorePlan, attrs: dict[str, Any], codec: str, level: int, bases: dict[str, PCABasis]
) -> zarr.Group:
    """Create every array, write the PCA bases and the per-clip metadata, then the attributes.

    The folder holds nothing of zarr's when this runs (a new --out, or our own store cleared by
    `cache_schema.outputs.clear_artifact`); mode "a" keeps the marker and the lock, which zarr's
    "w" would delete along with everything else in the folder."""
    group = zarr.open_group(url, mode="a")
    n, b = plan.num_clips, plan.block_size
    compressors = compressors_for(codec, level)
    _per_clip_array(group, C.LATENTS, (n, *plan.latent_shape), "float16", b, compressors)
    text = [] if plan.text is None else plan.text.arrays()
    for array in [*(a for enc in plan.encoders for a in enc.arrays(plan.grid)), *text]:
        _per_clip_array(group, array.path, (n, *array.shape), array.dtype, b, compressors)
    if plan.empty_prompt is not None:
        for name, value in zip((C.TEXT_EMPTY_EMBEDS, C.TEXT_EMPTY_MASK), plan.empty_prompt, strict=True):
            group.create_array(name, shape=value.shape, dtype=value.dtype, fill_value=0)[...] = value
    for name, basis in bases.items():
        for part, array in ((C.PCA_MEAN, basis.mean), (C.PCA_COMPONENTS, basis.components)):
            arr = group.create_array(
                f"{C.PCA_GROUP}/{name}/{part}", shape=array.shape, dtype="float32", fill_value=0
            )
            arr[...] = array
    for name, values, dtype in (
        (C.LABELS, plan.labels, "int64"),
        (C.VIDEO_INDEX, plan.video_index, "int32"),
        (C.START_FRAME, plan.start_frame, "int32"),
        (C.FLIP, plan.flip, "uint8"),
    ):
        arr = group.create_array(name, shape=(n,), chunks=(b,), dtype=dtype, fill_value=0)
        arr[:] = values.astype(dtype)
    group.create_array(C.VALID, shape=(n,), chunks=(b,), dtype="uint8", fill_value=0)
    group.create_array(C.BLOCK_DONE, shape=(plan.num_blocks,), chunks=(1,), dtype="uint8", fill_value=0)
    integrity = integrity_attr(plan.encoders, plan.text)
    columns = len(integrity["columns"])
    group.create_array(C.CLIP_CRC, shape=(n, columns), chunks=(b, columns), dtype="uint32", fill_value=0)
    group.attrs.update({**attrs, C.INTEGRITY_ATTR: integrity})
    return group


def open_store(url: str, mode: str = "r+") -> zarr.Group | None:
    """The existing store at `url`, or None when there is none (or its creation never finished)."""
    try:
        with warnings.catch_warnings():  # report.json beside the arrays is ours, not zarr's
            warnings.simplefilter("ignore")
            group = zarr.open_group(url, mode=mode)
    except Exception:  # missing, or not a zarr group at all
        return None
    if "schema_version" not in group.attrs:
        return None
    if group.attrs["schema_version"] != SCHEMA_VERSION:
        raise ValueError(
            f"{url} holds a cache of schema v{group.attrs['schema_version']}; this tool writes "
            f"v{SCHEMA_VERSION}: pass --overwrite to replace it or choose another --out"
        )
    return group


def write_block(
    group: zarr.Group,
    start: int,
    latents: np.ndarray,
    targets: dict[str, tuple[np.ndarray, np.ndarray | None]],
    valid: np.ndarray,
    meta: dict[str, np.ndarray] | None = None,
    norms: dict[str, np.ndarray] | None = None,
    text: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Write one block's clips (whole shards at once), then its rows' checksums; data before the
    marker. `meta` (labels, video_index, start_frame, flip of these rows) is rewritten too, so a
    redone block repairs them; without it the rows created with the store are kept. `norms`: the
    float16 token norms of encoders whose layout keeps them. `text`: the rows' prompt embeddings
    and masks (stores with a `text` layout entry)."""
    stop = start + len(latents)
    arrays = {C.LATENTS: latents.astype(np.float16, copy=False), C.VALID: valid.astype(np.uint8)}
    for name, (values, scales) in targets.items():
        arrays[C.values_path(name)] = values
        if scales is not None:
            arrays[C.scales_path(name)] = scales
    for name, array in (norms or {}).items():
        arrays[C.norms_path(name)] = array
    if text is not None:
        arrays[C.TEXT_EMBEDS], arrays[C.TEXT_MASK] = text
    for name in C.META_ARRAYS:
        arrays[name] = group[name][start:stop] if meta is None else meta[name]
    layout = store_layout(group)
    columns = layout.crc_columns if layout.crc_array else list(arrays)
    for name in columns:  # fixed order: the marker-less block is torn the same way every time
        array = group[name]
        if name not in arrays and name.endswith(f"/{C.TOKEN_NORMS}"):  # not given: 0, the fill value
            arrays[name] = np.zeros((stop - start, *array.shape[1:]), array.dtype)
        arrays[name] = np.asarray(arrays[name]).astype(array.dtype, copy=False)
        if meta is not None or name not in C.META_ARRAYS:
            _write(array, name, start, stop, arrays[name], group)
    if layout.crc_array:
        _write(group[layout.crc_array], layout.crc_array, start, stop, crc_rows(arrays, columns), group)


def _write(array: zarr.Array, name: str, start: int, stop: int, data: np.ndarray, group: zarr.Group) -> None:
    """array[start:stop] = data; a full disk names the file being written (zarr's error does not)."""
    try:
        array[start:stop] = data
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or exc.filename:
            raise
        chunk = start // array.shards[0] if array.shards else start // array.chunks[0]
        key = array.metadata.encode_chunk_key((chunk, *([0] * (array.ndim - 1))))
        path = f"{str(group.store.root).rstrip('/')}/{name}/{key}" if hasattr(group.store, "root") else name
        raise OSError(exc.errno, exc.strerror, path) from exc


def clear_block(group: zarr.Group, block: int, arrays: dict[str, zarr.Array]) -> None:
    """Delete one block's shard of each sharded array before the block is redone: zarr reads the old
    shard's index to rewrite it, so a damaged index would make the rewrite fail too."""
    from zarr.core.sync import sync

    prefix = f"{group.path}/" if group.path else ""
    for name, array in arrays.items():
        if array.shards:
            key = array.metadata.encode_chunk_key((block, *([0] * (array.ndim - 1))))
            sync(group.store.delete(f"{prefix}{name}/{key}"))


def mark_block_done(group: zarr.Group, block: int) -> None:
    group[C.BLOCK_DONE][block] = 1


def write_json(url: str, name: str, payload: dict[str, Any]) -> None:
    """A small JSON file beside the zarr metadata (report.json), through fsspec."""
    with fsspec.open(f"{url.rstrip('/')}/{name}", "w") as fh:
        json.dump(payload, fh, indent=2, default=str)


def read_json(url: str, name: str) -> dict[str, Any] | None:
    try:
        with fsspec.open(f"{url.rstrip('/')}/{name}", "r") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
