"""IICR (Intra-Inter Consistency Ratio) of encoder features; our definition (DESIGN.md s. 6).

For one encoder over N clips: each frame's tokens are pooled to one vector and L2-normalised;
intra = mean cosine similarity between different frames of the same clip; inter = mean cosine
similarity between frames of different videos (and, when labels exist, of different classes);
IICR = intra / inter (higher: temporally stable yet discriminative). The same is reported per
token position without pooling (position p of frame t against position p of other frames).

intra and inter are always reported. The ratio is reported only where inter >= INTER_MIN: the
inter cosine of features that spread around the origin is near zero or negative (a random tiny
DINOv2 gives inter -0.03 and a ratio of -15), where the ratio's sign and size say nothing; there
the ratio is None and `undefined` gives the reason. With inter >= INTER_MIN the ratio lies in
[-1 / INTER_MIN, 1 / INTER_MIN]. `gap_*` = intra - inter is always defined, bounded in [-2, 2],
and ranks encoders where the ratio cannot.

Everything is computed from sums of unit vectors, so memory stays O(positions x dim) plus one
running sum per open video and per class, whatever N is: over a set of n unit vectors the sum
of pairwise cosines over ordered pairs i != j is |sum|^2 - n; across groups it is
|sum_all|^2 - sum_g |sum_g|^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.common.progress import tqdm


def _normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def _sqnorm(x: np.ndarray) -> np.ndarray:
    return np.einsum("...d,...d->...", x, x)


@dataclass
class _Moments:
    """Running sums for one view (pooled: P = 1 position; tokens: P = H*W positions)."""

    positions: int
    dim: int
    intra_sum: np.ndarray = None  # [P] sum over clips of the clip's mean pairwise cosine
    clips: int = 0
    total: np.ndarray = None  # [P, d] sum of all unit vectors
    frames: int = 0
    open_videos: dict[int, np.ndarray] = field(default_factory=dict)  # video -> [P, d]
    open_counts: dict[int, int] = field(default_factory=dict)
    video_sq: np.ndarray = None  # [P] sum over closed videos of |S_v|^2
    video_pairs: int = 0  # sum over closed videos of M_v^2
    class_sums: dict[int, np.ndarray] = field(default_factory=dict)
    class_counts: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.intra_sum = np.zeros(self.positions)
        self.total = np.zeros((self.positions, self.dim))
        self.video_sq = np.zeros(self.positions)

    def update(self, u: np.ndarray, videos: np.ndarray, labels: np.ndarray | None) -> None:
        """u: unit vectors [b, T, P, d] of b clips."""
        b, t = u.shape[:2]
        clip_sum = u.sum(axis=1, dtype=np.float64)  # [b, P, d]
        self_sq = _sqnorm(u.astype(np.float64)).sum(axis=1)  # [b, P] (= T unless zero vectors)
        self.intra_sum += ((_sqnorm(clip_sum) - self_sq) / (t * (t - 1))).sum(axis=0)
        self.clips += b
        self.total += clip_sum.sum(axis=0)
        self.frames += b * t
        for v in np.unique(videos):
            sel = videos == v
            part = clip_sum[sel].sum(axis=0)
            key = int(v)
            if key in self.open_videos:
                self.open_videos[key] += part
            else:
                self.open_videos[key] = part
            self.open_counts[key] = self.open_counts.get(key, 0) + int(sel.sum()) * t
        if labels is not None:
            for c in np.unique(labels[labels >= 0]):
                sel = labels == c
                key = int(c)
                part = clip_sum[sel].sum(axis=0)
                self.class_sums[key] = self.class_sums.get(key, 0) + part
                self.class_counts[key] = self.class_counts.get(key, 0) + int(sel.sum()) * t

    def close(self, videos) -> None:
        """Fold finished videos into the across-video sums and forget their vectors."""
        for v in list(videos):
            key = int(v)
            if key in self.open_videos:
                self.video_sq += _sqnorm(self.open_videos.pop(key))
                self.video_pairs += self.open_counts.pop(key) ** 2

    def result(self) -> dict[str, Any]:
        self.close(list(self.open_videos))
        intra = self.intra_sum / max(self.clips, 1)
        pairs = self.frames**2 - self.video_pairs
        inter_video = (
            (_sqnorm(self.total) - self.video_sq) / pairs if pairs > 0 else np.full(self.positions, np.nan)
        )
        out: dict[str, Any] = {"intra": intra, "inter_video": inter_video}
        if len(self.class_sums) >= 2:
            s_lab = sum(self.class_sums.values())
            m_lab = sum(self.class_counts.values())
            same = sum(_sqnorm(s) for s in self.class_sums.values())
            cpairs = m_lab**2 - sum(c**2 for c in self.class_counts.values())
            out["inter_class"] = (_sqnorm(s_lab) - same) / cpairs
        return out


def _finite(x: float) -> float | None:
    """JSON-safe: NaN (e.g. inter with a single video) becomes None."""
    return float(x) if math.isfinite(x) else None


INTER_MIN = 0.1  # below this inter cosine the intra / inter ratio is not reported


def _ratio(intra: float | None, inter: float | None) -> tuple[float | None, str | None]:
    """(intra / inter, None) where inter >= INTER_MIN, else (None, why not)."""
    if intra is None or inter is None:
        return None, "intra or inter is undefined (a single clip or a single video)"
    if inter < INTER_MIN:
        return None, (
            f"inter cosine {inter:.4f} is below {INTER_MIN}: the ratio is unstable there (its sign and "
            "size follow the denominator); compare intra and inter, or the gap intra - inter"
        )
    return float(intra / inter), None


def _add_ratios(out: dict[str, Any], kinds: tuple[str, ...]) -> None:
    """out[iicr_k], out[gap_k] from out[intra] and out[inter_k]; reasons for undefined ratios go
    under out["undefined"]."""
    for kind in kinds:
        if f"inter_{kind}" not in out:
            continue
        inter = out[f"inter_{kind}"]
        out[f"iicr_{kind}"], why = _ratio(out["intra"], inter)
        out[f"gap_{kind}"] = None if out["intra"] is None or inter is None else out["intra"] - inter
        if why is not None:
            out.setdefault("undefined", {})[f"iicr_{kind}"] = why


class IICRAccumulator:
    """Feeds blocks of clip features; call :meth:`result` at the end.

    Clips of one video may arrive in several blocks; pass ``close_videos`` once a video can
    get no more clips so its running sum is dropped (all still-open ones close at the end).
    """

    def __init__(self, dim: int, grid_hw: tuple[int, int] | None, per_position: bool = True) -> None:
        self.dim = dim
        self.grid_hw = grid_hw
        self.pooled = _Moments(1, dim)
        self.tokens = _Moments(grid_hw[0] * grid_hw[1], dim) if (per_position and grid_hw) else None
        self.num_clips = 0
        self.frames_per_clip: int | None = None

    def update(
        self,
        feats: np.ndarray,
        video_index: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        close_videos=(),
    ) -> None:
        """feats: [b, T, H, W, d] token features or [b, T, d] frame features of b clips."""
        x = np.asarray(feats, dtype=np.float32)
        if x.ndim not in (3, 5) or x.shape[-1] != self.dim:
            raise ValueError(
                f"expected features [b, T, H, W, {self.dim}] or [b, T, {self.dim}], got {x.shape}"
            )
        b, t = x.shape[:2]
        if t < 2:
            raise ValueError(f"IICR needs at least 2 frames per clip, got {t}")
        if self.frames_per_clip not in (None, t):
            raise ValueError(f"clips must all have the same number of frames ({self.frames_per_clip} vs {t})")
        self.frames_per_clip = t
        vids = (
            np.arange(self.num_clips, self.num_clips + b) if video_index is None else np.asarray(video_index)
        )
        labs = None if labels is None else np.asarray(labels)
        frame_vec = x.mean(axis=(2, 3)) if x.ndim == 5 else x
        self.pooled.update(_normalise(frame_vec)[:, :, None, :], vids, labs)
        if self.tokens is not None and x.ndim == 5:
            if tuple(x.shape[2:4]) != tuple(self.grid_hw):
                raise ValueError(f"token grid {x.shape[2:4]} differs from {self.grid_hw}")
            self.tokens.update(_normalise(x.reshape(b, t, -1, self.dim)), vids, labs)
        self.num_clips += b
        self.close(vids if video_index is None else close_videos)

    def close(self, videos) -> None:
        """Mark videos as complete (no more clips of them will come)."""
        self.pooled.close(videos)
        if self.tokens is not None:
            self.tokens.close(videos)

    def result(self) -> dict[str, Any]:
        if self.num_clips == 0:
            raise ValueError("no clips were given to IICR")
        pooled = {k: _finite(v[0]) for k, v in self.pooled.result().items()}
        out: dict[str, Any] = {
            "num_clips": self.num_clips,
            "frames_per_clip": self.frames_per_clip,
            "dim": self.dim,
            "intra": pooled["intra"],
            "inter_video": pooled["inter_video"],
        }
        if "inter_class" in pooled:
            out["inter_class"] = pooled["inter_class"]
        _add_ratios(out, ("video", "class"))
        out["iicr"] = out["iicr_class"] if "inter_class" in out else out["iicr_video"]
        if self.tokens is not None and self.tokens.clips:
            res = self.tokens.result()
            h, w = self.grid_hw
            tok: dict[str, Any] = {
                "intra": _finite(res["intra"].mean()),
                "inter_video": _finite(res["inter_video"].mean()),
                "intra_map": res["intra"].reshape(h, w).round(6).tolist(),
                "inter_video_map": np.nan_to_num(res["inter_video"]).reshape(h, w).round(6).tolist(),
            }
            if "inter_class" in res:
                tok["inter_class"] = _finite(res["inter_class"].mean())
            _add_ratios(tok, ("video", "class"))
            out["per_position"] = tok
        return out


def iicr_from_array(
    feats: np.ndarray,
    video_index: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    per_position: bool = True,
) -> dict[str, Any]:
    """IICR of in-memory features [N, T, H, W, d] (or [N, T, d]); clip i is video i unless given."""
    x = np.asarray(feats)
    grid = tuple(x.shape[2:4]) if x.ndim == 5 else None
    acc = IICRAccumulator(x.shape[-1], grid, per_position)
    acc.update(x, video_index, labels, close_videos=())
    return acc.result()


# --------------------------------------------------------------------------- zarr store


def _last_positions(video_index: np.ndarray) -> dict[int, int]:
    last: dict[int, int] = {}
    for i, v in enumerate(video_index.tolist()):
        last[v] = i
    return last


def iicr_from_store(
    path: str,
    encoders: list[str] | None = None,
    per_position: bool = True,
    block_clips: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """IICR per encoder over a cache store, read blockwise with dask (never loaded whole).

    Targets are reconstructed from their stored format as the trainer sees them; clips with
    valid == 0 are skipped; inter-class figures are added when the store has labels.
    Returns {"store", "num_clips", "encoders": {...}}.
    """
    from stages.evaluate.store_targets import open_targets

    store = open_targets(path, encoders, block_clips)
    t, h, w = store.grid
    valid, video_index, labels = store.valid, store.video_index, store.labels
    has_labels = bool((labels[valid] >= 0).any())
    n, step = store.num_clips, store.block_clips
    by_end: dict[int, list[int]] = {}
    for v, i in _last_positions(video_index).items():
        by_end.setdefault(min((i // step + 1) * step, n), []).append(v)
    accs = {name: IICRAccumulator(e.dim, (h, w), per_position) for name, e in store.encoders.items()}
    blocks = tqdm(store.blocks(), total=-(-n // step), desc="IICR", unit="block", disable=not progress)
    for start, stop, dense in blocks:
        keep, done = valid[start:stop], by_end.get(stop, [])
        for name, acc in accs.items():
            if keep.any():
                acc.update(dense[name], video_index[start:stop][keep],
                           labels[start:stop][keep] if has_labels else None, close_videos=done)  # fmt: skip
            else:
                acc.close(done)
    return {
        "store": str(path),
        "num_clips": int(valid.sum()),
        "skipped_invalid": int((~valid).sum()),
        "grid": [t, h, w],
        "labels": has_labels,
        "encoders": {name: acc.result() for name, acc in accs.items()},
    }


# --------------------------------------------------------------------------- reporting


def format_table(result: dict[str, Any]) -> str:
    """One row per encoder: intra, inter(video), IICR(video), [inter/IICR(class)], token IICR; then
    one line per ratio left undefined, saying why (see INTER_MIN)."""
    encs = result["encoders"]
    has_cls = any("inter_class" in r for r in encs.values())

    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    head = ["encoder", "dim", "intra", "inter(video)", "IICR(video)"]
    if has_cls:
        head += ["inter(class)", "IICR(class)"]
    head += ["IICR tokens"]
    rows = []
    for name, r in encs.items():
        row = [name, str(r["dim"]), f(r["intra"]), f(r["inter_video"]), f(r["iicr_video"])]
        if has_cls:
            row += [f(r.get("inter_class")), f(r.get("iicr_class"))]
        tok = r.get("per_position")
        row.append(f(tok.get("iicr_class", tok["iicr_video"])) if tok else "n/a")
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    for name, r in encs.items():
        for where, part in (("", r), ("tokens ", r.get("per_position") or {})):
            for key, why in (part.get("undefined") or {}).items():
                lines.append(f"n/a: {name} {where}{key.replace('iicr_', 'IICR(')}): {why}")
    return "\n".join(lines)


def bar_plot(result: dict[str, Any], path: str) -> str:
    """Grouped bars per encoder: IICR pooled and per token position (video and class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encs = result["encoders"]
    series: dict[str, list[float]] = {}
    for r in encs.values():
        tok = r.get("per_position") or {}
        vals = {
            "IICR (videos)": r.get("iicr_video"),
            "IICR (classes)": r.get("iicr_class"),
            "IICR tokens (videos)": tok.get("iicr_video"),
            "IICR tokens (classes)": tok.get("iicr_class"),
        }
        for key, v in vals.items():
            series.setdefault(key, []).append(np.nan if v is None else v)
    series = {k: v for k, v in series.items() if not all(np.isnan(x) for x in v)}
    names = list(encs)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) * max(1, len(series)) / 2), 3.5))
    width = 0.8 / max(1, len(series))
    for i, (key, vals) in enumerate(series.items()):
        xs = np.arange(len(names)) + (i - (len(series) - 1) / 2) * width
        ax.bar(xs, vals, width, label=key)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("intra / inter (higher is better)")
    ax.set_title("IICR per encoder")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- straight from videos


