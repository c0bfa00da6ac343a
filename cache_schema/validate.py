"""Reading and checking caches: a zarr store or a folder of WebDataset shards (schema v2).

Everything here returns or raises errors a user can act on: the path, the field, what was
expected and what was found. A schema-v1 cache is refused with the way to re-extract it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import constants as C
from .errors import CacheError, CacheMismatch
from .fingerprint import fingerprint
from .layout import CacheLayout, EncoderEntry, ShardFile, ShardLayout, StoreLayout, as_layout


def content_fingerprint(spec: dict[str, Any], derived: dict[str, Any]) -> str:
    """What a cache holds: the request (`spec`) and what was fitted or measured from it before
    the first block was written (`derived`: PCA bases' sha256, fidelity)."""
    return fingerprint({"spec": spec, "derived": derived})


def _is_url(path: str) -> bool:
    return "://" in path


def open_group(path: str | Path):
    """The store's zarr group, read-only (our report.json/configs beside the arrays do not warn)."""
    import warnings

    import zarr

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a missing/corrupt group
        raise CacheError(f"{path} is not a readable zarr store: {exc}") from None


def open_array(group: Any, name: str, where: str | Path) -> Any:
    """`group[name]`, or a CacheError naming the array's metadata file (missing or unreadable);
    never zarr's own exceptions (a JSON error and a cascade of asyncio tracebacks)."""
    where = str(where).rstrip("/")
    try:
        return group[name]
    except KeyError:
        raise CacheError(f"{where}: missing array '{name}' (no {where}/{name}/zarr.json)") from None
    except Exception as exc:  # zarr raises JSON, value and type errors for garbage metadata
        raise CacheError(
            f"{where}/{name}/zarr.json is not readable zarr metadata ({type(exc).__name__}: {exc})"
        ) from None


def kind_of(path: str | Path) -> str:
    """'shards', 'store', 'run', 'zarr' (a zarr group that is not our store) or 'unknown'."""
    p = str(path)
    if _is_url(p):
        import fsspec

        fs, root = fsspec.core.url_to_fs(p)
        if fs.exists(f"{root.rstrip('/')}/{C.SHARD_INDEX}"):
            return "shards"
        if fs.exists(f"{root.rstrip('/')}/zarr.json"):
            return "store" if "schema_version" in dict(open_group(p).attrs) else "zarr"
        return "unknown"
    pp = Path(p)
    if (pp / C.SHARD_INDEX).is_file():
        return "shards"
    if (pp / "zarr.json").is_file():
        return "store" if "schema_version" in dict(open_group(pp).attrs) else "zarr"
    if (pp / "config.yaml").is_file() and ((pp / "log.jsonl").exists() or (pp / "checkpoints").exists()):
        return "run"
    return "unknown"


def _open(path: str, mode: str):
    """A file object for a local path or an fsspec URL (s3://, gs://, https://, ...)."""
    if _is_url(path):
        import fsspec

        return fsspec.open(path, mode)
    return open(path, mode)  # noqa: SIM115 - the caller's `with` closes it


def read_text(path: str) -> str:
    with _open(path, "r") as fh:
        return fh.read()


def read_bytes(path: str) -> bytes:
    with _open(path, "rb") as fh:
        return fh.read()


def read_yaml_mapping(
    path: str | Path, error: type[Exception], missing: str, label: str = "", allow_empty: bool = False
) -> dict[str, Any]:
    """A local YAML file that must hold a mapping. Every failure raises `error` naming the file:
    `missing` when it does not exist, else "{label}{path} is not valid YAML" or "... must hold a
    mapping"; an empty file is {} with `allow_empty`."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise error(missing) from None
    except yaml.YAMLError as exc:
        raise error(f"{label}{path} is not valid YAML: {exc}") from None
    if not data and allow_empty:  # empty file (or a bare null, [] ...)
        return {}
    if not isinstance(data, dict):
        raise error(f"{label}{path} must hold a mapping of keys to values")
    return data


def read_index(path: str | Path) -> dict[str, Any]:
    """The shard folder's index.json."""
    index_path = f"{str(path).rstrip('/')}/{C.SHARD_INDEX}"
    try:
        return json.loads(read_text(index_path))
    except FileNotFoundError:
        raise CacheError(
            f"{path} has no {C.SHARD_INDEX}: not a shard folder written by `pipeline pack`"
        ) from None
    except json.JSONDecodeError as exc:
        raise CacheError(f"{index_path} is not valid JSON: {exc}") from None


def check_schema(version: Any, path: str | Path) -> None:
    """Refuse a cache of another schema version, saying how to get a v2 one."""
    if version == C.SCHEMA_VERSION:
        return
    if version == 1:
        raise CacheError(f"{path} {C.V1_MESSAGE}")
    raise CacheError(f"{path} has cache schema version {version!r}; this tool reads v{C.SCHEMA_VERSION}")


def read_layout(path_or_layout: str | Path | CacheLayout | dict[str, Any]) -> CacheLayout:
    """The typed layout (fingerprint, grid, encoders, ...) of a store or a shard folder; a layout
    or a mapping of store attributes / index.json fields is converted as it is."""
    if isinstance(path_or_layout, (CacheLayout, dict)):
        return as_layout(path_or_layout)
    kind = kind_of(path_or_layout)
    if kind == "shards":
        return read_shard_layout(path_or_layout)
    if kind == "store":
        return store_layout(open_group(path_or_layout), path_or_layout)
    raise CacheError(f"{path_or_layout} is neither a zarr feature store nor a shard folder")


def read_shard_layout(path: str | Path) -> ShardLayout:
    """The typed index.json of a shard folder."""
    where = f"{str(path).rstrip('/')}/{C.SHARD_INDEX}"
    index = read_index(path)
    check_schema(index.get("schema_version"), path)
    return ShardLayout.from_index(index, where)


def store_layout(group: Any, where: str | Path = "the store") -> StoreLayout:
    """The typed root attributes of an open zarr store."""
    attrs = dict(group.attrs)
    check_schema(attrs.get("schema_version"), where)
    return StoreLayout.from_attrs(attrs, str(where))


def _check_store_arrays(group: Any, layout: StoreLayout, path: str | Path) -> list[str]:
    """Shape errors of the store's arrays, each opened by name (listing the group would make zarr
    open every file beside the arrays, report.json included, and bury one bad file in tracebacks)."""
    errors: list[str] = []
    n = layout.num_clips
    wanted: dict[str, tuple[int, ...] | None] = {a.path: (n, *a.shape) for a in layout.clip_arrays()}
    wanted.update({name: (n,) for name in (C.LABELS, C.VIDEO_INDEX, C.START_FRAME, C.FLIP, C.VALID)})
    wanted[C.BLOCK_DONE] = None
    for name, shape in wanted.items():
        try:
            array = open_array(group, name, path)
        except CacheError as exc:
            errors.append(str(exc))
            continue
        if shape is not None and tuple(array.shape) != shape:
            errors.append(f"{path}: {name} shape {tuple(array.shape)} != {shape}")
    return errors


def _header_errors(
    meta: dict[str, Any], path: str | Path, required: tuple[str, ...], missing: str
) -> list[str]:
    """Errors that stop validation before any data is looked at: another schema version, or
    required metadata (store attributes, index fields) absent, listed after `missing`."""
    try:
        check_schema(meta.get("schema_version"), path)
    except CacheError as exc:
        return [str(exc)]
    absent = [f for f in required if f not in meta]
    return [f"{missing} {', '.join(absent)}"] if absent else []


def validate_store(path: str | Path, require_complete: bool = True) -> list[str]:
    """Schema-v2 errors of a zarr store (empty list = valid)."""
    try:
        group = open_group(path)
    except CacheError as exc:
        return [str(exc)]
    attrs = dict(group.attrs)
    errors = _header_errors(attrs, path, C.STORE_ATTRS, f"{path}: missing attribute(s)")
    if errors:
        return errors
    try:
        layout = StoreLayout.from_attrs(attrs, str(path))
    except CacheError as exc:
        return [str(exc)]
    if content_fingerprint(layout.spec, layout.derived) != layout.fingerprint:
        return [f"{path}: fingerprint does not match the recorded spec (attributes edited or corrupt)"]
    errors = _check_store_arrays(group, layout, path)
    if require_complete and not errors:
        done = open_array(group, C.BLOCK_DONE, path)[:]
        if int(done.sum()) != layout.num_blocks:
            todo = [int(i) for i in (done == 0).nonzero()[0][:5]]
            errors.append(
                f"{path}: incomplete, {layout.num_blocks - int(done.sum())} of {layout.num_blocks} "
                f"blocks unfinished (e.g. {todo}); rerun the same `pipeline extract` command to resume"
            )
    return errors


class _HashingReader:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, fh) -> None:
        self.fh, self.digest = fh, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.digest.update(data)
        return data


