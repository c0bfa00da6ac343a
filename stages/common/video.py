"""Video datasets: find videos, plan clips, decode and resize them.

Three source layouts are recognised (DESIGN.md section 3):

- ``classes``: a folder of class subfolders holding video files (UCF-101). Labels are the
  index of the class folder in sorted order.
- ``frames``: a folder of frame folders (SkyTimelapse), possibly nested one level
  (``root/video_x/clip_y/*.jpg``). Every leaf folder of images is one unlabelled video.
- ``csv`` / ``jsonl``: a manifest with ``path`` and optional ``label`` (int or class name).
  A folder of video files with no class subfolders is accepted too (``files``, unlabelled).

Bad videos never stop a run: planning skips and reports them, and :class:`ClipDataset`
returns decode errors instead of raising, so DataLoader workers keep going.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

VIDEO_EXTS = (".avi", ".mp4", ".mkv", ".mov", ".webm")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ClipSpec:
    """How clips are cut: ``frames`` frames ``stride`` apart, shorter side resized to ``size``
    then center-cropped to ``size`` x ``size``; up to ``clips_per_video`` clips per video."""

    frames: int = 16
    stride: int = 3
    clips_per_video: int = 1
    size: int = 256

    def __post_init__(self) -> None:
        for name in ("frames", "stride", "clips_per_video", "size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ClipSpec.{name} must be a positive integer, got {value!r}")

    @property
    def span(self) -> int:
        """Number of source frames one clip covers."""
        return (self.frames - 1) * self.stride + 1


@dataclass
class VideoEntry:
    """One video: a file (``kind="file"``) or a folder of frame images (``kind="frames"``)."""

    path: str
    label: int | None
    kind: str


@dataclass
class VideoSource:
    """The videos of a dataset, in a fixed order that clip references index into."""

    root: str
    entries: list[VideoEntry]
    class_names: list[str] | None
    layout: str

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (layout, classes, relative paths and labels) for fingerprints."""
        root = Path(self.root)
        base = root.parent if root.is_file() else root
        files = []
        for entry in self.entries:
            try:
                rel = Path(entry.path).relative_to(base).as_posix()
            except ValueError:
                rel = Path(entry.path).as_posix()
            files.append([rel, entry.label])
        return {"layout": self.layout, "class_names": self.class_names, "files": files}


@dataclass
class Skipped:
    """A video left out of the plan, with the reason."""

    path: str
    reason: str


@dataclass
class ClipRef:
    """A clip: which video (index into ``VideoSource.entries``) and its first frame."""

    video_index: int
    start_frame: int


