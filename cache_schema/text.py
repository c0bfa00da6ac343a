"""Prompt embeddings in the contract: per-clip arrays, the empty prompt stored once, compact shards.

Why float16 and not bfloat16 (both 2 bytes): numpy, zarr and `.npy` have float16 natively, so a
stock reader sees the values (bfloat16 would be uint16 bit patterns); and float16 keeps 8x finer
steps (10 vs 7 mantissa bits) over the range UMT5's final-layer-normalised outputs occupy. Its range
(65504) is checked when the embeddings are stored: an overflow is refused, never saturated.

A store keeps `text/embeds` [N, L, D] (zero past each prompt's length: the zero tail costs
nothing under zstd) and `text/mask` [N, L], checksummed like every per-clip array, plus the empty
prompt once (`text/empty_embeds`, `text/empty_mask`) whose content hash `derived.text.empty_sha256`
puts in the fingerprint. A shard sample holds only the prompt's rows (`text.npy` [sum(mask), D])
and the mask; the loader pads the zero tail back. A shard set carries the empty prompt in
`text-empty.npz`, whose sha256 its index.json records.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np

from . import constants as C
from .errors import CacheError
from .layout import CacheLayout
from .validate import read_bytes

FLOAT16_MAX = 65504.0


def to_stored(embeds: Any, where: str = "prompt embeddings") -> np.ndarray:
    """float embeddings -> the stored float16, refusing values float16 cannot hold."""
    array = np.asarray(embeds, dtype=np.float32)
    if not np.isfinite(array).all() or np.abs(array).max(initial=0.0) > FLOAT16_MAX:
        raise ValueError(
            f"{where} hold values float16 cannot store (NaN, inf or |x| > {FLOAT16_MAX:g}); "
            "the text encoder's output is not usable as it is"
        )
    return array.astype(np.float16)


def empty_sha256(embeds: np.ndarray, mask: np.ndarray) -> str:
    """Content hash of an empty-prompt embedding (float16 [L, D]) and its mask (uint8 [L])."""
    digest = hashlib.sha256(np.ascontiguousarray(embeds, np.float16).tobytes())
    digest.update(np.ascontiguousarray(mask, np.uint8).tobytes())
    return digest.hexdigest()


def trim(embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A shard member's rows: the prompt's own embeddings, without the zero tail."""
    return np.ascontiguousarray(embeds[: int(np.count_nonzero(mask))])


def pad(rows: np.ndarray, mask: np.ndarray, where: str) -> np.ndarray:
    """A shard member back to [L, D], zero past the prompt's length (what the store holds)."""
    length = int(np.count_nonzero(mask))
    if rows.ndim != 2 or rows.shape[0] != length or mask.ndim != 1:
        raise CacheError(
            f"{where}: {C.SAMPLE_TEXT} has shape {rows.shape} but its mask marks {length} of {mask.shape} tokens"
        )
    out = np.zeros((mask.shape[0], rows.shape[1]), rows.dtype)
    out[:length] = rows
    return out


def store_empty_prompt(
    group: Any, layout: CacheLayout, where: str = "the store"
) -> tuple[np.ndarray, np.ndarray]:
    """The empty prompt a store keeps, checked against the hash its fingerprint covers."""
    embeds, mask = group[C.TEXT_EMPTY_EMBEDS][...], group[C.TEXT_EMPTY_MASK][...]
    _check(embeds, mask, layout, f"{where}/{C.TEXT_GROUP}")
    return embeds, mask


def write_shard_empty_prompt(out: str, embeds: np.ndarray, mask: np.ndarray) -> dict[str, str]:
    """text-empty.npz beside the shards; its index.json entry (`text.empty`)."""
    import fsspec

    buf = io.BytesIO()
    np.savez(buf, embeds=np.asarray(embeds, np.float16), mask=np.asarray(mask, np.uint8))
    data = buf.getvalue()
    with fsspec.open(f"{out.rstrip('/')}/{C.TEXT_EMPTY_FILE}", "wb") as fh:
        fh.write(data)
    return {"name": C.TEXT_EMPTY_FILE, "sha256": hashlib.sha256(data).hexdigest()}


def shard_empty_prompt(shards: str, layout: CacheLayout) -> tuple[np.ndarray, np.ndarray]:
    """The empty prompt a shard set carries (float16 [L, D], uint8 [L]), hash-checked."""
    if layout.text is None or not layout.text.empty:
        raise CacheError(f"{shards} carries no prompt embeddings (packed from a store without captions)")
    name = layout.text.empty["name"]
    path = f"{str(shards).rstrip('/')}/{name}"
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise CacheError(f"{path} is missing: pack the store again") from None
    if hashlib.sha256(data).hexdigest() != layout.text.empty["sha256"]:
        raise CacheError(f"{path} is corrupt: sha256 differs from index.json")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        embeds, mask = npz["embeds"], npz["mask"]
    _check(embeds, mask, layout, path)
    return embeds, mask


def _check(embeds: np.ndarray, mask: np.ndarray, layout: CacheLayout, where: str) -> None:
    text = layout.text
    assert text is not None
    if embeds.shape != (text.max_length, text.dim) or mask.shape != (text.max_length,):
        raise CacheError(f"{where}: the empty prompt has shape {embeds.shape}, the layout says "
                         f"({text.max_length}, {text.dim})")  # fmt: skip
    recorded = layout.empty_prompt_sha256
    if recorded and empty_sha256(embeds, mask) != recorded:
        raise CacheError(f"{where}: the empty prompt differs from the one the fingerprint recorded")
