"""The built-in synthetic video dataset: real H.264 mp4 files in the class-subfolder layout.

Why: the demo and the tests need a dataset that exists on a fresh machine, decodes through the
same path as UCF-101, and has labels a model can learn. Each class is a motion pattern
(drift, rotation, orbit, pulse); each video has its own textured background and objects of
several shapes and colours. Everything is drawn with vectorised numpy from a per-video RNG,
so a seed fixes every pixel, and the output does not depend on how many videos are made.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.common.progress import tqdm

# Motion patterns; class k uses pattern k % len(MOTIONS), faster for each further round.
MOTIONS = (
    "drift_right",
    "drift_left",
    "drift_down",
    "drift_up",
    "rotate_cw",
    "rotate_ccw",
    "orbit",
    "pulse",
)
SHAPES = ("circle", "square", "triangle")
# "textured": smooth random field or stripes, with pixel noise (the default; hard for tiny models)
# "flat": a two-colour linear gradient, no noise (the demo: a CPU-minute model can learn it)
BACKGROUNDS = ("textured", "flat")
OBJECTS = (2, 3)  # objects per video, fewest and most (render_video's default)
_DRIFT = {"drift_right": (1, 0), "drift_left": (-1, 0), "drift_down": (0, 1), "drift_up": (0, -1)}


@dataclass
class SynthParams:
    videos: int = 24
    classes: int = 4
    frames: int = 24
    size: int = 64
    seed: int = 0
    fps: int = 8
    background: str = "textured"
    objects: tuple[int, int] = OBJECTS  # fewest and most objects per video
    object_scale: float = 1.0  # multiplies every object's radius

    def __post_init__(self) -> None:
        self.objects = (int(self.objects[0]), int(self.objects[1]))  # a list when read from synth.json


@dataclass
class SynthInfo:
    """What was written: the root folder, every video path with its label, and the classes."""

    root: str
    paths: list[str]
    labels: list[int]
    class_names: list[str]
    params: SynthParams


def class_names(classes: int) -> list[str]:
    """Folder names such as ``class_00_drift_right``; later rounds get a speed suffix."""
    names = []
    for k in range(classes):
        name = f"class_{k:02d}_{MOTIONS[k % len(MOTIONS)]}"
        if k >= len(MOTIONS):
            name += f"_x{_speed_factor(k):g}"
        names.append(name)
    return names


def _speed_factor(k: int) -> float:
    return 1.0 + 0.5 * (k // len(MOTIONS))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Noise (smooth random field) or stripes, float32 [size, size, 3] in [0, 255]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c0 = rng.uniform(20, 235, 3).astype(np.float32)
    c1 = rng.uniform(20, 235, 3).astype(np.float32)
    if rng.random() < 0.5:
        cells = int(rng.integers(3, 7))
        coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
        gy, gx = yy / (size - 1) * cells, xx / (size - 1) * cells
        y0, x0 = np.minimum(gy.astype(int), cells - 1), np.minimum(gx.astype(int), cells - 1)
        fy, fx = gy - y0, gx - x0
        t = (
            coarse[y0, x0] * (1 - fy) * (1 - fx)
            + coarse[y0 + 1, x0] * fy * (1 - fx)
            + coarse[y0, x0 + 1] * (1 - fy) * fx
            + coarse[y0 + 1, x0 + 1] * fy * fx
        )
        t = t + 0.15 * rng.standard_normal((size, size)).astype(np.float32)
    else:
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(8, 20) * size / 64
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period)
        t = 0.5 + 0.5 * np.sin(phase)
    t = np.clip(t, 0, 1)[..., None]
    return c0 * (1 - t) + c1 * t


def _flat_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear gradient between two random colours in a random direction, float32 [size, size, 3]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c0 = rng.uniform(20, 235, 3).astype(np.float32)
    c1 = rng.uniform(20, 235, 3).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = ((xx - (size - 1) / 2) * math.cos(angle) + (yy - (size - 1) / 2) * math.sin(angle)) / size
    t = np.clip(0.5 + ramp, 0, 1)[..., None]
    return c0 * (1 - t) + c1 * t


def _check_objects(background: str, objects: tuple[int, int], object_scale: float) -> None:
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    if len(objects) != 2 or not 1 <= objects[0] <= objects[1]:
        raise ValueError(f"objects must be (fewest, most) with 1 <= fewest <= most, got {tuple(objects)}")
    if not object_scale > 0:
        raise ValueError(f"object_scale must be > 0, got {object_scale}")


def _shape_alpha(kind: str, u: np.ndarray, v: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Soft coverage of a shape in its local (rotated) coordinates; 1-pixel antialiased edge."""
    if kind == "circle":
        sdf = np.sqrt(u * u + v * v) - radius
    elif kind == "square":
        sdf = np.maximum(np.abs(u), np.abs(v)) - radius * 0.8
    else:  # equilateral triangle: three half-planes at inradius radius / 2
        sdf = np.full_like(u, -np.inf)
        for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
            sdf = np.maximum(sdf, u * math.cos(a) + v * math.sin(a) - radius * 0.5)
    return np.clip(0.5 - sdf, 0.0, 1.0)


