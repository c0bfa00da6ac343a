"""Creating and opening the schema-v1 zarr store: one clip per chunk, one block per shard.

One block of clips maps to exactly one zarr shard of every per-clip array, so ranks that own
different blocks never write the same object, and a block is written whole before its
`block_done` marker.
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


def compressors_for(codec: str, level: int = 3) -> Any:
    """zarr v3 bytes-to-bytes codecs for a codec name (measured in bench/extract.py)."""
    if codec == "zstd":
        return [zarr.codecs.ZstdCodec(level=level)]
    if codec == "blosc":
        return [zarr.codecs.BloscCodec(cname="zstd", clevel=level, shuffle="bitshuffle")]
    if codec == "none":
        return None
    raise ValueError(f"unknown codec '{codec}'; choose zstd, blosc or none")


@dataclass
class StorePlan:
    """Shapes and per-clip metadata known before any model runs."""

    num_clips: int
    block_size: int
    latent_shape: tuple[int, int, int, int]
    grid: tuple[int, int, int]
    target_dim: int
    labels: np.ndarray
    video_index: np.ndarray
    start_frame: np.ndarray

    @property
    def num_blocks(self) -> int:
        return max(1, -(-self.num_clips // self.block_size))

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_size
        return start, min(start + self.block_size, self.num_clips)


def create_store(url: str, plan: StorePlan, attrs: dict[str, Any], codec: str, level: int) -> zarr.Group:
    """Create every array and write the attributes and the per-clip metadata (rank 0 only)."""
    group = zarr.open_group(url, mode="w")
    n, b = plan.num_clips, plan.block_size
    compressors = compressors_for(codec, level)
    latent_shape = (n, *plan.latent_shape)
    target_shape = (n, *plan.grid, plan.target_dim)
    for name, shape in ((C.LATENTS, latent_shape), (C.TARGETS, target_shape)):
        group.create_array(
            name,
            shape=shape,
            chunks=(1, *shape[1:]),
            shards=(b, *shape[1:]),
            dtype="float16",
            compressors=compressors,
            fill_value=0,
        )
    for name, values, dtype in (
        (C.LABELS, plan.labels, "int64"),
        (C.VIDEO_INDEX, plan.video_index, "int32"),
        (C.START_FRAME, plan.start_frame, "int32"),
    ):
        arr = group.create_array(name, shape=(n,), chunks=(b,), dtype=dtype, fill_value=0)
        arr[:] = values.astype(dtype)
    group.create_array(C.VALID, shape=(n,), chunks=(b,), dtype="uint8", fill_value=0)
    group.create_array(C.BLOCK_DONE, shape=(plan.num_blocks,), chunks=(1,), dtype="uint8", fill_value=0)
    group.attrs.update(attrs)
    return group


def open_store(url: str, mode: str = "r+") -> zarr.Group | None:
    """The existing store at `url`, or None when there is none."""
    try:
        with warnings.catch_warnings():  # report.json beside the arrays is ours, not zarr's
            warnings.simplefilter("ignore")
            group = zarr.open_group(url, mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    except Exception:
        return None
    if "schema_version" not in group.attrs:
        return None
    if group.attrs["schema_version"] != SCHEMA_VERSION:
        raise ValueError(
            f"{url} holds schema v{group.attrs['schema_version']}; this tool writes v{SCHEMA_VERSION}"
        )
    return group


def write_block(
    group: zarr.Group, start: int, latents: np.ndarray, targets: np.ndarray, valid: np.ndarray
) -> None:
    """Write one block's clips (whole shards at once), data before the marker."""
    stop = start + len(latents)
    group[C.LATENTS][start:stop] = latents.astype(np.float16)
    group[C.TARGETS][start:stop] = targets.astype(np.float16)
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
