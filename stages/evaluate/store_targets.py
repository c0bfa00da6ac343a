"""Read a feature store's targets blockwise with dask, reconstructed to each encoder's own space.

Analyses of the cache (IICR, iREPA's spatial metrics) see exactly what the trainer sees: the
stored values dequantised (and PCA-reconstructed, time-interpolated, L2-normalised) by
`cache_schema.formats.reconstruct`, one block of clips at a time, never the whole store.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from cache_schema import constants as C
from cache_schema import open_group
from cache_schema.bases import store_bases
from cache_schema.formats import basis_tensors, reconstruct
from cache_schema.layout import EncoderEntry


@dataclass
class StoreTargets:
    """The per-clip metadata of a store and dask arrays of its chosen encoders' stored targets."""

    path: str
    grid: tuple[int, int, int]
    encoders: dict[str, EncoderEntry]
    arrays: dict[str, tuple[Any, Any]]  # name -> (dask values, dask scales | None)
    bases: dict[str, dict[str, Any]]
    video_index: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    block_clips: int

    @property
    def num_clips(self) -> int:
        return len(self.valid)

    def blocks(self) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """(start, stop, {encoder: float32 [n_valid, T, H, W, D]}) per block of clips (valid rows only)."""
        import torch

        for start in range(0, self.num_clips, self.block_clips):
            stop = min(start + self.block_clips, self.num_clips)
            keep = self.valid[start:stop]
            out = {}
            if keep.any():
                for name, (values, scales) in self.arrays.items():
                    entry = self.encoders[name]
                    v = torch.from_numpy(np.asarray(values[start:stop].compute())[keep])
                    s = (
                        None
                        if scales is None
                        else torch.from_numpy(np.asarray(scales[start:stop].compute())[keep])
                    )
                    dense = reconstruct(v, s, entry.format, entry.stored_dim, frames=self.grid[0],
                                        basis=self.bases.get(name))  # fmt: skip
                    out[name] = dense.numpy()
            yield start, stop, out


def open_targets(
    path: str, encoders: list[str] | None = None, block_clips: int | None = None
) -> StoreTargets:
    """The store's targets of `encoders` (default all), as dask arrays over its zarr arrays."""
    import dask.array as da

    from cache_schema import CacheError, store_layout

    group = open_group(path)
    if "schema_version" not in group.attrs:
        raise CacheError(f"{path} is not a feature store made by `pipeline extract`")
    layout = store_layout(group, path)
    chosen = layout.encoder_entries(encoders)
    arrays, bases = {}, {}
    for name, entry in chosen.items():
        values = da.from_zarr(group[entry.values_path])
        scales = da.from_zarr(group[entry.scales_path]) if entry.scales else None
        arrays[name] = (values, scales)
    for name, basis in store_bases(group).items():
        if name in chosen:
            bases[name] = basis_tensors(basis)
    return StoreTargets(
        path=str(path),
        grid=layout.grid,
        encoders=chosen,
        arrays=arrays,
        bases=bases,
        video_index=np.asarray(group[C.VIDEO_INDEX][:]),
        labels=np.asarray(group[C.LABELS][:]),
        valid=np.asarray(group[C.VALID][:]).astype(bool),
        block_clips=int(block_clips or layout.block_size or 16),
    )
