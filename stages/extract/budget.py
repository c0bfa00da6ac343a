"""Size projections from one real clip: bytes per clip of every target format, store and shard
totals, the read bandwidth a trainer needs, and which settings fit a disk budget.

The models run once on one clip; its arrays are compressed with the store's codec, one chunk
per array as the store writes them, so the projection rests on real features. Shard sizes
follow tar's layout (512-byte header per member, data padded to 512 bytes) around `.npy`
members, plus the latents-only copy `pipeline pack` writes beside the shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cache_schema import formats
from stages.common import registry as R
from stages.common import video as V
from stages.common.models.dit_sizes import size_patch, train_tflop_per_clip
from stages.common.runtime import human_bytes

from .job import Job
from .models import ExtractError, compute_batch
from .store import compressors_for

TAR_BLOCK = 512
NPY_HEADER = 128  # numpy .npy v1 header, padded to 64 bytes (128 for these shapes)
META_MEMBERS = (("json", 192), ("cls", 4), ("crc32.txt", 8))  # small members of every sample (bytes)
PCA_CANDIDATES = (512, 256, 128, 64, 32, 16, 8)


def tar_member_bytes(size: int) -> int:
    """Bytes one member of `size` bytes takes in a tar archive (header + data padded to 512)."""
    return TAR_BLOCK + TAR_BLOCK * math.ceil(size / TAR_BLOCK)


def sample_overhead() -> int:
    """tar bytes of a sample's small members (meta json, class, checksum)."""
    return sum(tar_member_bytes(size) for _, size in META_MEMBERS)


@dataclass
class Option:
    """One plan: a target format, PCA dims per encoder, clips per video and --hflip."""

    format: str
    pca: dict[str, int]
    clips_per_video: int
    hflip: bool
    clips: int
    store_per_clip: float
    shard_per_clip: float
    latents_only_per_clip: float
    changes: tuple[str, ...] = ()

    @property
    def store_bytes(self) -> float:
        return self.store_per_clip * self.clips

    @property
    def shard_bytes(self) -> float:
        return (self.shard_per_clip + self.latents_only_per_clip) * self.clips

    @property
    def total_bytes(self) -> float:
        return self.store_bytes + self.shard_bytes

    def label(self) -> str:
        return " ".join(self.changes) if self.changes else "(as requested)"


@dataclass
class SizeTable:
    """Per-format projections for the requested plan, and the alternatives it was compared to."""

    measured_clip: int  # store row the models ran on
    formats: list[Option]
    current: Option
    rates: dict[str, float]  # label -> clips/s a trainer reads
    latent_shape: tuple[int, ...] = ()  # C, T', h, w of the clips the rates are for
    alternatives: list[Option] = field(default_factory=list)
    text_per_clip: tuple[int, int] | None = None  # (store, shard) bytes of the measured clip's prompt
    trainer: str = "videodit"  # whose sizes the rates are for: "videodit", or "wan" (--base: a fine-tune)

    def by_format(self, name: str) -> Option:
        return next(o for o in self.formats if o.format == name)

    def rows(self) -> list[dict[str, Any]]:
        """The dry-run table: one row per format (bytes, projections, ratio, GB/s per rate)."""
        base = self.by_format("float16").store_per_clip
        out = []
        for o in self.formats:
            row = {
                "format": o.format,
                "bytes_per_clip": o.store_per_clip,
                "store_bytes": o.store_bytes,
                "shard_bytes": o.shard_bytes,
                "vs_float16": o.store_per_clip / base,
                "read_gbps": {k: o.shard_per_clip * r / 1e9 for k, r in self.rates.items()},
            }
            out.append(row)
        return out


