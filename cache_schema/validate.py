"""Reading and checking caches: a zarr store or a folder of WebDataset shards.

Everything here returns or raises errors a user can act on: the path, the field, what was
expected and what was found.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from . import constants as C
from .fingerprint import fingerprint


class CacheError(ValueError):
    """A cache that cannot be read or does not follow schema v1."""


class CacheMismatch(CacheError):
    """A cache that is valid but does not match what a run asked for; names the field."""

    def __init__(self, field: str, expected: Any, found: Any, path: str = "") -> None:
        self.field, self.expected, self.found, self.path = field, expected, found, path
        where = f" {path}" if path else ""
        super().__init__(
            f"cache{where} does not match the requested config: field '{field}' "
            f"is {found!r} in the cache but {expected!r} was requested"
        )


def _is_url(path: str) -> bool:
    return "://" in path


def open_group(path: str | Path):
    """The store's zarr group, read-only (our report.json/configs beside the arrays do not warn)."""
    import warnings

    import zarr

    try:
        with warnings.catch_warnings():  # report.json / configs beside the arrays are ours
            warnings.simplefilter("ignore")
            return zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a missing/corrupt group
        raise CacheError(f"{path} is not a readable zarr store: {exc}") from None


def kind_of(path: str | Path) -> str:
    """'shards' (a folder with index.json), 'store' (zarr group), 'run' (has config.yaml + log), or 'unknown'."""
    p = str(path)
    if _is_url(p):
        import fsspec

        fs, root = fsspec.core.url_to_fs(p)
        if fs.exists(f"{root.rstrip('/')}/{C.SHARD_INDEX}"):
            return "shards"
        if fs.exists(f"{root.rstrip('/')}/zarr.json"):
            return "store"
        return "unknown"
    pp = Path(p)
    if (pp / C.SHARD_INDEX).is_file():
        return "shards"
    if (pp / "zarr.json").is_file():
        return "store"
    if (pp / "config.yaml").is_file() and ((pp / "log.jsonl").exists() or (pp / "checkpoints").exists()):
        return "run"
    return "unknown"


def _read_text(path: str) -> str:
    if _is_url(path):
        import fsspec

        with fsspec.open(path, "r") as fh:
            return fh.read()
    return Path(path).read_text()


def read_index(path: str | Path) -> dict[str, Any]:
    """The shard folder's index.json."""
    index_path = f"{str(path).rstrip('/')}/{C.SHARD_INDEX}"
    try:
        return json.loads(_read_text(index_path))
    except FileNotFoundError:
        raise CacheError(
            f"{path} has no {C.SHARD_INDEX}: not a shard folder written by `pipeline pack`"
        ) from None
    except json.JSONDecodeError as exc:
        raise CacheError(f"{index_path} is not valid JSON: {exc}") from None


