"""Test helpers shared by several test files (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import numpy as np
import torch

import cache_schema
from cache_schema import constants as C
from cache_schema import formats
from stages.pack.packer import clip_sample, shard_index, write_index, write_tar


def tiny_extract_config(data, out, **over):
    """An ExtractConfig of the tiny preset (tiny models of the real classes, 8 x 64 x 64 clips),
    quiet, blocks of 2 clips; `over` sets any other field."""
    from stages.extract.config import ExtractConfig, preset_values

    values = {**preset_values("tiny"), "data": str(data), "out": str(out), "progress": False, "block_size": 2}
    values.update(over)
    return ExtractConfig(**values)


LATENT_SHAPE = (4, 4, 8, 8)  # C, T', h, w -> grid (4, 4, 4) with patch (1, 2, 2)
GRID = (4, 4, 4)
ENCODERS = [("dino", 8), ("sam2", 16)]
CLASSES = ["left", "right"]


def signal_targets(latents: np.ndarray, maps: list[np.ndarray]) -> list[np.ndarray]:
    """Encoder-like targets with real signal: a fixed random linear map of each 2x2 latent patch,
    L2-normalised per token, one array [T, H, W, D] per encoder."""
    c, t, h, w = latents.shape
    patches = (
        latents.reshape(c, t, h // 2, 2, w // 2, 2).transpose(1, 2, 4, 0, 3, 5).reshape(t, h // 2, w // 2, -1)
    )
    out = []
    for m in maps:
        feats = np.tanh(patches @ m)
        out.append(feats / np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-6))
    return out


def layout_entries(fmt: str, encoders=ENCODERS, frames: int = GRID[0]) -> list[dict]:
    """Cache layout entries (schema v2) of encoders stored in format `fmt` on the DiT grid."""
    entries = []
    for name, dim in encoders:
        stored = formats.stored_layout(fmt, dim)
        entries.append(
            {
                "name": name,
                "id": f"test/{name}",
                "dim": dim,
                "input_size": 32,
                "format": fmt,
                "time_frames": frames,
                "stored_dim": dim,
                "values": list(stored["values"]),
                "scales": None if stored["scales"] is None else list(stored["scales"]),
                "pca": False,
            }
        )
    return entries


def make_shards(
    root,
    num_samples: int = 48,
    per_shard: int = 16,
    seed: int = 0,
    nan: bool = False,
    fmt: str = "float16",
    spec_extra: dict | None = None,
):
    """A schema-v2 shard set (tars, latents-only twin, index.json files) written with the packer's
    own writers: latents with a class signal, targets that are a function of the latents."""
    rng = np.random.default_rng(seed)
    maps = [
        np.random.default_rng(100 + i).normal(size=(LATENT_SHAPE[0] * 4, d))
        for i, (_, d) in enumerate(ENCODERS)
    ]
    entries = layout_entries(fmt)
    spec = {
        "dataset": {"layout": "synthetic", "files": [["a.mp4", 0], ["b.mp4", 1]]},
        "clips": {"frames": 4, "stride": 1, "size": 64},
        "vae": {
            "id": "test/vae",
            "kind": "image",
            "scale": 0.18215,
            "latent_channels": 4,
            "spatial_factor": 8,
        },
        "encoders": [{"name": n, "dim": d, "format": fmt} for n, d in ENCODERS],
        "grid": list(GRID),
        **(spec_extra or {}),
    }
    derived = {"pca": {}, "fidelity": {}}
    root.mkdir(parents=True, exist_ok=True)
    (root / C.LATENTS_ONLY_DIR).mkdir(exist_ok=True)
    full, lean = [], []
    for s in range(0, num_samples, per_shard):
        samples, lean_samples = [], []
        for i in range(s, min(s + per_shard, num_samples)):
            label = i % len(CLASSES)
            latent = rng.normal(size=LATENT_SHAPE).astype(np.float32)
            latent[:, :, :, : LATENT_SHAPE[3] // 2] += 1.0 if label else -1.0
            if nan:
                latent[:] = np.nan
            targets = {}
            for (name, _), tgt in zip(ENCODERS, signal_targets(np.nan_to_num(latent), maps), strict=True):
                values, scales = formats.encode(torch.from_numpy(tgt.astype(np.float32)), fmt)
                targets[name] = (values.numpy(), None if scales is None else scales.numpy())
            meta = {"video": f"v{i}.mp4", "start_frame": 0, "flip": False, "clip_index": i, "label": label}
            samples.append(clip_sample(i, latent.astype(np.float16), targets, label, meta))
            lean_samples.append(clip_sample(i, latent.astype(np.float16), {}, label, meta))
        name = C.SHARD_PATTERN.format(s // per_shard)
        full.append(write_tar(str(root / name), samples))
        lean.append(write_tar(str(root / C.LATENTS_ONLY_DIR / name), lean_samples))
    layout = {
        "fingerprint": cache_schema.content_fingerprint(spec, derived),
        "spec": spec,
        "derived": derived,
        "encoders": entries,
        "grid": list(GRID),
        "latent_shape": list(LATENT_SHAPE),
        "class_names": CLASSES,
        "patch_size": [1, 2, 2],
    }
    order = {"kind": "permutation", "seed": 0}
    write_index(str(root / C.LATENTS_ONLY_DIR), shard_index(layout, lean, order=order, latents_only=True))
    lean_info = {
        "dir": C.LATENTS_ONLY_DIR,
        "num_samples": num_samples,
        "bytes": sum(e["bytes"] for e in lean),
    }
    write_index(str(root), shard_index(layout, full, order=order, pca_files={}, latents_only=lean_info))
    return root