def _sha256_and_samples(path: str) -> tuple[str, int | str]:
    """sha256 of a shard and how many samples it really holds, in one read (the count is the
    reason why not, when the tar cannot be read)."""
    from .tars import TarFormatError, iter_samples

    with _open(path, "rb") as fh:
        reader = _HashingReader(fh)
        try:
            count: int | str = sum(1 for _ in iter_samples(reader, path))  # type: ignore[arg-type]
        except TarFormatError as exc:
            count = str(exc)
        while reader.read(1 << 20):
            pass
    return reader.digest.hexdigest(), count


def _size(path: str) -> int | None:
    if _is_url(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        return fs.size(root) if fs.exists(root) else None
    p = Path(path)
    return p.stat().st_size if p.is_file() else None


def _check_shard_files(path: str | Path, shards: Iterable[ShardFile], verify_hashes: bool, progress: bool):
    errors: list[str] = []
    if progress:
        from tqdm import tqdm

        shards = tqdm(shards, desc="verify shards", unit="shard")
    for shard in shards:
        shard_path = f"{str(path).rstrip('/')}/{shard.name}"
        size = _size(shard_path)
        if size is None:
            errors.append(f"shard {shard.name} is missing")
        elif size != shard.bytes:
            errors.append(f"shard {shard.name} is corrupt: {size} bytes on disk, index says {shard.bytes}")
        elif verify_hashes:
            digest, count = _sha256_and_samples(shard_path)
            if digest != shard.sha256:
                errors.append(f"shard {shard.name} is corrupt: sha256 differs from the index")
            elif count != shard.samples:
                errors.append(
                    f"{C.SHARD_INDEX} is wrong: it says shard {shard.name} holds {shard.samples} samples, "
                    f"the tar holds {count}"
                )
    return errors


def validate_shards(path: str | Path, verify_hashes: bool = False, progress: bool = False) -> list[str]:
    """Schema-v2 errors of a shard folder; with `verify_hashes`, re-hash each shard (and the PCA
    bases) and name corrupt ones."""
    try:
        index = read_index(path)
    except CacheError as exc:
        return [str(exc)]
    errors = _header_errors(index, path, C.INDEX_FIELDS, f"{path}/{C.SHARD_INDEX}: missing field(s)")
    if errors:
        return errors
    try:
        layout = ShardLayout.from_index(index, f"{path}/{C.SHARD_INDEX}")
    except CacheError as exc:
        return [str(exc)]
    if content_fingerprint(layout.spec, layout.derived) != layout.fingerprint:
        errors.append(f"{path}: fingerprint does not match the recorded spec")
    if sum(s.samples for s in layout.shards) != layout.num_samples:
        errors.append(f"{path}: per-shard sample counts do not add up to num_samples={layout.num_samples}")
    for pca in (layout.pca_files or {}).values():
        pca_path = f"{str(path).rstrip('/')}/{pca['name']}"
        if _size(pca_path) is None:
            errors.append(f"{path}: the PCA basis file {pca['name']} is missing")
        elif hashlib.sha256(read_bytes(pca_path)).hexdigest() != pca["sha256"]:
            errors.append(f"{path}: {pca['name']} is corrupt: sha256 differs from the index")
    return errors + _check_shard_files(path, layout.shards, verify_hashes, progress)


def _compare_encoders(want: list[Any], have: tuple[EncoderEntry, ...], where: str) -> None:
    cached = {e.name: e.to_dict() for e in have}
    for item in want:
        name = item if isinstance(item, str) else item["name"]
        if name not in cached:
            raise CacheMismatch("encoders", name, sorted(cached), where)
        if isinstance(item, str):
            continue
        for key, value in item.items():
            if key != "name" and value != cached[name].get(key):
                raise CacheMismatch(f"encoders.{name}.{key}", value, cached[name].get(key), where)


def compatible(
    path_or_layout: str | Path | CacheLayout | dict[str, Any], requested: dict[str, Any]
) -> CacheLayout:
    """Check a cache against what a run asks for; raise CacheMismatch naming the first differing field.

    `requested` may hold: schema_version, fingerprint, grid, patch_size, latent_shape, encoders
    (a list of names: any subset of the cached encoders, or entries whose keys must match).
    Returns the cache's typed layout on success.
    """
    where = "" if isinstance(path_or_layout, (CacheLayout, dict)) else str(path_or_layout)
    if isinstance(path_or_layout, dict):  # another schema is refused before its fields are read
        check_schema(path_or_layout.get("schema_version"), where or "the cache")
    layout = read_layout(path_or_layout)
    check_schema(layout.schema_version, where or "the cache")
    for field in C.LAYOUT_FIELDS:
        if field not in requested or requested[field] is None:
            continue
        want, have = requested[field], getattr(layout, field)
        if field == "encoders":
            _compare_encoders(want, have, where)
            continue
        if isinstance(want, (list, tuple)):
            want, have = list(want), list(have) if have is not None else None
        if want != have:
            raise CacheMismatch(field, want, have, where)
    return layout


def encoder_entries(
    layout: CacheLayout | dict[str, Any], names: list[str] | None = None
) -> dict[str, EncoderEntry]:
    """name -> the cache's layout entry (dim, format, time_frames, values, scales, pca) for the
    chosen (default: all) encoders, in the order asked for."""
    return as_layout(layout).encoder_entries(names)