class VideoDecodeError(RuntimeError):
    """A video (or frame folder) that cannot be read; carries the path and a short reason."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot decode {path}: {reason}")
        self.path = path
        self.reason = reason


# --------------------------------------------------------------------------- discovery


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _is_video(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in VIDEO_EXTS and _visible(p)


def _images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_EXTS
    )


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))


def discover(source: str | Path) -> VideoSource:
    """Find the videos of ``source`` (a folder or a .csv/.jsonl manifest), detecting the layout."""
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"video source not found: {root}")
    if root.is_file():
        suffix = root.suffix.lower()
        if suffix == ".csv":
            return _from_csv(root)
        if suffix == ".jsonl":
            return _from_jsonl(root)
        if suffix in VIDEO_EXTS:
            return VideoSource(str(root), [VideoEntry(str(root), None, "file")], None, "files")
        raise ValueError(
            f"unsupported video source file {root}: expected a folder, a .csv or .jsonl manifest, "
            f"or a video file ({', '.join(VIDEO_EXTS)})"
        )
    resolved = root.resolve()

    classes = []
    for sub in _subdirs(resolved):
        videos = sorted(p for p in sub.rglob("*") if _is_video(p))
        if videos:
            classes.append((sub.name, videos))
    if classes:
        names = [name for name, _ in classes]
        entries = [VideoEntry(str(v), label, "file") for label, (_, vids) in enumerate(classes) for v in vids]
        return VideoSource(str(resolved), entries, names, "classes")

    flat = sorted(p for p in resolved.iterdir() if _is_video(p))
    if flat:
        return VideoSource(str(resolved), [VideoEntry(str(p), None, "file") for p in flat], None, "files")

    leaves: list[Path] = []
    for sub in _subdirs(resolved):
        if _images(sub):
            leaves.append(sub)
        leaves.extend(inner for inner in _subdirs(sub) if _images(inner))
    if leaves:
        entries = [VideoEntry(str(p), None, "frames") for p in sorted(leaves)]
        return VideoSource(str(resolved), entries, None, "frames")

    raise ValueError(
        f"no videos found in {resolved}: expected class subfolders of video files "
        f"({', '.join(VIDEO_EXTS)}), folders of frame images ({', '.join(IMAGE_EXTS)}), "
        "or a .csv/.jsonl manifest"
    )


def _entry_for(base: Path, raw_path: str, where: str) -> tuple[str, str]:
    if not raw_path or not str(raw_path).strip():
        raise ValueError(f"{where}: empty 'path'")
    p = Path(str(raw_path).strip()).expanduser()
    if not p.is_absolute():
        p = base / p
    p = p.resolve()
    is_frames = p.is_dir() or (not p.exists() and p.suffix.lower() not in VIDEO_EXTS)
    return str(p), "frames" if is_frames else "file"


def _manifest_source(manifest: Path, rows: list[tuple[str, Any, str]], layout: str) -> VideoSource:
    """Turn (path, raw label, where) rows into a source; labels are ints or class names."""
    if not rows:
        raise ValueError(f"manifest {manifest} lists no videos")
    base = manifest.resolve().parent
    raw_labels = [lab for _, lab, _ in rows if lab is not None and str(lab).strip() != ""]
    as_int: list[int] | None = []
    for lab in raw_labels:
        if isinstance(lab, bool):
            as_int = None
            break
        if isinstance(lab, int) or (isinstance(lab, str) and re.fullmatch(r"[+-]?\d+", lab.strip())):
            as_int.append(int(lab))
        else:
            as_int = None
            break
    class_names: list[str] | None = None
    if as_int is None:
        class_names = sorted({str(lab).strip() for lab in raw_labels})
    elif any(v < 0 for v in as_int):
        raise ValueError(f"manifest {manifest}: integer labels must be >= 0")
    index = {name: i for i, name in enumerate(class_names or [])}
    entries = []
    for raw_path, lab, where in rows:
        path, kind = _entry_for(base, raw_path, where)
        label: int | None = None
        if lab is not None and str(lab).strip() != "":
            label = index[str(lab).strip()] if class_names is not None else int(lab)
        entries.append(VideoEntry(path, label, kind))
    return VideoSource(str(manifest.resolve()), entries, class_names, layout)


def _from_csv(manifest: Path) -> VideoSource:
    with manifest.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in reader.fieldnames or []]
        if "path" not in fields:
            raise ValueError(f"manifest {manifest}: needs a header with a 'path' column (got {fields})")
        rows = []
        for line_no, row in enumerate(reader, start=2):
            row = {(k or "").strip(): v for k, v in row.items()}
            rows.append((row.get("path") or "", row.get("label"), f"{manifest}:{line_no}"))
    return _manifest_source(manifest, rows, "csv")


def _from_jsonl(manifest: Path) -> VideoSource:
    rows = []
    with manifest.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{manifest}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or "path" not in obj:
                raise ValueError(f"{where}: each line must be an object with a 'path' key")
            rows.append((str(obj["path"]), obj.get("label"), where))
    return _manifest_source(manifest, rows, "jsonl")


# --------------------------------------------------------------------------- probing, planning


def _decord_reason(exc: BaseException) -> str:
    """decord errors carry C++ file/line prefixes; keep the readable part."""
    text = str(exc).strip().splitlines()
    text = [t for t in text if t.strip() and not t.startswith("Stack trace")] or [type(exc).__name__]
    msg = re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", text[0]).strip()
    return msg[:200] or type(exc).__name__


def _open_reader(path: str, num_threads: int = 0):
    import decord

    p = Path(path)
    if not p.exists():
        raise VideoDecodeError(path, "file not found")
    if p.stat().st_size == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
    except Exception as exc:  # decord raises DECORDError / RuntimeError for corrupt input
        raise VideoDecodeError(path, f"cannot open: {_decord_reason(exc)}") from None


def _frame_files(path: str) -> list[Path]:
    p = Path(path)
    if not p.is_dir():
        raise VideoDecodeError(path, "frame folder not found")
    return _images(p)


def probe_length(entry: VideoEntry) -> int:
    """Number of frames of a video; raises :class:`VideoDecodeError` when unreadable."""
    if entry.kind == "frames":
        files = _frame_files(entry.path)
        if not files:
            raise VideoDecodeError(entry.path, "no images in frame folder")
        return len(files)
    reader = _open_reader(entry.path, num_threads=1)
    n = len(reader)
    if n <= 0:
        raise VideoDecodeError(entry.path, "no decodable frames")
    return n


def clip_starts(num_frames: int, spec: ClipSpec) -> list[int]:
    """Start frames of up to ``clips_per_video`` clips: the middle clip when one is asked for,
    otherwise evenly spaced from the first to the last possible start (duplicates dropped)."""
    last = num_frames - spec.span
    if last < 0:
        return []
    if spec.clips_per_video == 1:
        return [last // 2]
    starts = np.round(np.linspace(0, last, spec.clips_per_video)).astype(int)
    return sorted({int(s) for s in starts})


def plan_clips(
    source: VideoSource, spec: ClipSpec, progress: bool = True
) -> tuple[list[ClipRef], list[Skipped], list[int]]:
    """Probe every video and cut clips. Returns (clips, skipped videos, frame count per entry;
    0 for unreadable ones). Unreadable or too-short videos are skipped, never fatal."""
    clips: list[ClipRef] = []
    skipped: list[Skipped] = []
    lengths: list[int] = []
    for i, entry in enumerate(
        tqdm(source.entries, desc="probing videos", unit="video", disable=not progress)
    ):
        try:
            n = probe_length(entry)
        except VideoDecodeError as exc:
            skipped.append(Skipped(entry.path, exc.reason))
            lengths.append(0)
            continue
        lengths.append(n)
        starts = clip_starts(n, spec)
        if not starts:
            skipped.append(Skipped(entry.path, f"too short: {n} frames < {spec.span} needed"))
            continue
        clips.extend(ClipRef(i, s) for s in starts)
    return clips, skipped, lengths


# --------------------------------------------------------------------------- decoding


def resize_crop(frames: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Resize [T, H, W, 3] uint8 frames so the shorter side is ``size`` (antialiased bilinear),
    then center-crop to ``size`` x ``size``. Returns uint8 [T, size, size, 3]."""
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames of shape [T, H, W, 3], got {tuple(x.shape)}")
    _, h, w, _ = x.shape
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = x.permute(0, 3, 1, 2)
    if (new_h, new_w) != (h, w):
        # A few frames at a time keeps the float copy small for high-resolution sources.
        chunks = [
            F.interpolate(
                c.float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
            )
            .round_()
            .clamp_(0, 255)
            .to(torch.uint8)
            for c in x.split(8)
        ]
        x = torch.cat(chunks)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    return x.permute(0, 2, 3, 1).contiguous()


