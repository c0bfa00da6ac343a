"""zarr store -> WebDataset tar shards, one dask task per shard, plus index.json.

Each task reads its own contiguous run of clips straight from zarr and writes one tar, so the
work scales from the local scheduler to a dask.distributed cluster without change. Tars are
written with a fixed mtime: the same store always packs to byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from cache_schema import SCHEMA_VERSION, open_group, validate_store
from cache_schema import constants as C


class PackError(RuntimeError):
    """The store cannot be packed (invalid or incomplete)."""


@dataclass
class PackConfig:
    cache: str = ""
    out: str = ""
    samples_per_shard: int = 256
    scheduler: str = "threads"  # threads | processes | synchronous | a dask.distributed address
    workers: int | None = None
    overwrite: bool = False
    progress: bool = True


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def clip_sample(clip: int, latent: np.ndarray, target: np.ndarray, label: int, meta: dict[str, Any]) -> dict:
    """One WebDataset sample of schema v1 (label < 0: unlabelled, no `cls`)."""
    sample = {
        "__key__": C.KEY_FORMAT.format(clip),
        C.SAMPLE_LATENT: _npy_bytes(latent),
        C.SAMPLE_TARGET: _npy_bytes(target),
        C.SAMPLE_META: json.dumps(meta).encode(),
    }
    if label >= 0:
        sample[C.SAMPLE_CLASS] = str(label).encode()
    return sample


def write_tar(path: str, samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Write samples to one tar (fixed mtime: reproducible bytes); returns name, samples, bytes, sha256."""
    import webdataset as wds

    count = 0
    with fsspec.open(path, "wb") as raw:
        digest = _HashingWriter(raw)
        with wds.TarWriter(digest, encoder=False, mtime=0.0) as sink:
            for sample in samples:
                sink.write(sample)
                count += 1
    return {
        "name": path.rstrip("/").rsplit("/", 1)[-1],
        "samples": count,
        "bytes": digest.size,
        "sha256": digest.hexdigest(),
    }


def shard_index(layout: dict[str, Any], entries: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """index.json of a shard folder: the store's layout fields, the shard entries, and `extra`."""
    return {
        "schema_version": SCHEMA_VERSION,
        **{
            key: layout[key]
            for key in (
                "fingerprint",
                "spec",
                "encoders",
                "grid",
                "latent_shape",
                "target_dim",
                "class_names",
            )
        },
        "patch_size": layout.get("patch_size", [1, 2, 2]),
        "num_samples": sum(e["samples"] for e in entries),
        **extra,
        "shards": entries,
    }


def write_index(out: str, index: dict[str, Any]) -> None:
    with fsspec.open(f"{out.rstrip('/')}/{C.SHARD_INDEX}", "w") as fh:
        json.dump(index, fh, indent=2)


def write_shard(cache: str, out: str, name: str, clips: list[int]) -> dict[str, Any]:
    """Write one shard with the given clip rows of the store; returns its index entry."""
    group = open_group(cache)
    sources = group.attrs["sources"]
    lo, hi = clips[0], clips[-1] + 1  # one contiguous read; invalid rows in between are skipped
    latents = group[C.LATENTS][lo:hi]
    targets = group[C.TARGETS][lo:hi]
    labels = group[C.LABELS][lo:hi]
    video_index = group[C.VIDEO_INDEX][lo:hi]
    start_frame = group[C.START_FRAME][lo:hi]

    def samples():
        for clip in clips:
            row = clip - lo
            label = int(labels[row])
            meta = {
                "video": sources[int(video_index[row])],
                "start_frame": int(start_frame[row]),
                "clip_index": int(clip),
                "label": label if label >= 0 else None,
            }
            yield clip_sample(clip, latents[row], targets[row], label, meta)

    return write_tar(f"{out.rstrip('/')}/{name}", samples())


class _HashingWriter(io.RawIOBase):
    """File wrapper that hashes and counts what passes through (one read of the data)."""

    def __init__(self, raw) -> None:
        self.raw, self.size, self._hash = raw, 0, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._hash.update(data)
        self.size += len(data)
        self.raw.write(data)
        return len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def plan_shards(valid: np.ndarray, samples_per_shard: int) -> list[list[int]]:
    rows = np.flatnonzero(valid).tolist()
    return [rows[i : i + samples_per_shard] for i in range(0, len(rows), samples_per_shard)]


def run_pack(cfg: PackConfig) -> dict[str, Any]:
    """Pack the store into shards in parallel and write index.json; returns the index."""
    import dask

    if not cfg.cache or not cfg.out:
        raise PackError("both CACHE and --out are required")
    if cfg.samples_per_shard < 1:
        raise PackError("--samples-per-shard must be at least 1")
    errors = validate_store(cfg.cache)
    if errors:
        raise PackError("cannot pack: " + "; ".join(errors))
    group = open_group(cfg.cache)
    attrs = dict(group.attrs)
    shards = plan_shards(group[C.VALID][:], cfg.samples_per_shard)
    if not shards:
        raise PackError(f"{cfg.cache} has no valid clips to pack")
    fs, root = fsspec.core.url_to_fs(cfg.out)
    if fs.exists(f"{root}/{C.SHARD_INDEX}") and not cfg.overwrite:
        raise PackError(f"{cfg.out} already holds shards; pass --overwrite to replace them")
    fs.makedirs(root, exist_ok=True)
    for stale in fs.glob(f"{root}/shard-*.tar"):
        fs.rm(stale)
    names = [C.SHARD_PATTERN.format(i) for i in range(len(shards))]
    tasks = [dask.delayed(write_shard)(cfg.cache, cfg.out, n, s) for n, s in zip(names, shards, strict=True)]
    entries = _compute(tasks, cfg)
    source = os.path.abspath(cfg.cache) if "://" not in cfg.cache else cfg.cache
    index = shard_index(attrs, entries, source_store=source)
    write_index(cfg.out, index)
    return index


def _compute(tasks: list, cfg: PackConfig) -> list[dict[str, Any]]:
    import dask

    if cfg.scheduler not in ("threads", "processes", "synchronous"):
        from dask.distributed import Client  # a dask.distributed scheduler address

        with Client(cfg.scheduler) as client:
            return list(client.gather(client.compute(tasks)))
    kwargs: dict[str, Any] = {"scheduler": cfg.scheduler}
    if cfg.workers and cfg.scheduler != "synchronous":
        kwargs["num_workers"] = cfg.workers
    if cfg.progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            return list(dask.compute(*tasks, **kwargs))
    return list(dask.compute(*tasks, **kwargs))
