"""Output folders: what each command may write, replace or refuse, and one writer at a time.

Every artifact align4gen writes (a feature store, a shard set, a training run, samples, ...)
is a folder that carries a marker file, `.align4gen.json`, naming its kind. The rules:

- an `--out` that does not exist, or is an empty folder, is created and marked;
- an `--out` holding our own artifact of the same kind is that artifact (resume, or replace
  with `--overwrite`); anything else (user files, another kind, a regular file) is refused,
  naming what was found;
- `--overwrite` deletes only the entries an artifact of that kind is made of, and refuses a
  folder that also holds anything else;
- an `--out` equal to, inside, or containing one of the command's inputs is refused;
- a writer holds `.align4gen.lock` (host, pid, process start time, job, start time) for as
  long as it writes; a second writer is refused at once, naming the holder. A lock whose
  process is gone (same host) or whose heartbeat stopped (another host) is stale and taken
  over. Ranks of one torchrun job share one lock (same job id).

On object storage (fsspec URLs) there is no atomic create-if-absent, so the lock is best
effort there (write, then read back); the README says so.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import constants as C
from .manifest import MANIFESTS, classify

MARKER = ".align4gen.json"
LOCK = ".align4gen.lock"
READERS_DIR = ".align4gen.readers"  # a shard set's live readers (cache_schema/readers.py)
LOCK_HEARTBEAT_S = 30.0
STALE_ENV = "ALIGN4GEN_LOCK_STALE_S"  # heartbeat age after which another host's lock is stale
DEFAULT_STALE_S = 600.0
# A lock file is written right after it is created; one still empty or torn after this long was
# left by a writer killed in between, and is stale.
UNREADABLE_GRACE_S = 5.0

# What each kind of artifact is made of: the only entries `--overwrite` may delete.
ARTIFACT_ENTRIES: dict[str, tuple[str, ...]] = {
    "store": (
        "zarr.json",
        *C.STORE_ARRAYS,
        C.CLIP_CRC,
        C.TARGETS_GROUP,
        C.PCA_GROUP,
        C.REPORT_FILE,
        "extract_config.yaml",
    ),
    "shards": ("shard-*.tar", C.SHARD_INDEX, C.pca_file("*"), C.LATENTS_ONLY_DIR, "pack_config.yaml"),
    "run": ("config.yaml", "log.jsonl", "checkpoints", "tensorboard", "wandb", "samples", "loss.png"),
    "samples": (
        "videos",
        "videos.npz",
        "latents.npz",
        "*.npz.partial",
        "grid.gif",
        "filmstrip.png",
        "config.yaml",
        "summary.json",
    ),
    "pipeline": ("model_index.json", "pipeline_videodit.py", "transformer", "vae", "scheduler", "README.md"),
    "synth": ("class_*", "synth.json"),
    "evaluation": ("metrics.json", "*.npz"),
    "analysis": ("iicr.json", "iicr.png", "spatial.json"),
    "demo": (
        "data",
        "cache.zarr",
        "shards",
        "runs",
        "detectors",
        "fvd-stats",
        "report.md",
        "report.html",
        "*.png",
        "*.gif",
        "*.json",
        "demo_config.yaml",
    ),
}
KIND_NAMES = {
    "store": "a feature store (pipeline extract)",
    "shards": "a shard set (pipeline pack)",
    "run": "a training run (pipeline train)",
    "samples": "generated samples (pipeline sample)",
    "pipeline": "a diffusers pipeline folder (pipeline export)",
    "synth": "a synthetic dataset (pipeline data synth)",
    "evaluation": "evaluation results (pipeline evaluate)",
    "analysis": "an encoder analysis (pipeline analyze)",
    "demo": "a demo folder (pipeline demo)",
}


class OutputError(ValueError):
    """An output path a command must not write to; the message says what was found and what to do."""


def _is_url(path: str) -> bool:
    return "://" in str(path)


def _listing(path: Path, limit: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
    return shown


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The marker of an align4gen artifact folder, or None."""
    marker = Path(path) / MARKER
    try:
        return json.loads(marker.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"kind": "unknown"}


