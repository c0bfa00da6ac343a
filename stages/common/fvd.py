"""FVD and content-debiased FVD: features, stats with a pinned protocol, Frechet distance.

A number is only comparable to another computed under the same protocol, so every stats
file carries its protocol (detector, weights sha256, frames, frame stride, resolution, video
count, subset rule) and its fingerprint; comparing stats of different protocols is refused,
naming the field. `count` is the number of videos the protocol asks for (StyleGAN-V: 2048); `n`
is how many were actually used (a warning when fewer, or when n < feature dim). Stats follow
StyleGAN-V: mean and the biased (1/n) covariance of the features.

Which videos, when a set holds more than `count` (`real_subset`): "first" (the default) takes
the first `count` usable videos in sorted order (class folders, then file names), StyleGAN-V's
rule. Its consequence on a class-folder dataset: the subset is a few classes, not a sample of
the dataset. On UCF-101 (13,320 videos, 101 class folders; counts from the official split lists
trainlist01 + testlist01) the first 2048 are the 15 classes ApplyEyeMakeup ... BodyWeightSquats
(2010 videos) plus 38 Bowling videos: 16 of 101 classes. Numbers stay comparable with papers
that used the same rule, but they measure those 16 classes. "random" takes a uniform sample of
`count` usable videos without replacement, seeded by `subset_seed` (numpy default_rng); the rule
and the seed are protocol fields, so stats of different subsets are refused as different
protocols. The default adds nothing to the fingerprint: stats written before the rule existed
keep their fingerprint and stay comparable with "first".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg

from cache_schema import canonical_json
from stages.common.progress import tqdm

_BASE_FIELDS = ("detector", "weights_sha256", "frames", "frame_stride", "resolution", "count")
PROTOCOL_FIELDS = (*_BASE_FIELDS, "real_subset", "subset_seed")
REAL_SUBSETS = ("first", "random")
DEFAULT_CACHE = Path("~/.cache/align4gen/fvd-stats")


@dataclass
class EvalConfig:
    """How videos become FVD features. All but the runtime knobs are part of the protocol."""

    detector: str = "i3d"
    detector_weights: str | None = None
    frames: int = 16  # frames per video fed to the detector
    frame_stride: int = 1  # stride between those frames when cutting them from longer videos
    resolution: int = 256  # videos are resized (short side) + center-cropped to this first
    num_videos: int = 2048  # the protocol's video count (StyleGAN-V: 2048)
    real_subset: str = (
        "first"  # which videos of a larger set: "first" in sorted order | "random" (module doc)
    )
    subset_seed: int = 0  # seed of the "random" subset (part of the protocol then)
    batch_size: int = 8
    num_workers: int = 0
    device: str = "auto"
    dtype: str = "float32"  # "bfloat16" autocast on CUDA (not part of the protocol; use with care)
    num_heads: int | None = None  # VideoMAE-v2 head count when the checkpoint's width is unusual
    cache_dir: str | None = None  # real-stats cache (default ~/.cache/align4gen/fvd-stats)
    use_cache: bool = True
    progress: bool = True


_NPZ_ERRORS = (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError)


def _unreadable(path: str | Path, exc: BaseException) -> ValueError:
    detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    return ValueError(
        f"{path} cannot be read ({detail}): the file is truncated or damaged, e.g. by a killed "
        "writer; write it again (pipeline sample, pipeline evaluate stats)"
    )


@contextlib.contextmanager
def open_npz(path: str | Path) -> Iterator[Any]:
    """np.load of an .npz, or one ValueError naming the file when it is not a readable archive
    (a torn file, a truncated member, another format)."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except _NPZ_ERRORS as exc:
        raise _unreadable(path, exc) from None
    with data:
        yield data


def read_member(data: Any, key: str, path: str | Path) -> np.ndarray:
    """One array of an open .npz; a member that fails to decompress or check names the file."""
    try:
        return data[key]
    except _NPZ_ERRORS as exc:
        raise _unreadable(path, exc) from None


class ProtocolMismatch(ValueError):
    """Two stats computed under different protocols: their distance would mean nothing."""

    def __init__(self, field_name: str, a: Any, b: Any) -> None:
        super().__init__(
            f"stats were computed under different protocols: '{field_name}' is {a!r} for the real "
            f"stats but {b!r} for the fake ones; recompute one of them with the same settings"
        )
        self.field = field_name


