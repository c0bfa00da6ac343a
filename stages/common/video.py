"""Video datasets: find videos, plan clips, decode and resize them.

Three source layouts are recognised (DESIGN.md section 3):

- ``classes``: a folder of class subfolders holding video files (UCF-101). Labels are the
  index of the class folder in sorted order.
- ``frames``: a folder of frame folders (SkyTimelapse), possibly nested one level
  (``root/video_x/clip_y/*.jpg``). Every leaf folder of images is one unlabelled video; its
  images are read in natural order (``frame_2`` before ``frame_10``).
- ``csv`` / ``jsonl``: a manifest, see below.
  A folder of video files with no class subfolders is accepted too (``files``, unlabelled).

Manifests have two columns (CSV header / JSONL keys): ``path`` (a video file or a frame folder;
relative paths are relative to the manifest's folder) and optional ``label``. Labels are either
all class names (classes = the sorted distinct names) or all integers >= 0 (classes ``"0"`` ..
``str(max_label)``); mixing both is an error. A row with an empty label is unlabelled. An optional
``caption`` column holds each video's text prompt (`extract --base` encodes it; a video listed twice
keeps its first line's caption). A video
listed twice (``./vids/x`` and ``vids/x`` are the same file) is used once, with a warning; listed
under two labels it is refused, naming both lines::

    path,label
    ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi,ApplyEyeMakeup
    /data/sky/clip_0001,

For UCF-101's official splits (``trainlist01.txt`` lines ``Class/v_Class_g08_c01.avi 1`` with
1-based ids from ``classInd.txt``; ``testlist01.txt`` lines without ids), write a manifest with
:func:`manifest_from_ucf_split`.

Bad videos never stop a run: planning skips and reports them, and :class:`ClipDataset`
returns decode errors instead of raising, so DataLoader workers keep going.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from stages.common.progress import tqdm

log = logging.getLogger(__name__)

VIDEO_EXTS = (".avi", ".mp4", ".mkv", ".mov", ".webm")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


PLACEMENTS = ("even", "random")


_CLIP_SIZE = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?$")


def parse_clip_size(value: object, key: str = "size") -> tuple[int, int]:
    """A clip size -> (height, width) px: an int or "SIDE" is square, "HxW" (e.g. "480x832") is
    height x width. The one parser of clip sizes (CLI, config files, ClipSpec)."""
    bad = ValueError(
        f"{key}: {str(value)!r} is not a clip size; give SIDE or HEIGHTxWIDTH px, e.g. 256 or 480x832"
    )
    if isinstance(value, bool):
        raise bad
    if isinstance(value, int):
        hw = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        hw = (int(value[0]), int(value[1]))
    else:
        match = _CLIP_SIZE.match(str(value))
        if not match:
            raise bad
        h = int(match.group(1))
        hw = (h, int(match.group(2)) if match.group(2) else h)
    for axis, n in zip(("height", "width"), hw, strict=True):
        if n < 1:
            raise ValueError(f"{key}: the {axis} must be a positive number of pixels, got {n}")
    return hw


def clip_size_value(hw: tuple[int, int]) -> int | list[int]:
    """How a clip size is recorded (store spec, run config): an int when square (as before
    non-square clips existed, so old fingerprints hold), else [height, width]."""
    return hw[0] if hw[0] == hw[1] else [hw[0], hw[1]]


@dataclass
class ClipSpec:
    """How clips are cut: ``frames`` frames ``stride`` apart, resized (aspect kept) to cover
    ``size`` then center-cropped to it; ``size`` is a side (square) or (height, width), see
    `parse_clip_size`; up to ``clips_per_video`` clips per video.

    ``placement="even"`` spreads the clips evenly (the middle one when there is one);
    ``"random"`` draws distinct starts from a generator seeded by ``seed`` and the video's
    identity, so plans are reproducible and do not depend on worker count. ``hflip`` adds a
    horizontally mirrored copy of every clip (more variety for small datasets).
    """

    frames: int = 16
    stride: int = 3
    clips_per_video: int = 1
    size: int | tuple[int, int] = 256
    placement: str = "even"
    seed: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        for name in ("frames", "stride", "clips_per_video"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ClipSpec.{name} must be a positive integer, got {value!r}")
        parse_clip_size(self.size, "ClipSpec.size")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"ClipSpec.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"ClipSpec.seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"ClipSpec.hflip must be a bool, got {self.hflip!r}")

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of a clip's frames in pixels."""
        return parse_clip_size(self.size, "ClipSpec.size")

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
    caption: str | None = None  # a manifest's `caption` column (None: missing or empty)