def read_layout(path_or_layout: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The layout attributes (fingerprint, grid, encoders, ...) of a store or a shard folder."""
    if isinstance(path_or_layout, dict):
        return path_or_layout
    kind = kind_of(path_or_layout)
    if kind == "shards":
        return read_index(path_or_layout)
    if kind == "store":
        return dict(open_group(path_or_layout).attrs)
    raise CacheError(f"{path_or_layout} is neither a zarr feature store nor a shard folder")


def validate_store(path: str | Path, require_complete: bool = True) -> list[str]:
    """Schema-v1 errors of a zarr store (empty list = valid)."""
    errors: list[str] = []
    try:
        group = open_group(path)
    except CacheError as exc:
        return [str(exc)]
    attrs = dict(group.attrs)
    missing = [a for a in C.STORE_ATTRS if a not in attrs]
    if missing:
        return [f"{path}: missing attribute(s) {', '.join(missing)}"]
    if attrs["schema_version"] != C.SCHEMA_VERSION:
        errors.append(
            f"{path}: schema_version is {attrs['schema_version']}, this tool reads {C.SCHEMA_VERSION}"
        )
    if fingerprint(attrs["spec"]) != attrs["fingerprint"]:
        errors.append(f"{path}: fingerprint does not match the recorded spec (attributes edited or corrupt)")
    names = set(group.array_keys())
    for name in C.STORE_ARRAYS:
        if name not in names:
            errors.append(f"{path}: missing array '{name}'")
    if errors:
        return errors
    n = int(attrs["num_clips"])
    latents, targets = group[C.LATENTS], group[C.TARGETS]
    expected_latent = (n, *attrs["latent_shape"])
    if tuple(latents.shape) != expected_latent:
        errors.append(f"{path}: latents shape {tuple(latents.shape)} != {expected_latent}")
    expected_target = (n, *attrs["grid"], int(attrs["target_dim"]))
    if tuple(targets.shape) != expected_target:
        errors.append(f"{path}: targets shape {tuple(targets.shape)} != {expected_target}")
    for name in (C.LABELS, C.VIDEO_INDEX, C.START_FRAME, C.VALID):
        if tuple(group[name].shape) != (n,):
            errors.append(f"{path}: {name} shape {tuple(group[name].shape)} != ({n},)")
    stop = 0
    for enc in attrs["encoders"]:
        if enc.get("start") != stop or enc.get("stop", 0) <= enc.get("start", 0):
            errors.append(f"{path}: encoder '{enc.get('name')}' channel slice is not contiguous")
        stop = enc.get("stop", stop)
    if stop != int(attrs["target_dim"]):
        errors.append(f"{path}: encoder slices cover {stop} channels, target_dim is {attrs['target_dim']}")
    if require_complete and not errors:
        done = group[C.BLOCK_DONE][:]
        if int(done.sum()) != int(attrs["num_blocks"]):
            todo = [int(i) for i in (done == 0).nonzero()[0][:5]]
            errors.append(
                f"{path}: incomplete, {int(attrs['num_blocks']) - int(done.sum())} of {attrs['num_blocks']} "
                f"blocks unfinished (e.g. {todo}); rerun the same `pipeline extract` command to resume"
            )
    return errors


def _sha256(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    if _is_url(path):
        import fsspec

        opener = fsspec.open(path, "rb")
    else:
        opener = open(path, "rb")  # noqa: SIM115
    with opener as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _size(path: str) -> int | None:
    if _is_url(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        return fs.size(root) if fs.exists(root) else None
    p = Path(path)
    return p.stat().st_size if p.is_file() else None


def validate_shards(path: str | Path, verify_hashes: bool = False, progress: bool = False) -> list[str]:
    """Schema-v1 errors of a shard folder; with `verify_hashes`, re-hash each shard and name corrupt ones."""
    try:
        index = read_index(path)
    except CacheError as exc:
        return [str(exc)]
    missing = [f for f in C.INDEX_FIELDS if f not in index]
    if missing:
        return [f"{path}/{C.SHARD_INDEX}: missing field(s) {', '.join(missing)}"]
    errors: list[str] = []
    if index["schema_version"] != C.SCHEMA_VERSION:
        errors.append(
            f"{path}: schema_version is {index['schema_version']}, this tool reads {C.SCHEMA_VERSION}"
        )
    if fingerprint(index["spec"]) != index["fingerprint"]:
        errors.append(f"{path}: fingerprint does not match the recorded spec")
    if sum(int(s["samples"]) for s in index["shards"]) != int(index["num_samples"]):
        errors.append(f"{path}: per-shard sample counts do not add up to num_samples={index['num_samples']}")
    shards = index["shards"]
    if progress:
        from tqdm import tqdm

        shards = tqdm(shards, desc="verify shards", unit="shard")
    for shard in shards:
        shard_path = f"{str(path).rstrip('/')}/{shard['name']}"
        size = _size(shard_path)
        if size is None:
            errors.append(f"shard {shard['name']} is missing")
            continue
        if size != int(shard["bytes"]):
            errors.append(
                f"shard {shard['name']} is corrupt: {size} bytes on disk, index says {shard['bytes']}"
            )
            continue
        if verify_hashes and _sha256(shard_path) != shard["sha256"]:
            errors.append(f"shard {shard['name']} is corrupt: sha256 differs from the index")
    return errors


def compatible(path_or_layout: str | Path | dict[str, Any], requested: dict[str, Any]) -> dict[str, Any]:
    """Check a cache against what a run asks for; raise CacheMismatch naming the first differing field.

    `requested` may hold: schema_version, fingerprint, grid, patch_size, latent_shape, target_dim,
    encoders (a list of names: any subset of the cached encoders, in any order, or full entries).
    Returns the cache's layout on success.
    """
    layout = read_layout(path_or_layout)
    where = "" if isinstance(path_or_layout, dict) else str(path_or_layout)
    if layout.get("schema_version") != C.SCHEMA_VERSION:
        raise CacheMismatch("schema_version", C.SCHEMA_VERSION, layout.get("schema_version"), where)
    for field in C.LAYOUT_FIELDS:
        if field not in requested or requested[field] is None:
            continue
        want, have = requested[field], layout.get(field)
        if field == "encoders":
            cached = {e["name"]: e for e in have or []}
            for item in want:
                name = item if isinstance(item, str) else item["name"]
                if name not in cached:
                    raise CacheMismatch("encoders", name, sorted(cached), where)
                if not isinstance(item, str):
                    for key in ("dim", "id", "start", "stop"):
                        if key in item and item[key] != cached[name].get(key):
                            raise CacheMismatch(
                                f"encoders.{name}.{key}", item[key], cached[name].get(key), where
                            )
            continue
        if isinstance(want, (list, tuple)):
            want, have = list(want), list(have) if have is not None else None
        if want != have:
            raise CacheMismatch(field, want, have, where)
    return layout


def encoder_slices(layout: dict[str, Any], names: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """name -> (start, stop) channel slice of `targets` for the chosen (default: all) encoders."""
    cached = {e["name"]: (int(e["start"]), int(e["stop"])) for e in layout["encoders"]}
    chosen = names or list(cached)
    unknown = [n for n in chosen if n not in cached]
    if unknown:
        raise CacheMismatch("encoders", unknown[0], sorted(cached))
    return {n: cached[n] for n in chosen}