@dataclass
class VideoIICRConfig:
    """Clips cut from a video folder for encoder analysis before any extraction."""

    frames: int = 16
    stride: int = 3
    clips_per_video: int = 2
    size: int = 256
    batch_size: int = 4
    max_videos: int | None = None
    device: str = "auto"
    per_position: bool = True
    progress: bool = True


def iicr_from_videos(
    videos: str, encoders: dict[str, Any], cfg: VideoIICRConfig | None = None
) -> dict[str, Any]:
    """IICR per encoder from clips decoded from `videos`; `encoders` maps name -> an object with
    `.features(uint8 [B, T, H, W, 3]) -> [B, t, h, w, D]` (stages.common.models.encoders)."""
    import torch

    from stages.common.video import ClipSpec, discover, plan_clips, read_clip

    cfg = cfg or VideoIICRConfig()
    source = discover(videos)
    if cfg.max_videos:
        source.entries = source.entries[: cfg.max_videos]
    spec = ClipSpec(frames=cfg.frames, stride=cfg.stride, clips_per_video=cfg.clips_per_video, size=cfg.size)
    refs, skipped, _ = plan_clips(source, spec, progress=cfg.progress)
    if not refs:
        raise ValueError(
            f"no clips of {cfg.frames} frames at stride {cfg.stride} in {videos} ({len(skipped)} skipped)"
        )
    labelled = source.class_names is not None and len(source.class_names) >= 2
    accs: dict[str, IICRAccumulator] = {}
    last = _last_positions(np.array([r.video_index for r in refs]))
    failed: list[str] = []
    for start in tqdm(
        range(0, len(refs), cfg.batch_size), desc="IICR from videos", unit="batch", disable=not cfg.progress
    ):
        chunk = refs[start : start + cfg.batch_size]
        clips, vids, labs = [], [], []
        for ref in chunk:
            entry = source.entries[ref.video_index]
            try:
                clips.append(read_clip(entry, ref.start_frame, spec))
            except Exception as exc:  # a bad video never stops the analysis
                failed.append(f"{entry.path}: {exc}")
                continue
            vids.append(ref.video_index)
            labs.append(-1 if entry.label is None else entry.label)
        done = [v for v, i in last.items() if start <= i < start + len(chunk)]
        batch = torch.from_numpy(np.stack(clips)) if clips else None
        for name, enc in encoders.items():
            if batch is None:
                if name in accs:
                    accs[name].close(done)
                continue
            feats = enc.features(batch).float().cpu().numpy()
            if name not in accs:
                accs[name] = IICRAccumulator(feats.shape[-1], tuple(feats.shape[2:4]), cfg.per_position)
            accs[name].update(feats, np.array(vids), np.array(labs) if labelled else None, close_videos=done)
    if not accs:
        raise ValueError(f"no clip of {videos} could be decoded")
    return {
        "videos": str(videos),
        "num_clips": len(refs) - len(failed),
        "skipped": [f"{s.path}: {s.reason}" for s in skipped] + failed,
        "clips": {
            "frames": cfg.frames,
            "stride": cfg.stride,
            "clips_per_video": cfg.clips_per_video,
            "size": cfg.size,
        },
        "labels": labelled,
        "encoders": {name: acc.result() for name, acc in accs.items()},
    }