@dataclass
class FeatureStats:
    """Mean and covariance of detector features, with the protocol they were computed under."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    protocol: dict[str, Any]
    source: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return protocol_fingerprint(self.protocol)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp,
            mu=self.mu,
            sigma=self.sigma,
            n=np.int64(self.n),
            protocol=np.array(json.dumps(self.protocol)),
            fingerprint=np.array(self.fingerprint),
            source=np.array(self.source),
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        with open_npz(path) as data:
            missing = [k for k in ("mu", "sigma", "n", "protocol") if k not in data]
            if missing:
                raise ValueError(f"{path} is not an FVD stats file (missing {', '.join(missing)})")
            get = {k: read_member(data, k, path) for k in data.files}
            return cls(
                mu=get["mu"].astype(np.float64),
                sigma=get["sigma"].astype(np.float64),
                n=int(get["n"]),
                protocol=json.loads(str(get["protocol"])),
                source=str(get["source"]) if "source" in get else str(path),
            )


def build_detector(cfg: EvalConfig):
    """The detector named by the config, with its runtime dtype."""
    import torch

    from .detectors import load_detector

    options: dict[str, Any] = {}
    if cfg.detector.startswith("videomae"):
        options = {"num_heads": cfg.num_heads, "num_frames": cfg.frames}
        if cfg.frames != 16:
            warnings.warn(
                f"content-debiased FVD is defined on 16 frames; using {cfg.frames} (results are not comparable "
                "to published numbers)",
                stacklevel=2,
            )
    from stages.common.runtime import resolve_device

    det = load_detector(cfg.detector, cfg.detector_weights, str(resolve_device(cfg.device)), **options)
    det.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    return det


def _check_subset(cfg: EvalConfig) -> None:
    if cfg.real_subset not in REAL_SUBSETS:
        raise ValueError(f"real_subset must be one of {', '.join(REAL_SUBSETS)}, got {cfg.real_subset!r}")


def make_protocol(detector, cfg: EvalConfig) -> dict[str, Any]:
    _check_subset(cfg)
    return {
        "detector": detector.name,
        "weights_sha256": detector.weights_sha256,
        "frames": cfg.frames,
        "frame_stride": cfg.frame_stride,
        "resolution": cfg.resolution,
        "count": cfg.num_videos,
        "real_subset": cfg.real_subset,
        "subset_seed": cfg.subset_seed if cfg.real_subset == "random" else None,
    }


def _normalized(protocol: dict[str, Any]) -> dict[str, Any]:
    """All protocol fields; a protocol without a subset rule (older files) is "first", and the
    seed means nothing under "first"."""
    out = {k: protocol.get(k) for k in _BASE_FIELDS}
    out["real_subset"] = protocol.get("real_subset") or "first"
    out["subset_seed"] = protocol.get("subset_seed") if out["real_subset"] != "first" else None
    return out


def protocol_fingerprint(protocol: dict[str, Any]) -> str:
    """sha256 of the protocol; the default subset rule is left out, so it equals the fingerprint
    of the same protocol written before the rule was a field."""
    norm = _normalized(protocol)
    if norm["real_subset"] == "first":
        norm = {k: norm[k] for k in _BASE_FIELDS}
    return hashlib.sha256(canonical_json(norm).encode()).hexdigest()


def check_same_protocol(real: dict[str, Any], fake: dict[str, Any]) -> None:
    """Raise :class:`ProtocolMismatch` naming the first differing protocol field."""
    a, b = _normalized(real), _normalized(fake)
    for name in PROTOCOL_FIELDS:
        if a[name] != b[name]:
            raise ProtocolMismatch(name, a[name], b[name])


def subset_indices(total: int, cfg: EvalConfig) -> list[int]:
    """Which of `total` usable videos (in sorted order) the protocol takes, ascending: the first
    `num_videos`, or a seeded uniform sample of them without replacement."""
    _check_subset(cfg)
    n = min(total, cfg.num_videos)
    if cfg.real_subset == "first":
        return list(range(n))
    rng = np.random.default_rng(cfg.subset_seed)
    return sorted(int(i) for i in rng.choice(total, size=n, replace=False))


# --------------------------------------------------------------------------- video sources


def _clip_spec(cfg: EvalConfig):
    from stages.common.video import ClipSpec

    return ClipSpec(frames=cfg.frames, stride=cfg.frame_stride, clips_per_video=1, size=cfg.resolution)


def _load_video_array(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r")
        except _NPZ_ERRORS as exc:
            raise _unreadable(path, exc) from None
    else:
        with open_npz(path) as data:
            if "videos" not in data:
                raise ValueError(f"{path} holds no 'videos' array (keys: {', '.join(data.files)})")
            arr = read_member(data, "videos", path)
    if arr.ndim != 5 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 videos [N, T, H, W, 3], got {arr.dtype} {arr.shape}")
    return arr


def _array_batches(arr: np.ndarray, cfg: EvalConfig, indices: list[int]) -> Iterator[np.ndarray]:
    from stages.common.video import clip_starts, resize_crop

    spec = _clip_spec(cfg)
    starts = clip_starts(arr.shape[1], spec)
    if not starts:
        raise ValueError(
            f"videos have {arr.shape[1]} frames; the protocol needs {spec.span} ({cfg.frames} at stride {cfg.frame_stride})"
        )
    idx = [starts[0] + j * cfg.frame_stride for j in range(cfg.frames)]
    for i in range(0, len(indices), cfg.batch_size):
        batch = np.asarray(arr[indices[i : i + cfg.batch_size]][:, idx])
        if batch.shape[2:4] != (cfg.resolution, cfg.resolution):
            batch = np.stack([resize_crop(v, cfg.resolution).numpy() for v in batch])
        yield batch


def config_of_protocol(protocol: dict[str, Any], detector_weights: str | None, **runtime: Any) -> EvalConfig:
    """The EvalConfig that reproduces a stats file's protocol (its detector, frames, stride,
    resolution, count, subset rule), with runtime knobs (device, batch size, ...) from `runtime`."""
    p = _normalized(protocol)
    return EvalConfig(detector=p["detector"], detector_weights=detector_weights, frames=p["frames"],
                      frame_stride=p["frame_stride"], resolution=p["resolution"], num_videos=p["count"],
                      real_subset=p["real_subset"], subset_seed=p["subset_seed"] or 0, **runtime)  # fmt: skip


def array_features(detector, videos: np.ndarray, cfg: EvalConfig) -> np.ndarray:
    """Detector features [n, D] of in-memory uint8 videos [n, T, H, W, 3], cut and resized by the
    protocol exactly as a `videos.npz` would be (the trainer's `--eval-every` scores its samples so)."""
    batches = _array_batches(videos, cfg, list(range(len(videos))))
    return np.concatenate([detector.features(b) for b in batches]).astype(np.float32)


def _folder_batches(source, refs, cfg: EvalConfig, skipped: list[str]) -> Iterator[np.ndarray]:
    from torch.utils.data import DataLoader

    from stages.common.video import ClipDataset, collate_clips

    ds = ClipDataset(source, refs, _clip_spec(cfg))
    loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate_clips)
    for batch in loader:
        skipped.extend(e for e in batch["error"] if e)
        if batch["frames"] is not None:
            yield batch["frames"].numpy()