@dataclass
class VideoSource:
    """The videos of a dataset, in a fixed order that clip references index into."""

    root: str
    entries: list[VideoEntry]
    class_names: list[str] | None
    layout: str

    def __len__(self) -> int:
        return len(self.entries)

    def relative_path(self, entry: VideoEntry) -> str:
        """The entry's path relative to the source (posix), or its full path when outside it."""
        root = Path(self.root)
        base = root.parent if root.is_file() else root
        try:
            return Path(entry.path).relative_to(base).as_posix()
        except ValueError:
            return Path(entry.path).as_posix()

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (layout, classes, relative paths and labels) for fingerprints."""
        files = [[self.relative_path(entry), entry.label] for entry in self.entries]
        return {"layout": self.layout, "class_names": self.class_names, "files": files}

    @property
    def has_captions(self) -> bool:
        return any(entry.caption is not None for entry in self.entries)


@dataclass
class Skipped:
    """A video left out of the plan, with the reason."""

    path: str
    reason: str


@dataclass
class ClipRef:
    """A clip: which video (index into ``VideoSource.entries``), its first frame, and whether
    it is read horizontally mirrored."""

    video_index: int
    start_frame: int
    flip: bool = False


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


def natural_key(name: str) -> tuple[tuple[Any, ...], str]:
    """Sort key comparing digit runs as numbers (``frame_2`` < ``frame_10``); the name itself
    breaks ties (``01`` vs ``1``), so any mix of names still sorts deterministically."""
    parts = re.split(r"(\d+)", name)
    # re.split with one group alternates text (even) and digits (odd): same types line up.
    return tuple(int(x) if i % 2 else x.casefold() for i, x in enumerate(parts)), name


def _images(folder: Path) -> list[Path]:
    """Frame images of a folder in natural order: frame writers rarely zero-pad their numbers."""
    images = [p for p in folder.iterdir() if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_EXTS]
    return sorted(images, key=lambda p: natural_key(p.name))


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


def _label_kind(lab: Any, where: str) -> tuple[str, int | str] | None:
    """Classify one raw manifest label: None (no label), ("int", value) or ("name", text)."""
    if lab is None or (isinstance(lab, str) and not lab.strip()):
        return None
    if isinstance(lab, bool) or not isinstance(lab, (int, str)):
        raise ValueError(f"{where}: label must be an integer or a class name, got {lab!r}")
    text = str(lab).strip()
    if isinstance(lab, int) or re.fullmatch(r"[+-]?\d+", text):
        value = int(text)
        if value < 0:
            raise ValueError(f"{where}: integer labels must be >= 0, got {value}")
        return "int", value
    return "name", text


def _caption(raw: Any, where: str) -> str | None:
    """A manifest's caption: text, or None when missing or blank."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if not isinstance(raw, str):
        raise ValueError(f"{where}: caption must be text, got {raw!r}")
    return raw.strip()


