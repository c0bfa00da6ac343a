"""What an artifact is made of, file by file: the only files and folders `--overwrite` may delete.

A top-level name is not enough: a user's notes in `STORE/latents/`, a folder `STORE/targets/mine/`
or `SHARDS/latents-only/mine.txt` sit inside folders the tool wrote, and deleting those folders
whole would delete them too. So each kind lists the relative paths it writes (regular
expressions; a store's encoders come from its own metadata), and a folder holding anything else
is refused by `outputs.clear_artifact`, naming what it found.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import constants as C
from .layout import encoder_names

_CHUNK_KEYS = r"c(?:/\d+)+"  # zarr v3 default chunk keys: c/0/1/...


@dataclass(frozen=True)
class Manifest:
    """Full-match patterns of the relative paths of an artifact's own files and folders."""

    files: tuple[str, ...]
    dirs: tuple[str, ...]

    def has_file(self, rel: str) -> bool:
        return any(re.fullmatch(p, rel) for p in self.files)

    def has_dir(self, rel: str) -> bool:
        return any(re.fullmatch(p, rel) for p in self.dirs)


def _array(path: str) -> tuple[list[str], list[str]]:
    return [rf"{path}/zarr\.json", rf"{path}/{_CHUNK_KEYS}"], [path, rf"{path}/c(?:/\d+)*"]


def _group(path: str) -> tuple[list[str], list[str]]:
    return [rf"{path}/zarr\.json"], [path]


def _store_encoders(root: Path) -> str:
    """A pattern of the store's encoder names, from its own root metadata (any name if unreadable)."""
    try:
        names = encoder_names(json.loads((root / "zarr.json").read_text())["attributes"])
        return "(?:" + "|".join(re.escape(name) for name in names) + ")"
    except (OSError, ValueError, KeyError, TypeError):
        return r"[^/]+"


def store_manifest(root: Path) -> Manifest:
    enc = _store_encoders(root)
    files = [r"zarr\.json", re.escape(C.REPORT_FILE), r"extract_config\.yaml(?:\.tmp)?"]
    dirs: list[str] = []
    parts = [_array(re.escape(name)) for name in (*C.STORE_ARRAYS, C.CLIP_CRC)]
    parts += [_group(C.TARGETS_GROUP), _group(f"{C.TARGETS_GROUP}/{enc}")]
    parts += [_array(f"{C.TARGETS_GROUP}/{enc}/(?:{C.TARGET_VALUES}|{C.TARGET_SCALES}|{C.TOKEN_NORMS})")]
    parts += [_group(C.PCA_GROUP), _group(f"{C.PCA_GROUP}/{enc}")]
    parts += [_array(f"{C.PCA_GROUP}/{enc}/(?:{C.PCA_MEAN}|{C.PCA_COMPONENTS})")]
    text = (C.TEXT_EMBEDS, C.TEXT_MASK, C.TEXT_EMPTY_EMBEDS, C.TEXT_EMPTY_MASK)
    parts += [_group(C.TEXT_GROUP)] + [_array(re.escape(name)) for name in text]
    for f, d in parts:
        files += f
        dirs += d
    return Manifest(tuple(files), tuple(dirs))


def shards_manifest(root: Path) -> Manifest:
    lean = re.escape(C.LATENTS_ONLY_DIR)
    shard, index = r"shard-\d{6,}\.tar", re.escape(C.SHARD_INDEX)
    files = (
        shard,
        index,
        r"pca-[^/]+\.npz",
        r"pack_config\.yaml(?:\.tmp)?",
        f"{lean}/{shard}",
        f"{lean}/{index}",
        re.escape(C.TEXT_EMPTY_FILE),
        f"{lean}/{re.escape(C.TEXT_EMPTY_FILE)}",
    )
    return Manifest(files, (lean,))


MANIFESTS = {"store": store_manifest, "shards": shards_manifest}


def classify(root: Path, kind: str, keep: tuple[str, ...]) -> tuple[list[Path], list[Path], list[str]]:
    """(our files, our folders deepest first, foreign entries as relative paths) under `root`;
    top-level names matching `keep` (marker, lock, readers) are neither deleted nor foreign."""
    manifest = MANIFESTS[kind](root)
    files: list[Path] = []
    dirs: list[Path] = []
    foreign: list[str] = []
    for current, subdirs, names in os.walk(root):
        base = Path(current)
        rel_base = base.relative_to(root).as_posix()
        for name in sorted(subdirs):
            rel = name if rel_base == "." else f"{rel_base}/{name}"
            path = base / name
            if rel_base == "." and any(re.fullmatch(p, name) for p in keep):
                subdirs.remove(name)
                continue
            if path.is_symlink() or not manifest.has_dir(rel):
                foreign.append(rel + "/")
                subdirs.remove(name)  # not ours: never looked into, never deleted
            else:
                dirs.append(path)
        for name in sorted(names):
            rel = name if rel_base == "." else f"{rel_base}/{name}"
            if rel_base == "." and any(re.fullmatch(p, name) for p in keep):
                continue
            if manifest.has_file(rel):
                files.append(base / name)
            else:
                foreign.append(rel)
    dirs.sort(key=lambda p: len(p.parts), reverse=True)
    return files, dirs, sorted(foreign)