def video_batches(path: str | Path, cfg: EvalConfig) -> tuple[Iterator[np.ndarray], int, list[str]]:
    """uint8 batches [B, frames, R, R, 3] of up to `cfg.num_videos` videos (picked by
    `cfg.real_subset`) from a folder (or manifest) of videos, or an .npz/.npy holding `videos`
    [N, T, H, W, 3].
    Returns (batches, number of videos planned, list that collects skipped-video messages)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"videos not found: {p}")
    skipped: list[str] = []
    if p.is_file() and p.suffix in (".npz", ".npy"):
        arr = _load_video_array(p)
        chosen = subset_indices(len(arr), cfg)
        return _array_batches(arr, cfg, chosen), len(chosen), skipped
    from stages.common.video import discover, plan_clips

    source = discover(p)
    refs, skip, _ = plan_clips(source, _clip_spec(cfg), progress=cfg.progress)
    skipped.extend(f"{s.path}: {s.reason}" for s in skip)
    refs = [refs[i] for i in subset_indices(len(refs), cfg)]
    if not refs:
        raise ValueError(f"no usable videos in {p} ({len(skip)} skipped)")
    return _folder_batches(source, refs, cfg, skipped), len(refs), skipped


def extract_features(detector, path: str | Path, cfg: EvalConfig) -> tuple[np.ndarray, list[str]]:
    """Detector features [n, D] (float32) of the videos at `path`, and skipped-video messages."""
    batches, total, skipped = video_batches(path, cfg)
    feats = []
    with tqdm(total=total, desc=f"{detector.name} features", unit="video", disable=not cfg.progress) as bar:
        for batch in batches:
            feats.append(detector.features(batch))
            bar.update(len(batch))
    if not feats:
        raise ValueError(f"no videos of {path} could be decoded")
    return np.concatenate(feats).astype(np.float32), skipped


def stats_from_features(features: np.ndarray, protocol: dict[str, Any], source: str = "") -> FeatureStats:
    """Mean and biased covariance in float64 (as StyleGAN-V); warns when n < feature dim."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features [n >= 2, D], got shape {x.shape}")
    n, d = x.shape
    mu = x.mean(0)
    sigma = x.T @ x / n - np.outer(mu, mu)
    stats = FeatureStats(mu=mu, sigma=sigma, n=n, protocol=dict(protocol), source=source)
    if n < d:
        msg = f"{source or 'stats'}: only {n} videos for {d}-d features; the covariance is rank-deficient and FVD is biased"
        warnings.warn(msg, stacklevel=2)
        stats.warnings.append(msg)
    if n < protocol.get("count", 0):
        msg = f"{source or 'stats'}: {n} videos, fewer than the protocol's {protocol['count']}"
        warnings.warn(msg, stacklevel=2)
        stats.warnings.append(msg)
    return stats


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) in float64, real part of the square root."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: regularise as pytorch-fid does
        offset = np.eye(len(s1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(np.real(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)))


# --------------------------------------------------------------------------- inputs -> stats


def is_stats_file(path: str | Path) -> bool:
    p = Path(path)
    if not (p.is_file() and p.suffix == ".npz"):
        return False
    with open_npz(p) as data:
        return "mu" in data.files and "sigma" in data.files


def data_identity(path: str | Path) -> str:
    """sha256 over relative names, sizes and mtimes: changes when the videos change."""
    p = Path(path).expanduser().resolve()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    items = [
        [str(f.relative_to(p.parent if p.is_file() else p)), f.stat().st_size, f.stat().st_mtime_ns]
        for f in files
    ]
    return hashlib.sha256(canonical_json({"root": str(p), "files": items}).encode()).hexdigest()


def cache_path(cfg: EvalConfig, protocol: dict[str, Any], videos: str | Path) -> Path:
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else DEFAULT_CACHE.expanduser()
    return root / f"{protocol_fingerprint(protocol)[:20]}-{data_identity(videos)[:20]}.npz"


def compute_stats(detector, path: str | Path, cfg: EvalConfig, cache: bool = False) -> FeatureStats:
    """Stats of the videos at `path`, from the cache when `cache` and already computed."""
    protocol = make_protocol(detector, cfg)
    target = cache_path(cfg, protocol, path) if cache and cfg.use_cache else None
    if target is not None and target.is_file():
        stats = FeatureStats.load(target)
        check_same_protocol(protocol, stats.protocol)
        stats.source = str(path)
        stats.warnings.append(f"real stats loaded from cache {target}")
        return stats
    feats, skipped = extract_features(detector, path, cfg)
    stats = stats_from_features(feats, protocol, source=str(path))
    stats.warnings.extend(f"skipped {s}" for s in skipped)
    if target is not None:
        stats.save(target)
    return stats


def load_or_compute(path: str | Path, cfg: EvalConfig, detector_cache: dict, cache: bool) -> FeatureStats:
    """A stats file as it is; a features file or videos turned into stats under `cfg`."""
    p = Path(path).expanduser()
    if is_stats_file(p):
        return FeatureStats.load(p)
    if p.is_file() and p.suffix == ".npz":
        with open_npz(p) as data:
            if "features" in data.files:
                features, protocol = (read_member(data, k, p) for k in ("features", "protocol"))
                return stats_from_features(features, json.loads(str(protocol)), source=str(p))
    if "det" not in detector_cache:
        detector_cache["det"] = build_detector(cfg)
    return compute_stats(detector_cache["det"], p, cfg, cache=cache)


def compute_fvd(real: str | Path, fake: str | Path, cfg: EvalConfig) -> dict[str, Any]:
    """FVD between two inputs (video folder, .npz of videos, features or stats file).
    Real-video stats are cached by protocol fingerprint and data identity."""
    dets: dict = {}
    real_stats = load_or_compute(real, cfg, dets, cache=True)
    fake_stats = load_or_compute(fake, cfg, dets, cache=False)
    check_same_protocol(real_stats.protocol, fake_stats.protocol)
    value = frechet_distance(real_stats.mu, real_stats.sigma, fake_stats.mu, fake_stats.sigma)
    metric = "cd-fvd" if real_stats.protocol["detector"].startswith("videomae") else "fvd"
    return {
        "metric": metric,
        "value": value,
        metric: value,
        "n_real": real_stats.n,
        "n_fake": fake_stats.n,
        "real": str(real),
        "fake": str(fake),
        "protocol": real_stats.protocol,
        "fingerprint": real_stats.fingerprint,
        "warnings": real_stats.warnings + fake_stats.warnings,
    }


def save_features(path: str | Path, features: np.ndarray, protocol: dict[str, Any], source: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        features=features,
        protocol=np.array(json.dumps(protocol)),
        fingerprint=np.array(protocol_fingerprint(protocol)),
        source=np.array(source),
    )
    return path
