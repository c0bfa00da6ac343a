"""zarr store -> WebDataset tar shards, one dask task per shard, plus index.json (schema v2).

Rows are written in a seeded permutation of the store's valid rows, so every shard's class mix
follows the dataset's (a store is written in extraction order, which is class order, and a
1,000-sample shuffle buffer cannot undo that). Each task reads its rows straight from zarr and
writes two tars: the full samples and the same samples with latents only (same keys, same
order), which a trainer reads once alignment has ended. Every sample carries a crc32 of its
payload. Tars are written with a fixed mtime: the same store always packs to the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import numpy as np

from cache_schema import OutputError, OutputLock, open_group, prepare_output, store_layout, validate_store
from cache_schema import constants as C
from cache_schema.bases import store_bases, write_shard_bases
from cache_schema.checksum import with_checksum
from cache_schema.integrity import BlockDamaged, RowChecker, open_array
from cache_schema.layout import CacheLayout, EncoderEntry, ShardFile, ShardLayout
from cache_schema.outputs import refuse_if_locked
from cache_schema.readers import refuse_if_read
from cache_schema.text import store_empty_prompt, trim, write_shard_empty_prompt
from stages.common.runtime import disk_full_message, is_disk_full, process_pool


class PackError(RuntimeError):
    """The store cannot be packed (invalid or incomplete), or --out is refused."""


@dataclass
class PackConfig:
    cache: str = ""
    out: str = ""
    samples_per_shard: int = 256
    seed: int = 0  # the row permutation
    scheduler: str = "threads"  # threads | processes | synchronous | a dask.distributed address
    workers: int | None = None
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if not self.cache or not self.out:
            raise ValueError("both CACHE and --out are required")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def clip_sample(
    row: int,
    latent: np.ndarray,
    targets: dict[str, tuple[np.ndarray, np.ndarray | None]],
    label: int,
    meta: dict[str, Any],
    norms: dict[str, np.ndarray] | None = None,
    text: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, bytes]:
    """One schema-v2 sample: latent, each encoder's values (+ scales, + token norms), the prompt's
    embeddings (its own rows, cache_schema.text.trim) and mask, class, meta, crc32. `targets` empty
    gives the latents-only sample."""
    sample: dict[str, Any] = {"__key__": C.KEY_FORMAT.format(row), C.SAMPLE_LATENT: npy_bytes(latent)}
    if text is not None:
        sample[C.SAMPLE_TEXT], sample[C.SAMPLE_TEXT_MASK] = npy_bytes(trim(*text)), npy_bytes(text[1])
    for name, (values, scales) in targets.items():
        sample[C.sample_values(name)] = npy_bytes(values)
        if scales is not None:
            sample[C.sample_scales(name)] = npy_bytes(scales)
        if norms and name in norms:
            sample[C.sample_norms(name)] = npy_bytes(norms[name])
    sample[C.SAMPLE_META] = json.dumps(meta, sort_keys=True).encode()
    if label >= 0:
        sample[C.SAMPLE_CLASS] = str(label).encode()
    return with_checksum(sample)


@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
    """A full disk reported with the file's name (the OS error of a write or a flush names none)."""
    try:
        yield
    except OSError as exc:
        if exc.filename or not is_disk_full(exc):
            raise
        raise OSError(exc.errno, exc.strerror, path) from exc


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


class TarSink:
    """One shard tar being written (fixed mtime: reproducible bytes); `entry()` is its index row."""

    def __init__(self, path: str) -> None:
        import webdataset as wds

        self.path, self.count = path, 0
        with _naming(path):
            self._file = fsspec.open(path, "wb").open()
        self._hashing = _HashingWriter(self._file)
        self._tar = wds.TarWriter(self._hashing, encoder=False, mtime=0.0)

    def write(self, sample: dict[str, Any]) -> None:
        with _naming(self.path):
            self._tar.write(sample)
        self.count += 1

    def abort(self) -> None:
        """After a failure: close quietly, so nothing is left for the garbage collector to flush
        into a closed file. The partial tar stays (a rerun replaces it): the disk-full message
        then reports the free space as it was."""
        tar = self._tar.tarstream
        tar.closed = True  # nothing more is written: its end blocks would hit the same error again
        with contextlib.suppress(AttributeError):
            tar.fileobj.closed = True  # tarfile's stream would flush itself into the closed file at exit
        with contextlib.suppress(Exception):
            self._file.close()

    def close(self) -> dict[str, Any]:
        with _naming(self.path):
            self._tar.close()
            self._file.close()
        return {
            "name": self.path.rstrip("/").rsplit("/", 1)[-1],
            "samples": self.count,
            "bytes": self._hashing.size,
            "sha256": self._hashing._hash.hexdigest(),
        }


