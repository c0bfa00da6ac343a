"""Per-clip checksums of a feature store: a missing or corrupt zarr chunk is found, never read as zeros.

zarr reads a missing chunk as its fill value and reports a corrupt one (if at all) without naming
the array or the rows. So extraction records, before a block's marker, a crc32 of every row of
every per-clip array in `clip_crc` [N, A] (uint32, one chunk per block; the root attribute
`integrity` names the columns). Readers check it: `pack` row by row as it reads (the bytes are
in hand), an `extract` rerun and `info --verify` block by block. A store written before these
checksums existed has no `integrity` attribute and is read as before ("not verifiable").
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import constants as C
from .errors import CacheError
from .layout import EncoderEntry, TextEntry, per_clip_arrays
from .validate import open_array, store_layout

__all__ = ["BlockDamaged", "RowChecker", "StoreCheck", "StoreVerifier", "open_array"]

HASH = "crc32"


class BlockDamaged(CacheError):
    """A finished block whose rows fail their checksums or cannot be read: an `extract` rerun
    redoes it."""


def integrity_attr(encoders: list[EncoderEntry], text: TextEntry | None = None) -> dict[str, Any]:
    """The root attribute a store with checksums carries."""
    return {"array": C.CLIP_CRC, "hash": HASH, "columns": per_clip_arrays(encoders, text)}


def row_crcs(data: np.ndarray) -> np.ndarray:
    """uint32 [n]: crc32 of each row's bytes (C order, the array's own dtype)."""
    rows = np.ascontiguousarray(data).reshape(len(data), -1)
    return np.fromiter((zlib.crc32(memoryview(r).cast("B")) for r in rows), np.uint32, len(rows))


def crc_rows(arrays: dict[str, np.ndarray], columns: list[str]) -> np.ndarray:
    """The `clip_crc` rows [n, A] of one block's arrays (every column must be given)."""
    return np.stack([row_crcs(arrays[name]) for name in columns], axis=1)


def block_rows(block: int, block_size: int, num_clips: int) -> tuple[int, int]:
    start = block * block_size
    return start, min(start + block_size, num_clips)


def describe(name: str, block: int, start: int, stop: int, what: str) -> str:
    """'latents block 1 (rows 2-3): WHAT' — how every integrity problem names its place."""
    return f"{name} block {block} (rows {start}-{stop - 1}): {what}"


@dataclass
class StoreCheck:
    """What verifying a store found: whether it can be verified at all, and the bad blocks."""

    verifiable: bool
    problems: list[str] = field(default_factory=list)
    bad_blocks: set[int] = field(default_factory=set)


class StoreVerifier:
    """Checks a store's blocks against `clip_crc` (and that every array's metadata can be read)."""

    def __init__(self, group: Any, where: str) -> None:
        self.where = str(where).rstrip("/")
        layout = store_layout(group, self.where)
        self.block_size, self.num_clips = layout.block_size, layout.num_clips
        names = layout.crc_columns
        self.arrays = {name: open_array(group, name, self.where) for name in names}
        self.crc = None if layout.crc_array is None else open_array(group, layout.crc_array, self.where)
        self.columns = {name: i for i, name in enumerate(names)}

    @property
    def verifiable(self) -> bool:
        return self.crc is not None

    def block(self, block: int) -> list[str]:
        """Problems of one block (empty: intact, or not verifiable)."""
        if self.crc is None:
            return []
        start, stop = block_rows(block, self.block_size, self.num_clips)
        try:
            recorded = self.crc[start:stop]
        except Exception as exc:
            return [describe(C.CLIP_CRC, block, start, stop, f"cannot be read ({_short(exc)})")]
        problems = []
        for name, array in self.arrays.items():
            try:
                data = array[start:stop]
            except Exception as exc:
                problems.append(describe(name, block, start, stop, f"cannot be read ({_short(exc)})"))
                continue
            bad = np.flatnonzero(row_crcs(data) != recorded[:, self.columns[name]])
            if len(bad):
                rows = ", ".join(str(start + int(i)) for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
                problems.append(
                    describe(
                        name,
                        block,
                        start,
                        stop,
                        f"row(s) {rows} fail their checksum (a chunk is missing or corrupt)",
                    )
                )
        return problems

    def blocks(self, blocks: Iterable[int], workers: int = 4) -> StoreCheck:
        """Check `blocks` in a few threads (zarr decodes and zlib hashes outside the GIL)."""
        check = StoreCheck(self.verifiable)
        if not self.verifiable:
            return check
        blocks = list(blocks)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for b, problems in zip(blocks, pool.map(self.block, blocks), strict=True):
                if problems:
                    check.bad_blocks.add(b)
                    check.problems.extend(problems)
        return check


class RowChecker:
    """Reads store rows for a packer and checks each against `clip_crc` (a no-op without checksums)."""

    def __init__(self, group: Any, where: str) -> None:
        self.where = str(where).rstrip("/")
        layout = store_layout(group, self.where)
        self.block_size, self.num_clips = layout.block_size, layout.num_clips
        self.columns = {} if layout.crc_array is None else {n: i for i, n in enumerate(layout.crc_columns)}
        self.crc = (
            None
            if layout.crc_array is None
            else self._read(open_array(group, layout.crc_array, self.where), C.CLIP_CRC, None)
        )

    def error(self, name: str, row: int | None, what: str) -> CacheError:
        if row is None:
            return BlockDamaged(f"{self.where}: {name} {what}")
        block = row // self.block_size
        start, stop = block_rows(block, self.block_size, self.num_clips)
        return BlockDamaged(f"{self.where}: {describe(name, block, start, stop, f'row {row} {what}')}")

    def _read(self, array: Any, name: str, row: int | None) -> np.ndarray:
        try:
            return array[...] if row is None else array[row]
        except Exception as exc:
            raise self.error(name, row, f"cannot be read ({_short(exc)})") from None

    def read_all(self, array: Any, name: str, check: bool = False) -> np.ndarray:
        """The whole (small, 1-D) array; every row checked with `check`, else later with `check()`."""
        data = self._read(array, name, None)
        if check and self.crc is not None:
            bad = np.flatnonzero(row_crcs(data) != self.crc[:, self.columns[name]])
            if len(bad):
                raise self.error(name, int(bad[0]), "fails its checksum (a chunk is missing or corrupt)")
        return data

    def read(self, array: Any, name: str, row: int) -> np.ndarray:
        """Row `row` of `array` (store path `name`), checked."""
        data = self._read(array, name, row)
        self.check(name, row, data[None])
        return data

    def check(self, name: str, row: int, data: np.ndarray) -> None:
        """`data` [1, ...] is row `row` of `name`: raise naming array, block and rows if it differs."""
        if self.crc is None:
            return
        if row_crcs(data)[0] != self.crc[row, self.columns[name]]:
            raise self.error(name, row, "fails its checksum (a chunk is missing or corrupt)")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
