"""Reading our own shard tars fast: one read per member, samples grouped by key; or one sample
at a time by its byte range (`scan_samples` finds the ranges from the headers alone, `read_sample`
reads one member by member), which the trainer's global sample order needs.

Why not webdataset's tar iterator: it streams members through tarfile in 10 KB pieces and joins
them, which on multi-megabyte target members costs about as much as everything else the loader
does (measured in bench/train_step.py and bench/cache.py). The shards stay plain POSIX tars that
the stock `webdataset` reader reads (tests check both readers agree); this reader only knows the
subset of the format `TarWriter` writes: regular files, with pax or GNU long-name records.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

BLOCK = 512
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key/extension split


class TarFormatError(ValueError):
    """A tar that ends early or has a header we cannot read; names the file."""


def _field(header: bytes, start: int, length: int) -> bytes:
    return header[start : start + length].split(b"\0", 1)[0]


def _octal(header: bytes, start: int, length: int, where: str) -> int:
    raw = _field(header, start, length).strip()
    try:
        return int(raw or b"0", 8)
    except ValueError:
        raise TarFormatError(f"{where}: corrupt tar header (size field {raw!r})") from None


def _read(fh: BinaryIO, size: int, where: str) -> bytes:
    data = fh.read(size)
    if len(data) != size:
        raise TarFormatError(f"{where}: the tar ends early ({len(data)} of {size} bytes)")
    return data


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").split("\n"):
        _, _, kv = record.partition(" ")
        if kv.startswith("path="):
            return kv[5:]
    return None


def iter_members(fh: BinaryIO, where: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in the tar stream `fh`."""
    long_name: str | None = None
    while True:
        header = fh.read(BLOCK)
        if not header or header == b"\0" * BLOCK:
            return
        if len(header) < BLOCK:
            raise TarFormatError(f"{where}: the tar ends early (a {len(header)}-byte header)")
        size = _octal(header, 124, 12, where)
        kind = header[156:157]
        data = _read(fh, size, where)
        _read(fh, (-size) % BLOCK, where)
        if kind in (b"x", b"g"):  # pax extended header: may carry the next member's path
            long_name = _pax_path(data) or long_name
            continue
        if kind == b"L":  # GNU long name
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind not in (b"0", b"\0"):
            long_name = None
            continue
        name = long_name or _name(header)
        long_name = None
        yield name, data


def _name(header: bytes) -> str:
    name = _field(header, 0, 100).decode("utf-8", "replace")
    prefix = _field(header, 345, 155).decode("utf-8", "replace")
    return f"{prefix}/{name}" if prefix else name


def iter_samples(fh: BinaryIO, url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard: consecutive members with the same key, as {__key__, __url__, ext: bytes}."""
    current: dict[str, Any] | None = None
    for name, data in iter_members(fh, url):
        match = _KEY.match(name)
        if match is None:
            continue
        key, ext = match.groups()
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key, "__url__": url}
        if ext in current:
            raise TarFormatError(f"{url}: sample {key} has two members named .{ext}")
        current[ext] = data
    if current is not None:
        yield current


def _size_of(fh: BinaryIO) -> int:
    size = getattr(fh, "size", None)  # fsspec files know their size
    return int(size) if size is not None else os.fstat(fh.fileno()).st_size


def scan_samples(fh: BinaryIO, url: str) -> tuple[list[tuple[str, int, int]], str | None]:
    """(key, start, end) byte range of each complete sample, reading only the headers (the data is
    seeked over), and why the tar stops early, if it does (None: it ends cleanly). A sample's range
    runs from its first member's header (or the pax / long-name record before it) to the end of its
    last member's padding."""
    total, found = _size_of(fh), []
    long_name, record_start = None, None
    fh.seek(0)
    while True:
        start = fh.tell()
        header = fh.read(BLOCK)
        if not header or header == b"\0" * BLOCK:
            return found, None
        if len(header) < BLOCK:
            return found, f"the tar ends early (a {len(header)}-byte header at byte {start})"
        size, kind = _octal(header, 124, 12, url), header[156:157]
        end = start + BLOCK + size + (-size) % BLOCK
        if end > total:
            return found, f"the tar ends early ({total} bytes, a member at byte {start} needs {end})"
        record_start = start if record_start is None else record_start
        if kind in (b"x", b"g", b"L"):
            data = _read(fh, size, url)
            fh.seek(end)
            long_name = (_pax_path(data) or long_name) if kind != b"L" else data.rstrip(b"\0").decode()
            continue
        fh.seek(end)
        name, begin = long_name or _name(header), record_start
        long_name, record_start = None, None
        match = _KEY.match(name) if kind in (b"0", b"\0") else None
        if match is None:
            continue
        key = match.group(1)
        if found and found[-1][0] == key:
            found[-1] = (key, found[-1][1], end)
        else:
            found.append((key, begin, end))


def read_sample(fh: BinaryIO, url: str, start: int, end: int) -> dict[str, Any]:
    """The sample in bytes [start, end) of a shard (a range from `scan_samples`): one read per
    member straight from the file, as `iter_samples` does."""
    fh.seek(start)
    sample: dict[str, Any] = {"__url__": url}
    for name, data in iter_members(fh, url):
        match = _KEY.match(name)
        if match is not None:
            key, ext = match.groups()
            if sample.setdefault("__key__", key) != key:
                raise TarFormatError(f"{url}: bytes {start}..{end} hold more than sample {sample['__key__']}")
            sample[ext] = data
        if fh.tell() >= end:
            break
    if "__key__" not in sample:
        raise TarFormatError(f"{url}: bytes {start}..{end} hold no sample")
    return sample


def open_shard(url: str) -> BinaryIO:
    """A local file with a large buffer, or an fsspec file for a URL."""
    if "://" in url:
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb", buffering=1 << 20)  # noqa: SIM115 - the caller closes it


def open_shard_random(url: str) -> BinaryIO:
    """A shard for reading samples by range: a 64 KiB buffer locally (a small sample's headers and
    members come in one read; a large member is read straight into its bytes)."""
    if "://" in url:
        return open_shard(url)
    return open(url, "rb", buffering=1 << 16)  # noqa: SIM115 - the caller closes it