class _Measured:
    """Compressed and raw bytes of one clip's arrays, per (encoder, format, PCA dims)."""

    def __init__(
        self,
        job: Job,
        quantities: dict[str, torch.Tensor],
        latents: np.ndarray,
        norms: dict[str, torch.Tensor],
        text: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.job, self.quantities, self.norms = job, quantities, norms
        self.codecs = compressors_for(job.cfg.codec, job.cfg.codec_level) or []
        self.latent = (self._compressed(latents), latents.nbytes)
        self.text = None if text is None else self._text(*text)
        self._cache: dict[tuple[str, str, int | None], tuple[int, list[int]]] = {}
        self._acc: dict[str, formats.CovarianceAccumulator] = {}
        self._bases: dict[tuple[str, int], formats.PCABasis] = {}

    def _compressed(self, array: np.ndarray) -> int:
        data = np.ascontiguousarray(array).tobytes()
        for codec in self.codecs:
            data = _encode_bytes(codec, data, array.dtype.itemsize)
        return len(data)

    def _text(self, embeds: np.ndarray, mask: np.ndarray) -> tuple[int, int]:
        """(store, shard) bytes of one clip's prompt embeddings and mask: the store's chunks
        compressed (the zero tail costs little), the shard's members as written (the prompt's rows)."""
        store = self._compressed(embeds) + self._compressed(mask)
        members = (int(np.count_nonzero(mask)) * embeds.shape[-1] * embeds.itemsize, mask.nbytes)
        return store, sum(tar_member_bytes(NPY_HEADER + n) for n in members)

    def encoder(self, name: str, fmt: str, k: int | None) -> tuple[int, list[int]]:
        """(compressed store bytes, raw member sizes) of one encoder's targets for one clip."""
        key = (name, fmt, k)
        if key not in self._cache:
            x = self.quantities[name]
            if k:  # a basis fitted on this clip's tokens: the projection is an estimate
                x = formats.pca_project(x, self._basis(name, k))
            values, scales = formats.encode(x, fmt)
            parts = [values.cpu().numpy()] + ([] if scales is None else [scales.cpu().numpy()])
            if name in self.norms:  # float16 token norms beside unit tokens (raw_tokens = "norms")
                parts.append(formats.encode_norms(self.norms[name]).cpu().numpy())
            self._cache[key] = (sum(self._compressed(p) for p in parts), [p.nbytes for p in parts])
        return self._cache[key]

    def _basis(self, name: str, k: int) -> formats.PCABasis:
        if name not in self._acc:
            self._acc[name] = formats.CovarianceAccumulator()
            self._acc[name].update(self.quantities[name])
        if (name, k) not in self._bases:
            self._bases[name, k] = self._acc[name].fit(k)
        return self._bases[name, k]

    def per_clip(self, fmt: str, pca: dict[str, int]) -> tuple[float, float, float]:
        """(store, shard, latents-only) bytes per clip for a format and PCA dims."""
        store, shard_members = float(self.latent[0]), [self.latent[1]]
        for plan in self.job.plans:
            compressed, raw = self.encoder(plan.name, fmt, pca.get(plan.name))
            store += compressed
            shard_members += raw
        shard = sum(tar_member_bytes(NPY_HEADER + n) for n in shard_members) + sample_overhead()
        latents_only = tar_member_bytes(NPY_HEADER + self.latent[1]) + sample_overhead()
        if self.text is not None:  # both shard sets carry the prompt (text conditions every step)
            store, shard, latents_only = (
                store + self.text[0],
                shard + self.text[1],
                latents_only + self.text[1],
            )
        return store, float(shard), float(latents_only)


def _encode_bytes(codec, data: bytes, itemsize: int) -> bytes:
    """Compress with the numcodecs equivalent of a zarr v3 codec (same algorithm and settings)."""
    import numcodecs

    config = codec.to_dict()["configuration"]
    if config.get("cname") is not None:  # blosc
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[
            str(getattr(config["shuffle"], "value", config["shuffle"]))
        ]
        compressor = numcodecs.Blosc(
            cname=str(getattr(config["cname"], "value", config["cname"])),
            clevel=config["clevel"],
            shuffle=shuffle,
            typesize=itemsize,
        )
    else:
        compressor = numcodecs.Zstd(level=config["level"])
    return compressor.encode(data)


def _measure_clip(job: Job) -> tuple[int, _Measured]:
    """Run the models on the first clip that decodes (of the first 8)."""
    for row, ref in enumerate(job.refs[:8]):
        try:
            entry = job.source.entries[ref.video_index]
            frames = V.read_clip(entry, ref.start_frame, job.clip_spec, flip=ref.flip)
        except V.VideoDecodeError:
            continue
        batch = torch.from_numpy(frames)[None].to(job.device)
        feats = compute_batch(batch, job.models, job.plans, job.grid, job.timings)
        latents = feats.latents.to(torch.float16).cpu().numpy()[0]
        text = None if job.text is None else tuple(a[0] for a in job.encode_text([row]))
        return row, _Measured(job, feats.quantities, latents, feats.norms, text)
    raise ExtractError("could not decode any of the first clips to measure their size")


def count_clips(job: Job, clips_per_video: int, hflip: bool) -> int:
    """Store rows the plan would have with other --clips-per-video / --hflip (no re-probing)."""
    spec = V.ClipSpec(
        frames=job.cfg.frames,
        stride=job.cfg.stride,
        clips_per_video=clips_per_video,
        size=job.cfg.hw,
        placement=job.cfg.clip_placement,
        seed=job.cfg.seed,
        hflip=hflip,
    )
    total = 0
    for i, (entry, n) in enumerate(zip(job.source.entries, job.lengths, strict=True)):
        if n > 0:
            total += len(V.clip_starts(n, spec, video_key=(i, job.source.relative_path(entry))))
    return total * (2 if hflip else 1)


def _rates(cfg_rate: float | None, latent_shape, base: str | None = None) -> dict[str, float]:
    """Clips/s a trainer reads: --train-rate, or per model size its H100 rate on THIS store's grid
    (FLOPs counted at latent_shape: a tiny store's clip is not a 16 x 256 x 256 clip). With --base
    the store feeds a fine-tune of that family: Wan 2.1's sizes (full fine-tuning, 512 prompt tokens,
    counted as bench/wan_step.py does); else our VideoDiT sizes whose patch divides the latents."""
    if cfg_rate is not None:
        return {"--train-rate": float(cfg_rate)}
    h, w = (int(v) for v in latent_shape[2:])
    if base:
        from stages.common.models.wan_sizes import WAN_SIZES, wan_config, wan_latent_step_tflop

        fits = [
            n
            for n in WAN_SIZES
            if not (h % wan_config(n)["patch_size"][1] or w % wan_config(n)["patch_size"][2])
        ]
        return {name: R.clips_per_s(wan_latent_step_tflop(name, latent_shape)) for name in fits}
    fits = [n for n in R.MODEL_SIZES if not (h % size_patch(n) or w % size_patch(n))]
    return {name: R.clips_per_s(train_tflop_per_clip(name, latent_shape)) for name in fits}


def size_table(job: Job, with_rates: bool = False) -> SizeTable:
    """Measure one clip; project every format and the alternatives a budget refusal names; with
    `with_rates` (the dry run's bandwidth table; FLOP counting takes seconds) the trainer rates."""
    cfg = job.cfg
    row, measured = _measure_clip(job)
    pca = cfg.pca_dims_by_encoder()

    def option(fmt: str, dims: dict[str, int], cpv: int, hflip: bool, changes: Iterable[str] = ()) -> Option:
        same = (cpv, hflip) == (cfg.clips_per_video, cfg.hflip)
        clips = job.num_clips if same else count_clips(job, cpv, hflip)
        store, shard, lean = measured.per_clip(fmt, dims)
        return Option(fmt, dims, cpv, hflip, clips, store, shard, lean, tuple(changes))

    table = [option(fmt, pca, cfg.clips_per_video, cfg.hflip) for fmt in formats.TARGET_FORMATS]
    current = next(o for o in table if o.format == cfg.target_format)
    rates = _rates(cfg.train_rate, job.latent_shape, cfg.base) if with_rates else {}
    alternatives = _alternatives(job, option, pca)
    trainer = "wan" if cfg.base else "videodit"
    return SizeTable(
        row, table, current, rates, tuple(job.latent_shape), alternatives, measured.text, trainer
    )


def _alternatives(job: Job, option, pca: dict[str, int]) -> list[Option]:
    """Single changes of one setting, and each paired with a smaller format."""
    cfg = job.cfg
    fmt, cpv, hflip = cfg.target_format, cfg.clips_per_video, cfg.hflip
    dims = [p.stored_dim for p in job.plans]
    ks = [k for k in PCA_CANDIDATES if k <= min(dims) and k < max(dims)]
    other_formats = [f for f in formats.TARGET_FORMATS if f != fmt]
    singles: list[tuple[dict, str]] = []
    singles += [({"cpv": k}, f"--clips-per-video {k}") for k in range(cpv - 1, 0, -1)]
    if hflip:
        singles.append(({"hflip": False}, "no --hflip"))
    singles += [({"pca": k}, f"--pca-dims {k}") for k in ks[:3]]
    out = [option(f, pca, cpv, hflip, [f"--target-format {f}"]) for f in other_formats]
    for f in [fmt, *other_formats]:
        for change, text in singles:
            d = {p.name: change["pca"] for p in job.plans} if "pca" in change else pca
            extra = [] if f == fmt else [f"--target-format {f}"]
            out.append(option(f, d, change.get("cpv", cpv), change.get("hflip", hflip), [*extra, text]))
    return out


def fitting(options: list[Option], limit: float, key: str) -> list[Option]:
    """Options under `limit` (by `key`: total_bytes or store_bytes), fewest changes and most data first."""
    fits = [o for o in options if getattr(o, key) <= limit]
    return sorted(fits, key=lambda o: (len(o.changes), -getattr(o, key)))


def size_text(n: float) -> str:
    """Bytes in --disk-budget's own syntax (K, M, G, T = powers of 1024), e.g. '465.7G': the
    binary units and rounding of runtime.human_bytes, written without the space and 'iB'."""
    return human_bytes(n).replace(" ", "").replace("iB", "")


class BudgetExceeded(ExtractError):
    """A plan that does not fit the disk budget (or the free disk); `table` holds the projections."""

    def __init__(self, message: str, table: SizeTable | None = None) -> None:
        super().__init__(message)
        self.table = table


def _suggest(options: list[Option], limit: float, key: str) -> str:
    fits = fitting(options, limit, key)[:6]
    if not fits:
        smallest = min(options, key=lambda o: getattr(o, key), default=None)
        tail = (
            ""
            if smallest is None
            else f" (the smallest, {smallest.label()}, needs {size_text(getattr(smallest, key))})"
        )
        return f"no single or paired change of format, clips per video, --hflip or --pca-dims fits{tail}"
    shown = [f"{o.label()} ({size_text(getattr(o, key))})" for o in fits]
    return "settings that fit: " + "; ".join(shown)


def check_budget(job: Job, table: SizeTable, budget: int) -> None:
    """Refuse a plan whose store + shards exceed --disk-budget, naming settings that fit."""
    cur = table.current
    if cur.total_bytes <= budget:
        return
    raise BudgetExceeded(
        f"disk_budget: the plan needs {size_text(cur.total_bytes)} (store {size_text(cur.store_bytes)} + "
        f"shards {size_text(cur.shard_bytes)} for {cur.clips} clips as {cur.format}) but --disk-budget is "
        f"{size_text(budget)}; {_suggest(table.alternatives, budget, 'total_bytes')}",
        table,
    )


def check_free_disk(job: Job, table: SizeTable, free: int | None) -> None:
    """Without a budget: refuse a store that would not fit the free space where --out is."""
    if free is None or table.current.store_bytes <= free:
        return
    raise BudgetExceeded(
        f"out: the store needs about {size_text(table.current.store_bytes)} but only {size_text(free)} is "
        f"free at {job.cfg.out}; free space, choose another --out, or shrink the plan: "
        f"{_suggest(table.alternatives, free, 'store_bytes')}",
        table,
    )