def _manifest_source(
    manifest: Path, rows: list[tuple[str, Any, str]], layout: str, captions: list[Any] | None = None
) -> VideoSource:
    """Turn (path, raw label, where) rows (and their raw captions) into a source. Integer labels name classes
    "0".."max" (so the store stays labelled); class names are indexed in sorted order."""
    if not rows:
        raise ValueError(f"manifest {manifest} lists no videos")
    base = manifest.resolve().parent
    kinds = [_label_kind(lab, where) for _, lab, where in rows]
    first = next((i for i, k in enumerate(kinds) if k is not None), None)
    class_names: list[str] | None = None
    if first is not None:
        first_kind = kinds[first][0]
        for k, (_, lab, where) in zip(kinds, rows, strict=True):
            if k is not None and k[0] != first_kind:
                raise ValueError(
                    f"{where}: label {lab!r} mixes {k[0]} labels with {first_kind} labels "
                    f"(first at {rows[first][2]}: {rows[first][1]!r}); use all integers or all class names"
                )
        values = [k[1] for k in kinds if k is not None]
        if first_kind == "int":
            class_names = [str(i) for i in range(max(int(v) for v in values) + 1)]
        else:
            class_names = sorted({str(v) for v in values})
    index = {name: i for i, name in enumerate(class_names or [])}
    entries = []
    first_row: dict[str, tuple[str, Any]] = {}  # resolved path -> (where, raw label) of its first line
    repeats = []
    captions = captions if captions is not None else [None] * len(rows)
    for k, (raw_path, lab, where), raw_caption in zip(kinds, rows, captions, strict=True):
        path, kind = _entry_for(base, raw_path, where)
        label = None if k is None else (int(k[1]) if k[0] == "int" else index[str(k[1])])
        if path in first_row:
            repeats.append(_repeat(path, where, k, lab, first_row[path]))
            continue
        first_row[path] = (where, (k, lab))
        entries.append(VideoEntry(path, label, kind, _caption(raw_caption, where)))
    if repeats:
        log.warning(
            "manifest %s lists %d video(s) more than once; each is used once: %s",
            manifest,
            len(repeats),
            "; ".join(repeats[:5]) + (" ..." if len(repeats) > 5 else ""),
        )
    return VideoSource(str(manifest.resolve()), entries, class_names, layout)


def _repeat(path: str, where: str, kind: Any, lab: Any, first: tuple[str, Any]) -> str:
    """A repeated manifest line: a note when it says the same, a ValueError naming both lines when
    it gives the video another label (one clip would land in two classes)."""
    first_where, (first_kind, first_lab) = first
    if first_kind != kind:
        shown = [
            f"label {x!r}" if k is not None else "no label" for k, x in ((first_kind, first_lab), (kind, lab))
        ]
        raise ValueError(
            f"{where}: {path} is listed again with {shown[1]}, but {first_where} gives it {shown[0]}; "
            "a video cannot be in two classes: keep one of these lines"
        )
    return f"{where} repeats {first_where}"


def _from_csv(manifest: Path) -> VideoSource:
    with manifest.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in reader.fieldnames or []]
        if "path" not in fields:
            raise ValueError(f"manifest {manifest}: needs a header with a 'path' column (got {fields})")
        rows, captions = [], []
        for line_no, row in enumerate(reader, start=2):
            row = {(k or "").strip(): v for k, v in row.items()}
            rows.append((row.get("path") or "", row.get("label"), f"{manifest}:{line_no}"))
            captions.append(row.get("caption"))
    return _manifest_source(manifest, rows, "csv", captions)


def _from_jsonl(manifest: Path) -> VideoSource:
    rows, captions = [], []
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
            captions.append(obj.get("caption"))
    return _manifest_source(manifest, rows, "jsonl", captions)


def _read_class_ind(class_ind_file: Path) -> dict[int, str]:
    """classInd.txt: lines ``<1-based id> <ClassName>``."""
    classes: dict[int, str] = {}
    for line_no, line in enumerate(class_ind_file.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f"{class_ind_file}:{line_no}: expected '<id> <ClassName>', got {line!r}")
        classes[int(parts[0])] = parts[1]
    if not classes:
        raise ValueError(f"{class_ind_file} lists no classes")
    return classes


