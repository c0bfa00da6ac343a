"""Creating, opening and writing the schema-v2 zarr store: one clip per chunk, one block per shard.

One block of clips maps to exactly one zarr shard of every per-clip array, so ranks that own
different blocks never write the same object, and a block is written whole before its
`block_done` marker. The root attributes are written last at creation: a store whose creation
was interrupted has no `schema_version` and is created again.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr
import zarr.codecs

from cache_schema import SCHEMA_VERSION
from cache_schema import constants as C
from cache_schema.formats import PCABasis

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
    encoders: list[dict[str, Any]]  # layout entries (TargetPlan.entry())
    labels: np.ndarray
    video_index: np.ndarray
    start_frame: np.ndarray
    flip: np.ndarray

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
    _, h, w = plan.grid
    for enc in plan.encoders:
        lead = (n, int(enc["time_frames"]), h, w)
        v_dim, v_dtype = enc["values"]
        _per_clip_array(group, C.values_path(enc["name"]), (*lead, v_dim), v_dtype, b, compressors)
        if enc["scales"]:
            s_dim, s_dtype = enc["scales"]
            _per_clip_array(group, C.scales_path(enc["name"]), (*lead, s_dim), s_dtype, b, compressors)
        if C.stores_norms(enc):
            _per_clip_array(group, C.norms_path(enc["name"]), lead, "float16", b, compressors)
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
    group.attrs.update(attrs)
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
    norms: dict[str, np.ndarray] | None = None,
) -> None:
    """Write one block's clips (whole shards at once), data before the marker."""
    stop = start + len(latents)
    group[C.LATENTS][start:stop] = latents.astype(np.float16, copy=False)
    for name, (values, scales) in targets.items():
        group[C.values_path(name)][start:stop] = values
        if scales is not None:
            group[C.scales_path(name)][start:stop] = scales
    for name, array in (norms or {}).items():
        group[C.norms_path(name)][start:stop] = array
    group[C.VALID][start:stop] = valid.astype(np.uint8)


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
