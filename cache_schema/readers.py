"""Readers of a shard set: a training holds the shards it reads, the way writers hold their output.

`pipeline pack --overwrite` on a shard set a training is reading would leave that training with
the old index and new tars. So `train` leaves a reader file in `SHARDS/.align4gen.readers/`
(host, pid, process start, command, run, start time; heartbeat as the writer lock) for as long as
it reads, and `pack --overwrite` refuses while a live reader is there, naming it. A reader file
whose process is gone, or whose heartbeat stopped (another host), is stale and ignored. A shard
set the trainer cannot write to (read-only, object storage) is read without a reader file; the
trainer's own check of index.json (`index_digest`) still stops it if the shards change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import constants as C
from .outputs import (
    LOCK_HEARTBEAT_S,
    READERS_DIR,
    LockInfo,
    OutputError,
    _process_start,
    is_stale,
    read_lock_file,
)


def index_summary(shards: str | Path) -> dict[str, Any]:
    """What a reader records of a shard set and later compares: the sha256 of index.json, and the
    fields a change is described by (fingerprint, counts, order, a digest of the shards' sha256)."""
    from .layout import ShardLayout
    from .validate import read_bytes

    path = f"{str(shards).rstrip('/')}/{C.SHARD_INDEX}"
    raw = read_bytes(path)
    index = ShardLayout.from_index(json.loads(raw), path)
    shas = "".join(s.sha256 for s in index.shards)
    return {
        "sha256": hashlib.sha256(raw).hexdigest(),
        "fingerprint": index.fingerprint,
        "num_samples": index.num_samples,
        "order": index.order,
        "shards": hashlib.sha256(shas.encode()).hexdigest(),
    }


@dataclass
class ShardReader:
    """A reader file in a local shard folder; use as a context manager (or acquire/release)."""

    folder: str
    command: str
    run: str = ""
    note: str = ""
    _path: Path | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def acquire(self) -> ShardReader:
        if "://" in self.folder:
            self.note = "object storage: no reader file"
            return self
        payload = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "job": f"pid:{os.getpid()}",
            "command": f"{self.command} (run {self.run})" if self.run else self.command,
            "process_start": _process_start(os.getpid()),
        }
        path = Path(self.folder) / READERS_DIR / f"{socket.gethostname()}-{os.getpid()}.json"
        try:
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(payload))
            os.replace(tmp, path)
        except OSError as exc:  # a read-only shard set is still readable
            self.note = f"could not leave a reader file in {path.parent} ({exc.strerror})"
            return self
        self._path = path
        threading.Thread(target=self._beat, name="align4gen-reader-heartbeat", daemon=True).start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self._path)

    def release(self) -> None:
        self._stop.set()
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
            with contextlib.suppress(OSError):
                self._path.parent.rmdir()  # only when no other reader is left
            self._path = None

    def __enter__(self) -> ShardReader:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def live_readers(folder: str | Path) -> list[LockInfo]:
    """The readers of a local shard folder whose process is alive (stale files are ignored)."""
    root = Path(folder) / READERS_DIR
    if "://" in str(folder) or not root.is_dir():
        return []
    alive = []
    for path in sorted(root.glob("*.json")):
        info = read_lock_file(path)
        if info is not None and not is_stale(info, path):
            alive.append(info)
    return alive


def refuse_if_read(folder: str | Path, action: str) -> None:
    """Refuse `action` (e.g. "pack --overwrite") on a shard folder a live training is reading."""
    readers = live_readers(folder)
    if readers:
        who = "; ".join(r.describe() for r in readers)
        raise OutputError(
            f"{folder} is being read by {who}; {action} would change the shards under it. Stop that "
            f"training first, or write the new shards into another --out (if that process is gone, "
            f"delete {Path(folder) / READERS_DIR})"
        )


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two `index_summary`s, in a few words (for a warning)."""
    parts = [f"{key} {old.get(key)!s:.16} -> {new.get(key)!s:.16}" for key in ("fingerprint", "num_samples")
             if old.get(key) != new.get(key)]  # fmt: skip
    if old.get("shards") != new.get("shards"):
        parts.append("the shards' contents (sha256)")
    if old.get("order") != new.get("order"):
        parts.append(f"order {old.get('order')} -> {new.get('order')}")
    return ", ".join(parts) or "index.json"