def write_marker(path: str | Path, kind: str) -> None:
    """Mark `path` as an artifact of `kind` (before anything else is written into it)."""
    if kind not in ARTIFACT_ENTRIES:
        raise ValueError(f"unknown artifact kind {kind!r}")
    if _is_url(str(path)):
        import fsspec

        with fsspec.open(f"{str(path).rstrip('/')}/{MARKER}", "w") as fh:
            json.dump({"kind": kind, "tool": "align4gen"}, fh)
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    tmp = Path(path) / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"kind": kind, "tool": "align4gen"}) + "\n")  # no timestamp: same bytes per run
    os.replace(tmp, Path(path) / MARKER)


def _resolve(path: str | Path) -> str:
    return str(path).rstrip("/") if _is_url(str(path)) else os.path.realpath(os.path.expanduser(str(path)))


def check_not_overlapping(out: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output equal to, inside, or containing any input (flag name -> path)."""
    target = _resolve(out)
    for flag, value in inputs.items():
        if not value:
            continue
        source = _resolve(value)
        sep = "/" if _is_url(target) else os.sep
        if target == source:
            raise OutputError(f"--out {out} is the same path as {flag} {value}; choose another --out")
        if target.startswith(source.rstrip(sep) + sep):
            raise OutputError(f"--out {out} lies inside {flag} {value}; choose a folder outside it")
        if source.startswith(target.rstrip(sep) + sep):
            raise OutputError(
                f"--out {out} contains {flag} {value}; choose a folder that does not hold your data"
            )


_KEEP = tuple(re.escape(n) for n in (MARKER, LOCK, MARKER + ".tmp", READERS_DIR)) + (
    re.escape(LOCK + ".tmp") + ".*",
)


def _foreign_entries(path: Path, kind: str) -> list[str]:
    patterns = ARTIFACT_ENTRIES[kind] + (MARKER, LOCK, MARKER + ".tmp", LOCK + ".tmp*", READERS_DIR)
    return sorted(p.name for p in path.iterdir() if not any(fnmatch.fnmatch(p.name, pat) for pat in patterns))


def inspect_output(path: str | Path, kind: str) -> str:
    """'absent', 'empty' or 'ours' (our artifact of `kind`); OutputError for anything else."""
    if _is_url(str(path)):
        return _inspect_url(str(path), kind)
    p = Path(path).expanduser()
    if not p.exists():
        return "absent"
    if not p.is_dir():
        raise OutputError(f"--out {path} exists and is a file, not a folder; choose another --out")
    if not any(p.iterdir()):
        return "empty"
    marker = read_marker(p) or _legacy_marker(p)
    if marker is None:
        raise OutputError(
            f"--out {path} already holds files that align4gen did not write ({_listing(p)}); "
            f"it writes {KIND_NAMES[kind]} only into a new or empty folder. Choose another --out"
        )
    found = marker.get("kind")
    if found != kind:
        what = KIND_NAMES.get(found, f"an artifact of unknown kind {found!r}")
        raise OutputError(
            f"--out {path} holds {what}, not {KIND_NAMES[kind]}; choose another --out (nothing was changed)"
        )
    return "ours"


def _legacy_marker(path: Path) -> dict[str, Any] | None:
    """The kind of an artifact written before markers existed (schema v1), recognised by its
    own files: a zarr store with a schema_version, a shard index, a run with checkpoints."""
    try:
        if (path / "zarr.json").is_file():
            attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
            return {"kind": "store", "legacy": True} if "schema_version" in attrs else None
        if (path / C.SHARD_INDEX).is_file():
            index = json.loads((path / C.SHARD_INDEX).read_text())
            return {"kind": "shards", "legacy": True} if "schema_version" in index else None
    except (OSError, json.JSONDecodeError):
        return None
    if (path / "config.yaml").is_file() and (path / "checkpoints" / "latest").is_file():
        return {"kind": "run", "legacy": True}
    if (path / "synth.json").is_file():
        return {"kind": "synth", "legacy": True}
    return None


def _inspect_url(url: str, kind: str) -> str:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(root):
        return "absent"
    entries = fs.ls(root, detail=False)
    if not entries:
        return "empty"
    try:
        with fs.open(f"{root.rstrip('/')}/{MARKER}", "r") as fh:
            marker = json.load(fh)
    except FileNotFoundError:
        raise OutputError(
            f"--out {url} already holds objects align4gen did not write; choose another --out"
        ) from None
    if marker.get("kind") != kind:
        raise OutputError(
            f"--out {url} holds {KIND_NAMES.get(marker.get('kind'), 'something else')}, not {KIND_NAMES[kind]}"
        )
    return "ours"


def clear_artifact(path: str | Path, kind: str) -> None:
    """`--overwrite`: delete our artifact's own entries, refusing a folder that holds anything else."""
    if _is_url(str(path)):
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(path))
        for entry in fs.ls(root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name not in (MARKER, LOCK):
                fs.rm(entry, recursive=True)
        return
    p = Path(path)
    if kind in MANIFESTS:  # file by file: a user's file inside one of our folders is found too
        files, dirs, foreign = classify(p, kind, _KEEP)
    else:
        files, dirs, foreign = [], [], _foreign_entries(p, kind)
    if foreign:
        raise OutputError(
            f"--overwrite refused: {path} holds {KIND_NAMES[kind]} but also {', '.join(foreign[:5])}, which "
            "align4gen did not write; move those away or choose another --out (nothing was deleted)"
        )
    if kind in MANIFESTS:
        for file in files:
            file.unlink()
        for folder in dirs:  # deepest first; each is empty now
            folder.rmdir()
        return
    for entry in p.iterdir():
        if entry.name in (MARKER, LOCK):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def prepare_output(
    path: str | Path,
    kind: str,
    *,
    overwrite: bool = False,
    inputs: dict[str, str | Path | None] | None = None,
) -> str:
    """Check `path` for a command writing `kind`, create and mark it; returns what was there
    ('absent', 'empty' or 'ours'). With `overwrite`, an existing artifact of ours is emptied first."""
    check_not_overlapping(path, inputs or {})
    state = inspect_output(path, kind)
    if state == "ours" and overwrite:
        clear_artifact(path, kind)
    if _is_url(str(path)):
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(path))
        fs.makedirs(root, exist_ok=True)
    else:
        Path(path).expanduser().mkdir(parents=True, exist_ok=True)
    if state != "ours":
        write_marker(path, kind)
    return state


