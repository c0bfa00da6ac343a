"""The frozen models of stage one and the work on one batch: VAE latents and fused targets.

Loading happens before anything else so that a missing weight fails at once; the token grid
follows from the clip spec and the VAE (including causal video VAEs with temporal compression).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stages.common import video as V
from stages.common.encoders import VideoMAEEncoder, load_encoder
from stages.common.resample import causal_temporal_mean, fuse, to_target
from stages.common.vae import VAEWrapper

from .config import ExtractConfig


class ExtractError(RuntimeError):
    """Extraction cannot go on (bad config, NaN features, mismatched existing store)."""


@dataclass
class Models:
    vae: VAEWrapper
    encoders: dict[str, Any]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_sources(cfg: ExtractConfig) -> dict[str, str | None]:
    """Where each model comes from: a preset's local folders (``tiny``: tiny models;
    ``random-full``: full-size random copies of the defaults) or the user's ids/paths.
    Explicit flags win over the preset."""
    sources: dict[str, str | None] = {
        "vae": cfg.vae,
        "dino": cfg.dino_model,
        "sam2": cfg.sam2_model,
        "videomae": cfg.videomae_model,
    }
    default_vae = cfg.vae == ExtractConfig.vae  # an explicit --vae wins over the preset
    if cfg.preset == "tiny":
        from stages.common.presets import tiny_models

        tiny = tiny_models()
        if default_vae:
            sources["vae"] = tiny["video_vae" if cfg.vae_kind == "video" else "vae"]
        for name in ("dino", "sam2", "videomae"):
            sources[name] = sources[name] or tiny[name]
    elif cfg.preset == "random-full":
        from stages.common.presets import full_size_random_models

        # only what this run uses (each is a few hundred MB); no full-size video VAE exists here
        wanted = [n for n in ("dino", "sam2", "videomae") if n in cfg.encoders and not sources[n]]
        if default_vae and cfg.vae_kind == "image":
            wanted.insert(0, "vae")
        full = full_size_random_models(names=wanted)
        for name, path in full.items():
            sources[name] = path
    return sources


def load_models(cfg: ExtractConfig, device: torch.device) -> Models:
    sources = model_sources(cfg)
    sizes = {"dino": cfg.dino_size, "sam2": cfg.sam2_size, "videomae": cfg.videomae_size}
    scale = cfg.latent_scale
    if scale is None and cfg.vae_kind == "image":
        scale = 0.18215  # the SD VAE's factor (Latte); video VAEs carry their own in their config
    vae = VAEWrapper.load(sources["vae"], kind=cfg.vae_kind, scale=scale, device=device)
    encoders = {}
    for name in cfg.encoders:
        encoders[name] = load_encoder(name, sources.get(name), device=device, input_size=sizes.get(name))
    return Models(vae=vae, encoders=encoders)


def causal_factor(vae: VAEWrapper) -> int:
    """Temporal compression k of a causal video VAE (frame 0 alone, then k frames per latent
    step), or 1 when latent steps are plain frames (image VAE, frame by frame)."""
    return vae.temporal_factor if vae.kind == "video" and vae.temporal_factor > 1 else 1


def latent_frames(frames: int, vae: VAEWrapper) -> int:
    """T' for a clip of ``frames`` frames; a clear error when the clip does not fit the VAE."""
    k = vae.temporal_factor
    if causal_factor(vae) > 1:
        if frames < 1 or (frames - 1) % k:
            fits = ", ".join(str(1 + k * j) for j in range(1, 5))
            raise ExtractError(
                f"--frames {frames} does not fit the causal video VAE '{vae.model_id}' (temporal "
                f"compression {k}): it encodes frame 0 alone and then {k} frames per latent step, so "
                f"clips need 1 + {k}*j frames, e.g. {fits}"
            )
        t_lat = 1 + (frames - 1) // k
    elif k > 1:
        if frames % k:
            raise ExtractError(f"--frames {frames} is not a multiple of the VAE's temporal compression {k}")
        t_lat = frames // k
    else:
        t_lat = frames
    reported = vae.latent_frames(frames)
    if reported != t_lat:
        raise ExtractError(
            f"the VAE '{vae.model_id}' reports {reported} latent frames for {frames} frames, "
            f"expected {t_lat}; its temporal layout is not supported"
        )
    return t_lat