def manifest_from_ucf_split(
    split_file: str | Path, class_ind_file: str | Path, root: str | Path, out_csv: str | Path
) -> Path:
    """Write a CSV manifest (``path,label`` with class *names*) from a UCF-101 split list.

    ``split_file`` is ``trainlistNN.txt`` (``Class/v_Class_g08_c01.avi 1``, 1-based ids from
    ``classInd.txt``) or ``testlistNN.txt`` (no id: the class is the folder part). ``root`` is the
    folder holding the class folders; paths are written absolute. Format as published with
    the dataset (https://www.crcv.ucf.edu/data/UCF101.php, "The Train/Test Splits").
    """
    split_file, class_ind_file, out_csv = Path(split_file), Path(class_ind_file), Path(out_csv)
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"UCF-101 root folder not found: {root}")
    classes = _read_class_ind(class_ind_file)
    by_folder = {name.casefold(): name for name in classes.values()}
    rows: list[tuple[str, str]] = []
    for line_no, line in enumerate(split_file.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{split_file}:{line_no}"
        rel = parts[0].replace("\\", "/")
        folder = rel.split("/")[0] if "/" in rel else ""
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise ValueError(f"{where}: expected '<Class/video.avi> [class id]', got {line!r}")
        if len(parts) == 2:
            if int(parts[1]) not in classes:
                raise ValueError(f"{where}: class id {parts[1]} is not in {class_ind_file}")
            name = classes[int(parts[1])]
        elif folder.casefold() in by_folder:
            name = by_folder[folder.casefold()]
        else:
            raise ValueError(f"{where}: class folder {folder!r} of {rel!r} is not in {class_ind_file}")
        rows.append(((root / rel).as_posix(), name))
    if not rows:
        raise ValueError(f"{split_file} lists no videos")
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return out_csv


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


def clip_starts(num_frames: int, spec: ClipSpec, video_key: tuple[int, str] | None = None) -> list[int]:
    """Sorted distinct start frames of up to ``clips_per_video`` clips (fewer when the video
    has fewer possible starts).

    ``even``: the middle clip when one is asked for, otherwise evenly spaced from the first to
    the last possible start. ``random``: drawn uniformly without replacement from a generator
    seeded by ``spec.seed`` and ``video_key`` = (entry index, relative path), so a plan does not
    depend on the order or the process in which videos are probed.
    """
    last = num_frames - spec.span
    if last < 0:
        return []
    if spec.placement == "random":
        index, rel = video_key if video_key is not None else (0, "")
        rng = np.random.default_rng([spec.seed, index, zlib.crc32(rel.encode("utf-8"))])
        k = min(spec.clips_per_video, last + 1)
        return sorted(int(x) for x in rng.choice(last + 1, size=k, replace=False))
    if spec.clips_per_video == 1:
        return [last // 2]
    starts = np.round(np.linspace(0, last, spec.clips_per_video)).astype(int)
    return sorted({int(s) for s in starts})


def plan_clips(
    source: VideoSource, spec: ClipSpec, progress: bool = True
) -> tuple[list[ClipRef], list[Skipped], list[int]]:
    """Probe every video and cut clips. Returns (clips, skipped videos, frame count per entry;
    0 for unreadable ones). Unreadable or too-short videos are skipped, never fatal. With
    ``spec.hflip`` every clip comes twice, unflipped then flipped."""
    clips: list[ClipRef] = []
    skipped: list[Skipped] = []
    lengths: list[int] = []
    flips = (False, True) if spec.hflip else (False,)
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
        starts = clip_starts(n, spec, video_key=(i, source.relative_path(entry)))
        if not starts:
            skipped.append(Skipped(entry.path, f"too short: {n} frames < {spec.span} needed"))
            continue
        clips.extend(ClipRef(i, s, f) for s in starts for f in flips)
    return clips, skipped, lengths


# --------------------------------------------------------------------------- decoding


def resize_crop(frames: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize [T, H, W, 3] uint8 frames, aspect kept, until they cover ``size`` (a side, or
    (height, width)) (antialiased bilinear), then center-crop to it. Returns uint8 [T, h, w, 3]."""
    out_h, out_w = parse_clip_size(size)
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames of shape [T, H, W, 3], got {tuple(x.shape)}")
    _, h, w, _ = x.shape
    scale = max(out_h / h, out_w / w)
    new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
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
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    x = x[:, :, top : top + out_h, left : left + out_w]
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


def read_clip(
    entry: VideoEntry, start: int, spec: ClipSpec, num_threads: int = 0, flip: bool = False
) -> np.ndarray:
    """Decode one clip as uint8 RGB [T, height, width, 3] (grayscale comes out as 3 equal channels),
    mirrored left-right after resize and crop when ``flip``.

    Raises :class:`VideoDecodeError` when the video or one of the clip's frames cannot be read.
    """
    frames = _decode_clip(entry, start, spec, num_threads)
    return np.ascontiguousarray(frames[:, :, ::-1]) if flip else frames


def _decode_clip(entry: VideoEntry, start: int, spec: ClipSpec, num_threads: int) -> np.ndarray:
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
    batch = _decode_file(reader, entry.path, indices)
    if batch.ndim == 3:
        batch = batch[..., None]
    if batch.shape[-1] == 1:
        batch = np.repeat(batch, 3, axis=-1)
    return resize_crop(batch, spec.size).numpy()


def _decode_file(reader: Any, path: str, indices: list[int]) -> np.ndarray:
    """decord's frames, or PyAV's when decord fails or its frame shape disagrees with the stream's
    (decord mis-sizes some valid H.264 streams, e.g. 16 px wide and 1024 px tall)."""
    try:
        batch, failure = reader.get_batch(indices).asnumpy(), None
    except Exception as exc:
        batch, failure = None, f"decode failed: {_decord_reason(exc)}"
    shape = stream_shape(path)
    if batch is not None and (shape is None or batch.shape[1:3] == shape):
        return batch
    try:
        return _pyav_frames(path, indices)
    except Exception as exc:
        reason = failure or f"decord gives frames of {batch.shape[1:3]}, the stream is {shape}"
        raise VideoDecodeError(path, f"{reason}; PyAV failed too: {str(exc)[:120]}") from None


@functools.lru_cache(maxsize=4096)
def stream_shape(path: str) -> tuple[int, int] | None:
    """(height, width) of a file's first video stream from its header (PyAV), None if unknown."""
    import av

    try:
        with av.open(path) as container:
            ctx = container.streams.video[0].codec_context
            return (int(ctx.height), int(ctx.width)) if ctx.height and ctx.width else None
    except Exception:
        return None


def _pyav_frames(path: str, indices: list[int]) -> np.ndarray:
    """Frames `indices` (presentation order, as decord counts them) decoded with PyAV."""
    import av

    wanted, frames = set(indices), {}
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
            if i >= indices[-1]:
                break
    missing = [i for i in indices if i not in frames]
    if missing:
        raise ValueError(f"the stream ends before frame {missing[0]}")
    return np.stack([frames[i] for i in indices])


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
            "flip": ref.flip,
            "label": entry.label,
            "frames": None,
            "error": None,
        }
        try:
            frames = read_clip(entry, ref.start_frame, self.spec, self.num_threads, flip=ref.flip)
            item["frames"] = torch.from_numpy(frames)
        except VideoDecodeError as exc:
            item["error"] = str(exc)
        return item


def collate_clips(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch dataset items, keeping failures visible.

    Returns ``index``/``video_index``/``start_frame``/``flip``/``label``/``error`` as lists over all
    items, ``ok`` (bool per item), and ``frames``: uint8 [B_ok, T, H, W, 3] stacked from the
    items that decoded (``None`` if none did), in the order of ``ok_index``.
    """
    ok = [it["frames"] is not None for it in items]
    good = [it for it in items if it["frames"] is not None]
    return {
        "index": [it["index"] for it in items],
        "video_index": [it["video_index"] for it in items],
        "start_frame": [it["start_frame"] for it in items],
        "flip": [it.get("flip", False) for it in items],
        "label": [it["label"] for it in items],
        "error": [it["error"] for it in items],
        "ok": ok,
        "ok_index": [it["index"] for it in good],
        "frames": torch.stack([it["frames"] for it in good]) if good else None,
    }