def render_video(
    rng: np.random.Generator,
    label: int,
    frames: int,
    size: int,
    background: str = "textured",
    objects: tuple[int, int] = OBJECTS,
    object_scale: float = 1.0,
) -> np.ndarray:
    """Draw one video of class ``label``: uint8 [frames, size, size, 3].

    Positions wrap around the frame (a torus), so drifting objects never leave the picture.
    ``background`` is one of BACKGROUNDS; "textured" draws exactly what earlier versions drew.
    ``objects`` (fewest, most) and ``object_scale`` (radius factor) at their defaults draw what
    earlier versions drew; fewer, larger objects are what a CPU-minute generator can learn.
    """
    _check_objects(background, objects, object_scale)
    motion = MOTIONS[label % len(MOTIONS)]
    speed = _speed_factor(label) * rng.uniform(0.8, 1.2)
    px = size / 64.0
    field = _background(rng, size) if background == "textured" else _flat_background(rng, size)
    canvas = np.broadcast_to(field, (frames, size, size, 3)).copy()
    t = np.arange(frames, dtype=np.float32)[:, None, None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = (size - 1) / 2
    n_objects = int(rng.integers(objects[0], objects[1] + 1))
    # One shared heading per video for drifts (small jitter) keeps the class motion unambiguous.
    jitter = rng.uniform(-0.15, 0.15)
    for _ in range(n_objects):
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        radius = np.float32(rng.uniform(5, 10) * px * object_scale)
        x0, y0 = rng.uniform(0, size, 2)
        theta0 = rng.uniform(0, 2 * math.pi)
        spin = 0.0
        r_t = np.full_like(t, radius)
        if motion in _DRIFT:
            dx, dy = _DRIFT[motion]
            c, s = math.cos(jitter), math.sin(jitter)
            v = 1.5 * px * speed
            vx, vy = v * (dx * c - dy * s), v * (dx * s + dy * c)
            cx, cy = x0 + vx * t, y0 + vy * t
        elif motion in ("rotate_cw", "rotate_ccw"):
            spin = (0.18 if motion == "rotate_cw" else -0.18) * speed
            cx, cy = np.full_like(t, x0), np.full_like(t, y0)
        elif motion == "orbit":
            ring = rng.uniform(0.15, 0.35) * size
            phase = rng.uniform(0, 2 * math.pi)
            omega = 0.15 * speed
            cx = centre + ring * np.cos(phase + omega * t)
            cy = centre + ring * np.sin(phase + omega * t)
        else:  # pulse: objects grow and shrink in place
            phase = rng.uniform(0, 2 * math.pi)
            r_t = radius * (1.0 + 0.45 * np.sin(phase + 0.5 * speed * t)).astype(np.float32)
            cx, cy = np.full_like(t, x0), np.full_like(t, y0)
        # Toroidal offsets from the object centre.
        ddx = (xx - cx + size / 2) % size - size / 2
        ddy = (yy - cy + size / 2) % size - size / 2
        theta = theta0 + spin * t
        ct, st = np.cos(theta), np.sin(theta)
        u = ct * ddx + st * ddy
        w = -st * ddx + ct * ddy
        alpha = _shape_alpha(kind, u, w, r_t)[..., None]
        canvas = canvas * (1 - alpha) + colour * alpha
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


# Why `mbtree=0`: with the same frames and options, and x264 already single-threaded, libx264
# (core 165 in the PyAV 18 wheels) wrote different bytes from run to run on an AVX-512 CPU (whole GOPs
# re-encoded, decoded pixels up to ~20-30 grey levels apart). The output depended on the process's
# heap contents: with glibc's MALLOC_PERTURB_ it became fixed for one perturb byte and changed with
# the byte, i.e. x264 reads uninitialised memory. It went away with x264's asm limited to AVX2 (or
# asm=0), with mbtree=0 or rc-lookahead=0, and at widths of 128 and 256 px (it showed at 32-112, 160,
# 192): most likely the AVX-512 macroblock-tree kernels (mbtree_propagate_cost/_list, which AVX-512
# swaps in) reading past a short lowres row. Turning the macroblock tree off removes that path on
# every CPU and keeps the SIMD speed; the cost is a slightly larger file at the same CRF.
_X264_OPTIONS = {
    "crf": "18",
    "preset": "medium",
    "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:mbtree=0",
}


def write_mp4(path: Path, frames: np.ndarray, fps: int, crf: int = 18) -> None:
    """Write uint8 RGB [T, H, W, 3] as H.264 (libx264, yuv420p) whose bytes depend only on the
    pixels: single-threaded codec context, and no macroblock tree (see `_X264_OPTIONS`)."""
    import av

    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even sizes, got {w}x{h}")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # PyAV defaults to thread_count=0 (auto) and slice threading; pin both (this also makes
        # PyAV's rgb24 -> yuv420p conversion single-threaded, it reuses the codec's thread count).
        stream.codec_context.thread_count = 1
        stream.codec_context.thread_type = "NONE"
        stream.options = {**_X264_OPTIONS, "crf": str(crf), "g": str(max(fps, 1))}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _clear_previous(root: Path, params: SynthParams, overwrite: bool = False) -> None:
    """The output rules of every command (cache_schema.outputs): a new or empty folder is marked;
    a finished synthetic set is refused unless `overwrite`, which deletes only the files that set
    wrote (the videos its synth.json implies, then synth.json and emptied class folders); an
    unfinished set (killed before synth.json) is ours to redo. A folder that also holds files we
    did not write is refused, and nothing is deleted."""
    from cache_schema.outputs import LOCK, MARKER, OutputError, inspect_output, write_marker

    if inspect_output(root, "synth") != "ours":
        write_marker(root, "synth")
        return
    meta_file = root / "synth.json"
    try:
        old = SynthParams(**json.loads(meta_file.read_text())["params"]) if meta_file.is_file() else None
    except (ValueError, KeyError, TypeError):
        raise OutputError(
            f"{meta_file} is unreadable; move --out {root} away or choose another --out"
        ) from None
    if old is not None and not overwrite:
        same = "this synthetic set" if old == params else "a synthetic set of other sizes"
        raise OutputError(
            f"--out {root} already holds {same} ({', '.join(f'{k} {v}' for k, v in asdict(old).items())}); "
            "pass --overwrite to replace it or choose another --out (nothing was changed)"
        )
    if old is not None:
        names = class_names(old.classes)
        ours = {root / names[i % old.classes] / f"video_{i:04d}.mp4" for i in range(old.videos)}
    else:  # killed before synth.json: its videos follow the naming pattern
        ours = {v for folder in root.glob("class_*") if folder.is_dir() for v in folder.glob("video_*.mp4")}
    folders = [f for f in root.iterdir() if f.name.startswith("class_") and f.is_dir()]
    foreign = [e.name for e in root.iterdir() if not e.name.startswith("class_") and e.name not in
               (MARKER, LOCK, "synth.json")]  # fmt: skip
    foreign += [str(f.relative_to(root)) for d in folders for f in d.rglob("*") if f not in ours]
    if foreign:
        raise OutputError(
            f"--overwrite refused: {root} holds a synthetic set but also {', '.join(sorted(foreign)[:5])}, "
            "which align4gen did not write; move those away or choose another --out (nothing was deleted)"
        )
    meta_file.unlink(missing_ok=True)  # first: a kill below leaves an unfinished set, redone on rerun
    for video in ours:
        video.unlink(missing_ok=True)
    for folder in folders:
        if not any(folder.iterdir()):
            folder.rmdir()


def make_synthetic(
    out: str | Path,
    videos: int = 24,
    classes: int = 4,
    frames: int = 24,
    size: int = 64,
    seed: int = 0,
    fps: int = 8,
    progress: bool = True,
    background: str = "textured",
    overwrite: bool = False,
    objects: tuple[int, int] = OBJECTS,
    object_scale: float = 1.0,
) -> SynthInfo:
    """Write ``videos`` mp4 files into ``out/<class folder>/video_XXXX.mp4`` (video i has class
    i % classes) plus ``synth.json`` with the parameters. Deterministic for a seed. An existing
    set in ``out`` is refused unless ``overwrite`` (see _clear_previous)."""
    objects = (int(objects[0]), int(objects[1]))
    params = SynthParams(videos, classes, frames, size, seed, fps, background, objects, object_scale)
    if videos < 1 or classes < 1 or frames < 1 or fps < 1:
        raise ValueError(f"videos, classes, frames and fps must be >= 1, got {params}")
    _check_objects(background, objects, object_scale)
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16 (H.264 yuv420p), got {size}")
    root = Path(out).expanduser()
    _clear_previous(root, params, overwrite)
    names = class_names(classes)
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for i in tqdm(range(videos), desc="synthetic videos", unit="video", disable=not progress):
        label = i % classes
        rng = np.random.default_rng([seed, i])
        clip = render_video(rng, label, frames, size, background, objects, object_scale)
        path = root / names[label] / f"video_{i:04d}.mp4"
        write_mp4(path, clip, fps)
        paths.append(str(path))
        labels.append(label)
    meta = {"generator": "align4gen synthetic v1", "params": asdict(params), "class_names": names}
    (root / "synth.json").write_text(json.dumps(meta, indent=2) + "\n")
    return SynthInfo(str(root), paths, labels, names, params)


# --------------------------------------------------------------------- in-memory clip sets
# Seed streams of in-memory sets: clip i of a set with offset o is drawn from
# default_rng([seed, o + i]). The written dataset (make_synthetic) uses [seed, i] with i < 100000,
# so sets with an offset >= 100000 never repeat one of its videos.
SEED_OFFSETS = {
    "pretrain": 100_000,
    "probe": 200_000,
    "probe_shape": 250_000,
    "classifier": 300_000,
    "classifier_test": 400_000,
}

Renderer = Callable[[np.random.Generator, int, int, int], np.ndarray]


def render_clips(
    count: int,
    seed: int,
    offset: int,
    classes: int = 4,
    frames: int = 8,
    size: int = 64,
    render: Renderer | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` clips in memory: uint8 [count, frames, size, size, 3] and int64 labels
    (clip i has class i % classes), clip i drawn with ``render`` (default ``render_video``)
    from ``default_rng([seed, offset + i])``. ``render`` takes (rng, label, frames, size), so
    a variant such as ``functools.partial(render_video, background=...)`` plugs in."""
    render = render or render_video
    labels = np.arange(count, dtype=np.int64) % classes
    clips = np.stack(
        [
            render(np.random.default_rng([seed, offset + i]), int(labels[i]), frames, size)
            for i in range(count)
        ]
    )
    return clips, labels


def render_strided(
    rng: np.random.Generator,
    label: int,
    frames: int,
    size: int,
    stride: int = 1,
    background: str = "textured",
    **objects: Any,
) -> np.ndarray:
    """A clip as extraction cuts it from a video: ``frames`` frames taken every ``stride`` frames
    (what `--stride` does), so objects move ``stride`` times as far per frame. ``objects``:
    render_video's ``objects`` and ``object_scale``."""
    return render_video(rng, label, (frames - 1) * stride + 1, size, background, **objects)[::stride]


def render_shape_clip(rng: np.random.Generator, frames: int, size: int) -> tuple[np.ndarray, int]:
    """One object of a random shape drifting slowly over a textured background, for a per-frame
    shape probe: (uint8 [frames, size, size, 3], index into SHAPES). The object is bigger than
    ``render_video``'s (radius 12-18 px at 64 px) and starts in the central third, so it spans
    whole patches and never wraps around the border.
    A separate generator: ``render_video``'s random draws (and so every dataset video) are unchanged."""
    px = size / 64.0
    shape = int(rng.integers(len(SHAPES)))
    canvas = np.broadcast_to(_background(rng, size), (frames, size, size, 3)).copy()
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    radius = np.float32(rng.uniform(12, 18) * px)
    x0, y0 = rng.uniform(size / 3, 2 * size / 3, 2)
    heading, theta = rng.uniform(0, 2 * math.pi, 2)
    t = np.arange(frames, dtype=np.float32)[:, None, None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = x0 + 0.5 * px * math.cos(heading) * t, y0 + 0.5 * px * math.sin(heading) * t
    ddx = (xx - cx + size / 2) % size - size / 2
    ddy = (yy - cy + size / 2) % size - size / 2
    u = math.cos(theta) * ddx + math.sin(theta) * ddy
    w = -math.sin(theta) * ddx + math.cos(theta) * ddy
    alpha = _shape_alpha(SHAPES[shape], u, w, np.full_like(t, radius))[..., None]
    canvas = canvas * (1 - alpha) + colour * alpha
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), shape


def render_shape_clips(count: int, seed: int, offset: int, frames: int = 8, size: int = 64):
    """``count`` one-object clips (``render_shape_clip``) and their shape indices, clip i from
    ``default_rng([seed, offset + i])``."""
    pairs = [render_shape_clip(np.random.default_rng([seed, offset + i]), frames, size) for i in range(count)]
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs], dtype=np.int64)