def clip_indices(start: int, spec: ClipSpec) -> list[int]:
    return [start + j * spec.stride for j in range(spec.frames)]


def _read_frames_folder(entry: VideoEntry, indices: Sequence[int]) -> list[np.ndarray]:
    from PIL import Image

    files = _frame_files(entry.path)
    if indices[-1] >= len(files):
        raise VideoDecodeError(
            entry.path, f"clip needs frame {indices[-1]} but folder has {len(files)} images"
        )
    out = []
    for k in indices:
        try:
            with Image.open(files[k]) as img:
                out.append(np.asarray(img.convert("RGB")))
        except Exception as exc:
            raise VideoDecodeError(entry.path, f"cannot read image {files[k].name}: {exc}") from None
    return out


def read_clip(entry: VideoEntry, start: int, spec: ClipSpec, num_threads: int = 0) -> np.ndarray:
    """Decode one clip as uint8 RGB [T, size, size, 3] (grayscale comes out as 3 equal channels).

    Raises :class:`VideoDecodeError` when the video or one of the clip's frames cannot be read.
    """
    if start < 0:
        raise ValueError(f"start frame must be >= 0, got {start}")
    indices = clip_indices(start, spec)
    if entry.kind == "frames":
        frames = _read_frames_folder(entry, indices)
        if len({f.shape for f in frames}) > 1:
            return np.concatenate([resize_crop(f[None], spec.size).numpy() for f in frames])
        return resize_crop(np.stack(frames), spec.size).numpy()
    reader = _open_reader(entry.path, num_threads=num_threads)
    n = len(reader)
    if indices[-1] >= n:
        raise VideoDecodeError(entry.path, f"clip needs frame {indices[-1]} but video has {n} frames")
    try:
        batch = reader.get_batch(indices).asnumpy()
    except Exception as exc:
        raise VideoDecodeError(entry.path, f"decode failed: {_decord_reason(exc)}") from None
    if batch.ndim == 3:
        batch = batch[..., None]
    if batch.shape[-1] == 1:
        batch = np.repeat(batch, 3, axis=-1)
    return resize_crop(batch, spec.size).numpy()


# --------------------------------------------------------------------------- dataset


@dataclass
class ClipDataset(Dataset):
    """Clips of a source as a torch Dataset. Items are dicts; a failed decode gives
    ``frames=None`` and ``error`` text instead of an exception, so workers keep going."""

    source: VideoSource
    clip_refs: list[ClipRef]
    spec: ClipSpec
    num_threads: int = 1

    def __len__(self) -> int:
        return len(self.clip_refs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ref = self.clip_refs[i]
        entry = self.source.entries[ref.video_index]
        item: dict[str, Any] = {
            "index": i,
            "video_index": ref.video_index,
            "start_frame": ref.start_frame,
            "label": entry.label,
            "frames": None,
            "error": None,
        }
        try:
            item["frames"] = torch.from_numpy(read_clip(entry, ref.start_frame, self.spec, self.num_threads))
        except VideoDecodeError as exc:
            item["error"] = str(exc)
        return item


def collate_clips(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch dataset items, keeping failures visible.

    Returns ``index``/``video_index``/``start_frame``/``label``/``error`` as lists over all
    items, ``ok`` (bool per item), and ``frames``: uint8 [B_ok, T, H, W, 3] stacked from the
    items that decoded (``None`` if none did), in the order of ``ok_index``.
    """
    ok = [it["frames"] is not None for it in items]
    good = [it for it in items if it["frames"] is not None]
    return {
        "index": [it["index"] for it in items],
        "video_index": [it["video_index"] for it in items],
        "start_frame": [it["start_frame"] for it in items],
        "label": [it["label"] for it in items],
        "error": [it["error"] for it in items],
        "ok": ok,
        "ok_index": [it["index"] for it in good],
        "frames": torch.stack([it["frames"] for it in good]) if good else None,
    }
