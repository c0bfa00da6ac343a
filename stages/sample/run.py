"""Sample videos from a trained VideoDiT: ODE/SDE sampling in latent space, VAE decode, write out."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from stages.common.dit import VideoDiT
from stages.common.flow import get_sampler
from stages.sample.checkpoint import DEFAULT_LATENT_SCALE, ResolvedCheckpoint, load_model, resolve_checkpoint
from stages.sample.config import SampleConfig
from stages.sample.writers import NpzVideoWriter, write_gif_grid, write_video

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


def sample_labels(num: int, num_classes: int, class_: int | None) -> np.ndarray:
    """Labels for `num` videos: all `class_`, a balanced round-robin over classes, or -1 (none)."""
    if num_classes <= 0:
        if class_ is not None:
            raise ValueError("--class was given but the model is unconditional (num_classes=0)")
        return np.full(num, -1, dtype=np.int64)
    if class_ is not None:
        if not 0 <= class_ < num_classes:
            raise ValueError(
                f"--class {class_} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
            )
        return np.full(num, class_, dtype=np.int64)
    return np.arange(num, dtype=np.int64) % num_classes


def initial_noise(model: VideoDiT, indices: range, seed: int) -> torch.Tensor:
    """Noise for videos `indices`, each from its own seeded generator: independent of batch size."""
    c = model.config
    shape = (c.in_channels, c.num_frames, c.sample_size, c.sample_size)
    out = []
    for i in indices:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        out.append(torch.randn(shape, generator=gen))
    return torch.stack(out)


def _velocity_fn(model: VideoDiT, device: torch.device, use_amp: bool):
    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        with torch.no_grad(), amp:
            return model(x, t, y).float()

    return fn


def _load_vae(vae_id: str, kind: str, scale: float, device: torch.device):
    from stages.common.vae import VAEWrapper

    return VAEWrapper.load(vae_id, kind=kind, scale=scale, device=str(device), dtype=torch.float32)


def _output_dir(cfg: SampleConfig, resolved: ResolvedCheckpoint) -> Path:
    if cfg.out:
        return Path(cfg.out)
    assert resolved.run_dir is not None
    return resolved.run_dir / "samples"


def run_sample(cfg: SampleConfig) -> dict[str, Any]:
    """Generate `cfg.num` videos; returns the summary also written to OUT/summary.json."""
    cfg.validate()
    start = time.perf_counter()
    resolved = resolve_checkpoint(cfg.run, cfg.checkpoint, ema=cfg.ema)
    device = pick_device(cfg.device)
    use_amp = device.type == "cuda" and cfg.precision == "bf16"
    model = load_model(resolved).to(device)
    mcfg = model.config

    out = _output_dir(cfg, resolved)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))

    labels = sample_labels(cfg.num, mcfg.num_classes, cfg.class_)
    conditional = mcfg.num_classes > 0
    if (cfg.cfg != 1.0 or cfg.guidance_interval) and not conditional:
        raise ValueError(
            "--cfg / --guidance-interval need a class-conditional model; this one is unconditional"
        )

    vae_id = cfg.vae or resolved.run_config.get("vae")
    if isinstance(vae_id, str) and vae_id.strip().lower() in ("", "none", "null"):
        vae_id = None  # `--vae none`: skip decoding even if the run has a VAE
    scale = cfg.latent_scale or resolved.run_config.get("latent_scale") or DEFAULT_LATENT_SCALE
    vae_kind = cfg.vae_kind or resolved.run_config.get("vae_kind") or "image"
    vae = _load_vae(vae_id, vae_kind, float(scale), device) if vae_id else None
    if vae is None:
        log.warning("no VAE configured (--vae or the run's `vae`): writing latents only, no videos")

    sampler = get_sampler(cfg.sampler)
    extra: dict[str, Any] = {}
    if cfg.sampler == "euler-maruyama":
        extra = {
            "diffusion_norm": cfg.diffusion_norm,
            "generator": torch.Generator(device).manual_seed(cfg.seed),
        }
    velocity = _velocity_fn(model, device, use_amp)

    video_dir = out / "videos"
    npz = None
    grid: list[np.ndarray] = []
    latents_all: list[np.ndarray] = []
    keep_latents = vae is None or cfg.save_latents
    bar = tqdm(total=cfg.num, desc="sample", unit="video")
    try:
        for lo in range(0, cfg.num, cfg.batch_size):
            idx = range(lo, min(lo + cfg.batch_size, cfg.num))
            noise = initial_noise(model, idx, cfg.seed).to(device)
            y = torch.from_numpy(labels[lo : idx.stop]).to(device) if conditional else None
            z = sampler(
                velocity,
                noise,
                num_steps=cfg.steps,
                y=y,
                cfg_scale=cfg.cfg,
                guidance_interval=cfg.guidance_interval,
                null_class=model.null_class,
                **extra,
            )
            if not torch.isfinite(z).all():
                raise FloatingPointError(f"non-finite latents in batch starting at video {lo}")
            if keep_latents:
                latents_all.append(z.cpu().numpy())
            if vae is not None:
                with torch.no_grad():
                    frames = vae.decode(z).cpu().numpy()
                if npz is None:
                    video_dir.mkdir(exist_ok=True)
                    npz = NpzVideoWriter(out / "videos.npz", cfg.num, labels)
                npz.write(frames)
                for i, video in zip(idx, frames, strict=True):
                    suffix = f"_c{labels[i]}" if conditional else ""
                    write_video(video_dir / f"{i:06d}{suffix}.mp4", video, cfg.fps)
                grid.extend(frames[: max(0, cfg.grid_max - len(grid))])
            bar.update(len(idx))
    finally:
        bar.close()
        if npz is not None:
            npz.close()

    outputs: dict[str, str] = {"config": str(out / "config.yaml")}
    if grid:
        write_gif_grid(out / "grid.gif", np.stack(grid), cfg.fps)
        outputs.update(videos=str(video_dir), grid=str(out / "grid.gif"), npz=str(out / "videos.npz"))
    if keep_latents:
        np.savez(out / "latents.npz", latents=np.concatenate(latents_all), labels=labels)
        outputs["latents"] = str(out / "latents.npz")
    seconds = time.perf_counter() - start
    summary = {
        "num": cfg.num,
        "weights": resolved.weights,
        "weights_dir": str(resolved.weights_dir),
        "run_dir": str(resolved.run_dir) if resolved.run_dir else None,
        "vae": vae_id,
        "vae_kind": vae_kind if vae is not None else None,
        "latent_scale": float(scale),
        "decoded": vae is not None,
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "cfg": cfg.cfg,
        "guidance_interval": cfg.guidance_interval,
        "device": str(device),
        "class_counts": {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True), strict=True)},
        "seconds": round(seconds, 3),
        "videos_per_s": round(cfg.num / seconds, 4),
        "outputs": outputs,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