def write_tar(path: str, samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Write samples to one tar; returns its index entry (name, samples, bytes, sha256)."""
    sink = TarSink(path)
    for sample in samples:
        sink.write(sample)
    return sink.close()


def _target_arrays(group, encoders: tuple[EncoderEntry, ...], where: str) -> dict[str, tuple[Any, Any, Any]]:
    """name -> (values array, scales array or None, token norms array or None), opened once per task."""
    arrays = {}
    for enc in encoders:
        scales = open_array(group, enc.scales_path, where) if enc.scales else None
        norms = open_array(group, enc.norms_path, where) if enc.stores_norms else None
        arrays[enc.name] = (open_array(group, enc.values_path, where), scales, norms)
    return arrays


def write_shard(cache: str, out: str, name: str, rows: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write one shard (and its latents-only twin) with the given store rows, in that order. Every
    row read is checked against the store's checksums: a missing or corrupt chunk stops the task
    naming the array, the block and the rows, and removes the partial tars."""
    group = open_group(cache)
    layout = store_layout(group, cache)
    check = RowChecker(group, cache)
    sources, encoders = layout.sources, layout.encoders
    meta_arrays = {n: check.read_all(open_array(group, n, cache), n) for n in C.META_ARRAYS}
    latents = open_array(group, C.LATENTS, cache)
    target_arrays = _target_arrays(group, encoders, cache)
    text_parts = [] if layout.text is None else layout.text.arrays()
    text_arrays = {a.path: open_array(group, a.path, cache) for a in text_parts}  # embeds, mask
    full = TarSink(f"{out.rstrip('/')}/{name}")
    lean = TarSink(f"{out.rstrip('/')}/{C.LATENTS_ONLY_DIR}/{name}")
    try:
        for row in rows:
            for n, values in meta_arrays.items():
                check.check(n, row, values[row : row + 1])
            latent = check.read(latents, C.LATENTS, row)
            targets = {n: _read_target(check, n, v, s, row) for n, (v, s, _) in target_arrays.items()}
            norms = {
                n: check.read(a, C.norms_path(n), row)
                for n, (_, _, a) in target_arrays.items()
                if a is not None
            }
            text = tuple(check.read(a, path, row) for path, a in text_arrays.items()) or None
            label = int(meta_arrays[C.LABELS][row])
            meta = {
                "video": sources[int(meta_arrays[C.VIDEO_INDEX][row])],
                "start_frame": int(meta_arrays[C.START_FRAME][row]),
                "flip": bool(meta_arrays[C.FLIP][row]),
                "clip_index": int(row),
                "label": label if label >= 0 else None,
            }
            full.write(clip_sample(row, latent, targets, label, meta, norms, text))
            lean.write(clip_sample(row, latent, {}, label, meta, text=text))
        return full.close(), lean.close()
    except BaseException:
        full.abort()
        lean.abort()
        raise


def _read_target(check: RowChecker, name: str, values, scales, row: int) -> tuple[Any, Any]:
    v = check.read(values, C.values_path(name), row)
    return v, None if scales is None else check.read(scales, C.scales_path(name), row)


def plan_shards(valid: np.ndarray, samples_per_shard: int, seed: int) -> list[list[int]]:
    """Valid store rows in a seeded permutation, cut into shards."""
    rows = np.flatnonzero(valid)
    rows = rows[np.random.default_rng(seed).permutation(len(rows))].tolist()
    return [rows[i : i + samples_per_shard] for i in range(0, len(rows), samples_per_shard)]


def shard_index(
    layout: CacheLayout, entries: list[dict[str, Any]], text_empty: dict[str, str] | None = None, **extra: Any
) -> dict[str, Any]:
    """index.json of a shard folder: the store's layout fields, the shard entries, and `extra`
    (order, pca_files, latents_only, source_store); `text_empty`: the empty prompt file's entry."""
    text = layout.text if layout.text is None else replace(layout.text, empty=text_empty)
    return ShardLayout(
        fingerprint=layout.fingerprint,
        spec=layout.spec,
        derived=layout.derived,
        encoders=layout.encoders,
        grid=layout.grid,
        latent_shape=layout.latent_shape,
        class_names=layout.class_names,
        patch_size=layout.patch_size or (1, 2, 2),
        text=text,
        num_samples=sum(e["samples"] for e in entries),
        shards=tuple(ShardFile.from_dict(e) for e in entries),
        **extra,
    ).to_index()


def write_index(out: str, index: dict[str, Any]) -> None:
    path = f"{out.rstrip('/')}/{C.SHARD_INDEX}"
    with _naming(path), fsspec.open(path, "w") as fh:
        json.dump(index, fh, indent=2)


def _prepare_out(cfg: PackConfig) -> None:
    if "://" not in cfg.out and os.path.isdir(cfg.out):  # before anything is cleared:
        refuse_if_locked(cfg.out, f"pid:{os.getpid()}")  # another pack writing here now
        if cfg.overwrite:
            refuse_if_read(cfg.out, "pack --overwrite")  # a training reading these shards
    state = prepare_output(cfg.out, "shards", overwrite=cfg.overwrite, inputs={"CACHE": cfg.cache})
    fs, root = fsspec.core.url_to_fs(cfg.out)
    if state == "ours" and not cfg.overwrite and fs.exists(f"{root}/{C.SHARD_INDEX}"):
        raise PackError(f"{cfg.out} already holds shards; pass --overwrite to replace them")
    fs.makedirs(f"{root}/{C.LATENTS_ONLY_DIR}", exist_ok=True)


def run_pack(cfg: PackConfig) -> dict[str, Any]:
    """Pack the store into shards in parallel and write both index.json files; returns the index."""
    import dask

    try:
        cfg.validate()
    except ValueError as exc:
        raise PackError(str(exc)) from None
    errors = validate_store(cfg.cache)
    if errors:
        raise PackError("cannot pack: " + "; ".join(errors))
    group = open_group(cfg.cache)
    layout = store_layout(group, cfg.cache)
    try:
        check = RowChecker(group, cfg.cache)
        valid = check.read_all(open_array(group, C.VALID, cfg.cache), C.VALID, check=True)
    except BlockDamaged as exc:
        raise PackError(damaged_message(exc)) from None
    shards = plan_shards(valid, cfg.samples_per_shard, cfg.seed)
    if not shards:
        raise PackError(f"{cfg.cache} has no valid clips to pack")
    try:
        _prepare_out(cfg)
        lock = OutputLock(cfg.out, "pipeline pack").acquire()
    except OutputError as exc:
        raise PackError(str(exc)) from None
    try:
        names = [C.SHARD_PATTERN.format(i) for i in range(len(shards))]
        tasks = [
            dask.delayed(write_shard)(cfg.cache, cfg.out, n, s) for n, s in zip(names, shards, strict=True)
        ]
        try:
            pairs = _compute(tasks, cfg)
        except BlockDamaged as exc:
            raise PackError(damaged_message(exc)) from None
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            raise PackError(
                disk_full_message(exc, cfg.out, "Free space and rerun the same command to resume.")
            ) from None
        source = os.path.abspath(cfg.cache) if "://" not in cfg.cache else cfg.cache
        order = {"kind": "permutation", "seed": cfg.seed}
        empty = None
        if layout.text is not None:  # the empty prompt, once per shard set (and its latents-only twin)
            prompt = store_empty_prompt(group, layout, cfg.cache)
            lean_dir = f"{cfg.out.rstrip('/')}/{C.LATENTS_ONLY_DIR}"
            empty, lean_empty = (
                write_shard_empty_prompt(cfg.out, *prompt),
                write_shard_empty_prompt(lean_dir, *prompt),
            )
        lean_index = shard_index(
            layout, [p[1] for p in pairs], lean_empty if empty else None, order=order, latents_only=True
        )
        write_index(f"{cfg.out.rstrip('/')}/{C.LATENTS_ONLY_DIR}", lean_index)
        index = shard_index(
            layout,
            [p[0] for p in pairs],
            empty,
            order=order,
            pca_files=write_shard_bases(cfg.out, store_bases(group)),
            latents_only={
                "dir": C.LATENTS_ONLY_DIR,
                "num_samples": lean_index["num_samples"],
                "bytes": sum(p[1]["bytes"] for p in pairs),
            },
            source_store=source,
        )
        write_index(cfg.out, index)  # last: a folder with index.json is a complete shard set
    finally:
        lock.release()
    return index


def damaged_message(exc: BlockDamaged) -> str:
    return (
        f"cannot pack: {exc}. Rerun the same `pipeline extract` command (it redoes that block), "
        "then pack again"
    )


def _compute(tasks: list, cfg: PackConfig) -> list:
    import dask

    if cfg.scheduler not in ("threads", "processes", "synchronous"):
        from dask.distributed import Client  # a dask.distributed scheduler address

        with Client(cfg.scheduler) as client:
            return list(client.gather(client.compute(tasks)))
    kwargs: dict[str, Any] = {"scheduler": cfg.scheduler}
    if cfg.workers and cfg.scheduler == "threads":
        kwargs["num_workers"] = cfg.workers
    with contextlib.ExitStack() as stack:
        if cfg.scheduler == "processes":  # our pool: its workers die with us, also after kill -9
            kwargs["pool"] = stack.enter_context(process_pool(cfg.workers))
        if cfg.progress:
            from dask.diagnostics import ProgressBar

            stack.enter_context(ProgressBar())
        return list(dask.compute(*tasks, **kwargs))