# --------------------------------------------------------------------------- the lock


def _process_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_after() -> float:
    return float(os.environ.get(STALE_ENV, DEFAULT_STALE_S))


@dataclass
class LockInfo:
    host: str
    pid: int
    started: float
    job: str
    command: str
    process_start: str | None = None
    path: str = ""
    unreadable: bool = False

    def describe(self) -> str:
        if self.unreadable:
            return f"an unreadable lock file {self.path} (empty or half-written)"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"`{self.command}` (pid {self.pid} on {self.host}, started {when})"


def read_lock(path: str | Path) -> LockInfo | None:
    return read_lock_file(Path(path) / LOCK)


def read_lock_file(lock: Path) -> LockInfo | None:
    """A lock (or reader) file's holder; None when there is none; `unreadable` when it is empty
    or torn (its writer was killed between creating and writing it)."""
    try:
        data = json.loads(lock.read_text())
        return LockInfo(
            **{k: data.get(k) for k in LockInfo.__dataclass_fields__ if k not in ("path", "unreadable")},
            path=str(lock),
        )
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError, AttributeError):
        return LockInfo("?", -1, 0.0, "?", "unknown", path=str(lock), unreadable=True)


def is_stale(info: LockInfo, lock_file: Path) -> bool:
    """Same host: the process is gone (or its pid was reused). Other host: no heartbeat lately.
    Unreadable: older than a short grace (a live writer fills its file at once)."""
    if info.unreadable:
        try:
            return time.time() - lock_file.stat().st_mtime > UNREADABLE_GRACE_S
        except FileNotFoundError:
            return True
    if info.host == socket.gethostname():
        if not _pid_alive(info.pid):
            return True
        return info.process_start is not None and _process_start(info.pid) != info.process_start
    try:
        age = time.time() - lock_file.stat().st_mtime
    except FileNotFoundError:
        return True
    return age > _stale_after()


