"""Checksums of a training checkpoint's files, written before `latest` names the checkpoint.

`checkpoints/step-XXXXXXX/checksums.json` records the size and sha256 of every other file of
the step folder. Readers (`train --resume`, `sample`) verify the files they load, so a
truncated or bit-flipped weight file is named before it is read, instead of surfacing as a
SafetensorError or as non-finite samples. A checkpoint written before checksums existed has
no manifest and still loads (unverified).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .validate import CacheError

MANIFEST = "checksums.json"
_CHUNK = 1 << 22


class CheckpointError(CacheError):
    """A checkpoint file that is missing, truncated or fails its checksum; names the file."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> dict[str, Any]:
    """Hash every file of a filled checkpoint folder into its manifest (atomically)."""
    files = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in _files(folder)
    }
    manifest = {"algorithm": "sha256", "files": files}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MANIFEST)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest, None for a checkpoint that predates checksums; CheckpointError if unreadable."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError):
        raise CheckpointError(f"{path} is unreadable: the checkpoint cannot be verified") from None
    return manifest


def verify_checkpoint(folder: str | Path, within: str = "") -> bool:
    """Check the recorded files (those under `within`, e.g. "ema/", or all) against the manifest.
    False when the checkpoint has no manifest (written before checksums); CheckpointError naming
    the first file that is missing, has another size or fails its sha256."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    for name, entry in sorted(manifest["files"].items()):
        if within and not name.startswith(within):
            continue
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{path} is damaged: {size} bytes, {entry['bytes']} recorded in {MANIFEST} (truncated?)"
            )
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            raise CheckpointError(
                f"{path} is damaged: it fails its checksum (sha256 {digest[:12]}, recorded {entry['sha256'][:12]})"
            )
    return True
