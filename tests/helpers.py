"""Test helpers shared by several test files (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

import cache_schema
from cache_schema import constants as C
from cache_schema import formats
from cache_schema.layout import CacheLayout
from stages.pack.packer import clip_sample, shard_index, write_index, write_tar

REPO = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict[str, str]:
    """Environment of a `python -m pipeline.cli` child: offline, one thread, this checkout importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def random_clip(b: int = 2, t: int = 4, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """Seeded uint8 noise video [b,t,h,w,3], the input the VAE and the encoders take."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t, h, w, 3), generator=g, dtype=torch.uint8)


def checkpoint_weights(folder) -> dict[str, torch.Tensor]:
    """The tensors of the (single) safetensors file a save_pretrained folder holds."""
    from safetensors.torch import load_file

    return load_file(next(Path(folder).glob("*.safetensors")))


def tiny_extract_config(data, out, **over):
    """An ExtractConfig of the tiny preset (tiny models of the real classes, 8 x 64 x 64 clips),
    quiet, blocks of 2 clips; `over` sets any other field."""
    from stages.extract.config import ExtractConfig, preset_values

    values = {**preset_values("tiny"), "data": str(data), "out": str(out), "progress": False, "block_size": 2}
    values.update(over)
    return ExtractConfig(**values)


def tiny_train_config(shards, out, **overrides):
    """A TrainConfig of the tiny DiT on the CPU: batches of 4, 6 steps, a log row every step, a
    checkpoint every 3, no loader workers; `overrides` sets any other field."""
    from stages.train import TrainConfig

    values = dict(shards=str(shards), out=str(out), model="tiny", batch_size=4, steps=6, log_every=1,
                  checkpoint_every=3, ema=0.99, lr=1e-3, num_workers=0, shuffle_buffer=8,
                  projector_dim=32, device="cpu")  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


TINY_DIT = dict(in_channels=4, num_frames=3, sample_size=8, hidden_size=32, depth=2, num_heads=4)


def tiny_dit(**overrides):
    """A 2-block VideoDiT on a 3 x 8 x 8 latent grid (4 channels, width 32, 4 heads); `overrides`
    sets any other constructor argument."""
    from stages.common.models.dit import VideoDiT

    return VideoDiT(**{**TINY_DIT, **overrides})


def randomize_zero_inits(model, seed: int = 0, scale: float = 0.05):
    """Give the zero-initialised adaLN-Zero modulation and final layers random values, so the
    velocity is not identically zero; returns the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return model


def make_run(run, vae, weights: dict, latest: str):
    """A run directory in the train stage's layout: each model of `weights` saved under
    checkpoints/<key> (e.g. "step-0000010/ema"), `latest` naming the newest step, and a config
    whose image VAE (scale 0.5) is the folder `vae` (None: not recorded)."""
    from cache_schema import RunDir

    for key, model in weights.items():
        model.save_pretrained(run / "checkpoints" / key)
    (run / "checkpoints" / "latest").write_text(f"{latest}\n")
    vae_spec = {"id": str(vae) if vae else None, "kind": "image", "scale": 0.5}
    RunDir(run).write_config({"model": "tiny", "vae_spec": vae_spec})
    return run


def read_arrays(path) -> dict[str, np.ndarray]:
    """Every array of a zarr store (targets/<enc>/values|scales, pca/... included), by path."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    return {name: obj[...] for name, obj in group.members(max_depth=None) if isinstance(obj, zarr.Array)}


def store_targets(group, name: str, rows) -> torch.Tensor:
    """One encoder's targets [B,T,H,W,D] for store `rows`, rebuilt from the stored arrays (and PCA
    basis) exactly as a trainer does."""
    enc = {e["name"]: e for e in group.attrs["encoders"]}[name]
    values = group[C.values_path(name)][rows]
    scales = group[C.scales_path(name)][rows] if enc["scales"] else None
    basis = None
    if enc["pca"]:
        base = f"{C.PCA_GROUP}/{name}"
        basis = {
            "mean": group[f"{base}/{C.PCA_MEAN}"][:],
            "components": group[f"{base}/{C.PCA_COMPONENTS}"][:],
        }
    return formats.reconstruct(
        values, scales, enc["format"], enc["stored_dim"], group.attrs["grid"][0], basis
    )


def clip_frames(source, group, row: int, spec, flip: bool | None = None) -> torch.Tensor:
    """uint8 [1,T,H,W,3] of a store row, decoded independently of the extract stage from the
    video source (mirrored as the row says, unless `flip` is given)."""
    from stages.common.video import read_clip

    entry = source.entries[int(group[C.VIDEO_INDEX][row])]
    flip = bool(group[C.FLIP][row]) if flip is None else flip
    return torch.from_numpy(read_clip(entry, int(group[C.START_FRAME][row]), spec, flip=flip))[None]


def decoded_rows(store, videos, rows, frames: int, size: int = 64):
    """A store's zarr group and its `rows` as uint8 clips [len(rows),T,H,W,3] decoded from the
    video folder `videos` without the extract stage (`frames` consecutive frames, `size` px)."""
    import zarr

    from stages.common import video as V

    group = zarr.open_group(str(store), mode="r")
    source, spec = V.discover(videos), V.ClipSpec(frames=frames, stride=1, size=size)
    return group, torch.cat([clip_frames(source, group, row, spec) for row in rows])


LATENT_SHAPE = (4, 4, 8, 8)  # C, T', h, w -> grid (4, 4, 4) with patch (1, 2, 2)
GRID = (4, 4, 4)
ENCODERS = [("dino", 8), ("sam2", 16)]
CLASSES = ["left", "right"]


def signal_targets(latents: np.ndarray, maps: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Encoder-like targets with real signal: a fixed random linear map of each 2x2 latent patch;
    per encoder (unit tokens [T, H, W, D], the raw tokens' norms [T, H, W])."""
    c, t, h, w = latents.shape
    patches = (
        latents.reshape(c, t, h // 2, 2, w // 2, 2).transpose(1, 2, 4, 0, 3, 5).reshape(t, h // 2, w // 2, -1)
    )
    out = []
    for m in maps:
        feats = np.tanh(patches @ m)
        norms = np.maximum(np.linalg.norm(feats, axis=-1), 1e-6)
        out.append((feats / norms[..., None], norms))
    return out


def layout_entries(fmt: str, encoders=ENCODERS, frames: int = GRID[0]) -> list[cache_schema.EncoderEntry]:
    """Cache layout entries (schema v2) of encoders stored in format `fmt` on the DiT grid, built
    by extraction's own TargetPlan."""
    from stages.extract.models import TargetPlan

    return [
        TargetPlan(name, f"test/{name}", dim, 32, fmt, frames, native=False, pca_dims=None).entry()
        for name, dim in encoders
    ]


def make_shards(
    root,
    num_samples: int = 48,
    per_shard: int = 16,
    seed: int = 0,
    nan: bool = False,
    fmt: str = "float16",
    spec_extra: dict | None = None,
    token_norms: bool = True,
):
    """A schema-v2 shard set (tars, latents-only twin, index.json files) written with the packer's
    own writers: latents with a class signal, targets that are a function of the latents, and
    their token norms (without `token_norms`: as packed from a store written before norms were kept)."""
    rng = np.random.default_rng(seed)
    maps = [
        np.random.default_rng(100 + i).normal(size=(LATENT_SHAPE[0] * 4, d))
        for i, (_, d) in enumerate(ENCODERS)
    ]
    entries = layout_entries(fmt)
    if not token_norms:
        entries = [dataclasses.replace(e, raw_tokens=None) for e in entries]
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
            targets, norms = {}, {}
            for (name, _), (tgt, n) in zip(
                ENCODERS, signal_targets(np.nan_to_num(latent), maps), strict=True
            ):
                values, scales = formats.encode(torch.from_numpy(tgt.astype(np.float32)), fmt)
                targets[name] = (values.numpy(), None if scales is None else scales.numpy())
                if token_norms:
                    norms[name] = n.astype(np.float16)
            meta = {"video": f"v{i}.mp4", "start_frame": 0, "flip": False, "clip_index": i, "label": label}
            samples.append(clip_sample(i, latent.astype(np.float16), targets, label, meta, norms))
            lean_samples.append(clip_sample(i, latent.astype(np.float16), {}, label, meta))
        name = C.SHARD_PATTERN.format(s // per_shard)
        full.append(write_tar(str(root / name), samples))
        lean.append(write_tar(str(root / C.LATENTS_ONLY_DIR / name), lean_samples))
    layout = CacheLayout(
        fingerprint=cache_schema.content_fingerprint(spec, derived),
        spec=spec,
        derived=derived,
        encoders=tuple(entries),
        grid=tuple(GRID),
        latent_shape=tuple(LATENT_SHAPE),
        class_names=CLASSES,
        patch_size=(1, 2, 2),
    )
    order = {"kind": "permutation", "seed": 0}
    write_index(str(root / C.LATENTS_ONLY_DIR), shard_index(layout, lean, order=order, latents_only=True))
    lean_info = {
        "dir": C.LATENTS_ONLY_DIR,
        "num_samples": num_samples,
        "bytes": sum(e["bytes"] for e in lean),
    }
    write_index(str(root), shard_index(layout, full, order=order, pca_files={}, latents_only=lean_info))
    return root