def token_grid(cfg: ExtractConfig, vae: VAEWrapper) -> tuple[tuple[int, int, int, int], tuple[int, int, int]]:
    """(latent_shape [C,T',h,w], DiT grid [T',h/p,w/p]) for this clip spec and VAE."""
    t_lat = latent_frames(cfg.frames, vae)
    h = cfg.size // vae.spatial_factor
    if h % cfg.patch_size:
        raise ExtractError(f"latent size {h} is not divisible by patch size {cfg.patch_size}; change --size")
    return (vae.latent_channels, t_lat, h, h), (t_lat, h // cfg.patch_size, h // cfg.patch_size)


def _per_frame(enc: Any, tokens: torch.Tensor, frames: torch.Tensor) -> bool:
    """An image encoder run frame by frame: one token frame per clip frame (not VideoMAE)."""
    return not isinstance(enc, VideoMAEEncoder) and tokens.shape[1] == frames.shape[1]


@torch.no_grad()
def compute_batch(
    frames: torch.Tensor, models: Models, grid: tuple[int, int, int], timings: dict[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames [B,T,H,W,3] -> (latents fp16 [B,C,T',h,w], fused targets fp16 [B,T,H,W,D]).

    With a causal video VAE, image-encoder features are averaged over the frames of each latent
    step (frame 0 alone, then groups of k); VideoMAE's tubelet grid is interpolated in time.
    """

    def timed(key: str, fn):
        if frames.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if frames.device.type == "cuda":
            torch.cuda.synchronize()
        timings[key] += time.perf_counter() - t0
        return out

    latents = timed("vae", lambda: models.vae.encode(frames))
    k = causal_factor(models.vae)
    per_encoder = {}
    for name, enc in models.encoders.items():
        tokens = timed(f"encoder:{name}", lambda enc=enc: enc.features(frames)).float()
        if k > 1 and _per_frame(enc, tokens, frames):
            # DESIGN.md 6: average an image encoder's frames over each causal latent step
            tokens = causal_temporal_mean(tokens, k)
        per_encoder[name] = to_target(tokens, grid)
    targets, _ = fuse(per_encoder, list(models.encoders))
    return latents.float().cpu().numpy(), targets.float().cpu().numpy()


def measured_bytes_per_clip(cfg: ExtractConfig, source, refs, spec_clip, models: Models, grid) -> float:
    """Run the models on one clip and compress its arrays with the chosen codec, one chunk each
    (as the store does): the dry run's size projection rests on real features, not a guess."""
    from .store import compressors_for  # noqa: PLC0415 - only the dry run needs it

    clip = next((r for r in refs[:8] if _try_read(source, r, spec_clip) is not None), None)
    if clip is None:
        raise ExtractError("--dry-run could not decode any of the first clips to measure their size")
    frames = torch.from_numpy(_try_read(source, clip, spec_clip))[None].to(resolve_device(cfg.device))
    latents, targets = compute_batch(frames, models, grid, defaultdict(float))
    codecs = compressors_for(cfg.codec, cfg.codec_level) or []
    total = 0
    for array in (latents[0].astype(np.float16), targets[0].astype(np.float16)):
        data = array.tobytes()
        for codec in codecs:
            data = _encode_bytes(codec, data, array.dtype.itemsize)
        total += len(data)
    return float(total)


def _encode_bytes(codec, data: bytes, itemsize: int) -> bytes:
    """Compress with the numcodecs equivalent of a zarr v3 codec (same algorithm and settings)."""
    import numcodecs

    config = codec.to_dict()["configuration"]
    if config.get("cname") is not None:  # blosc
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[
            str(getattr(config["shuffle"], "value", config["shuffle"]))
        ]
        compressor = numcodecs.Blosc(
            cname=str(getattr(config["cname"], "value", config["cname"])),
            clevel=config["clevel"],
            shuffle=shuffle,
            typesize=itemsize,
        )
    else:
        compressor = numcodecs.Zstd(level=config["level"])
    return compressor.encode(data)


def _try_read(source, ref, spec_clip):
    try:
        return V.read_clip(source.entries[ref.video_index], ref.start_frame, spec_clip)
    except V.VideoDecodeError:
        return None