def _busy(folder: str, holder: LockInfo, lock_file: Path) -> OutputError:
    if holder.unreadable:
        return OutputError(
            f"{folder} has an unreadable lock file {lock_file} (empty or half-written, under "
            f"{UNREADABLE_GRACE_S:.0f} s old): another writer may be starting. Retry in a few seconds"
        )
    return OutputError(
        f"{folder} is being written by {holder.describe()}; only one writer at a time. "
        f"Wait for it to finish or stop it (if that process is gone, delete {lock_file})"
    )


def refuse_if_locked(folder: str | Path, job: str) -> None:
    """Refuse at once (writing nothing) when another live writer holds `folder`'s lock."""
    lock_file = Path(folder) / LOCK
    holder = read_lock(folder)
    if holder is not None and holder.job != job and not is_stale(holder, lock_file):
        raise _busy(str(folder), holder, lock_file)


@dataclass
class OutputLock:
    """`.align4gen.lock` in an output folder; use as a context manager (or acquire/release)."""

    folder: str
    command: str
    job: str = field(default_factory=lambda: f"pid:{os.getpid()}")
    note: str = ""
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _held: bool = field(default=False, repr=False)

    @property
    def path(self) -> Path:
        return Path(self.folder) / LOCK

    def _payload(self) -> str:
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": time.time(),
                "job": self.job,
                "command": self.command,
                "process_start": _process_start(os.getpid()),
            }
        )

    def acquire(self) -> OutputLock:
        if _is_url(self.folder):
            return self._acquire_url()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(self.folder)
                if holder is None:
                    continue  # released between our open and read: try again
                if holder.job == self.job:
                    return self  # another rank of our own torchrun job holds it for us
                if is_stale(holder, self.path):
                    self.note = f"took over a stale lock of {holder.describe()}"
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                raise _busy(self.folder, holder, self.path) from None
            with os.fdopen(fd, "w") as fh:
                fh.write(self._payload())
            self._held = True
            self._start_heartbeat()
            return self
        raise OutputError(f"could not take the lock {self.path}: it keeps changing hands")

    def _acquire_url(self) -> OutputLock:
        import fsspec

        url = f"{self.folder.rstrip('/')}/{LOCK}"
        fs, root = fsspec.core.url_to_fs(url)
        if fs.exists(root):
            with fs.open(root, "r") as fh:
                holder = json.load(fh)
            if holder.get("job") != self.job:
                raise OutputError(
                    f"{self.folder} is locked by pid {holder.get('pid')} on {holder.get('host')}"
                )
            return self
        payload = self._payload()
        with fs.open(root, "w") as fh:
            fh.write(payload)
        with fs.open(root, "r") as fh:
            if fh.read() != payload:
                raise OutputError(f"{self.folder}: another writer took the lock at the same moment")
        self._held = True
        return self

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(LOCK_HEARTBEAT_S):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._thread = threading.Thread(target=beat, name="align4gen-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if not self._held:
            return
        self._held = False
        if _is_url(self.folder):
            import fsspec

            fs, root = fsspec.core.url_to_fs(f"{self.folder.rstrip('/')}/{LOCK}")
            with contextlib.suppress(FileNotFoundError):
                fs.rm(root)
            return
        holder = read_lock(self.folder)
        if holder is not None and holder.pid == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
