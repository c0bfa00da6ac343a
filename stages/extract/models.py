"""The frozen models of stage one and the work on one batch: VAE latents and per-encoder targets.

Loading happens before anything else so that a missing weight fails at once; the token grid
follows from the clip spec and the VAE (including causal video VAEs with temporal compression).
Each encoder's stored quantity is decided here (`TargetPlan`): tokens on the DiT grid,
L2-normalised, or - for an encoder whose own time grid is coarser than the DiT grid (VideoMAE's
tubelets) under ``time_grid="native"`` - its own time steps, resampled in space only and not
normalised, which `cache_schema.formats.reconstruct` turns into the same targets on the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cache_schema import constants as C
from cache_schema import formats
from cache_schema.layout import EncoderEntry
from stages.common import registry as R
from stages.common.models.encoders import VideoMAEEncoder, load_encoder
from stages.common.models.text import TextEncoder
from stages.common.models.vae import VAEWrapper
from stages.common.resample import (
    causal_temporal_mean,
    l2_normalize_tokens,
    resample_spatial,
    resample_temporal,
    resample_to_grid,
)

from .config import ExtractConfig


class ExtractError(RuntimeError):
    """Extraction cannot go on (bad config, NaN features, mismatched existing store, budget)."""


@dataclass
class Models:
    vae: VAEWrapper
    encoders: dict[str, Any]
    text: TextEncoder | None = None  # --base: the pipeline's text encoder (captions -> embeddings)


@dataclass(frozen=True)
class TargetPlan:
    """How one encoder's targets are stored (one `encoders` layout entry of the store)."""

    name: str
    id: str
    dim: int
    input_size: int
    format: str
    time_frames: int  # T_e
    native: bool  # own (coarser) time grid, not L2-normalised
    pca_dims: int | None

    @property
    def stored_dim(self) -> int:
        return self.pca_dims or self.dim

    @property
    def raw_tokens(self) -> str:
        """How a reader rebuilds the raw (unnormalised) tokens: stored norms, or the values themselves."""
        return C.RAW_IN_VALUES if self.native else C.RAW_FROM_NORMS

    def entry(self) -> EncoderEntry:
        return EncoderEntry.build(self.name, self.dim, self.format, self.time_frames, self.pca_dims,
                                  self.raw_tokens, id=self.id, input_size=self.input_size)  # fmt: skip

    def spec(self, pca_fit_clips: int) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "input_size": self.input_size,
            "dim": self.dim,
            "format": self.format,
            "time_grid": "native" if self.native else "dit",
            "pca_dims": self.pca_dims,
            "pca_fit_clips": pca_fit_clips if self.pca_dims else None,
            C.RAW_TOKENS: self.raw_tokens,
        }


@dataclass
class Features:
    """One batch on the model's device: fp16 latents, each encoder's stored quantity (float32) and,
    for encoders stored L2-normalised, each token's norm before normalising [B,T,H,W] (float32)."""

    latents: torch.Tensor
    quantities: dict[str, torch.Tensor]
    norms: dict[str, torch.Tensor]


def model_sources(cfg: ExtractConfig) -> dict[str, str | None]:
    """Where each model comes from: a preset's local folders (``tiny``: tiny models;
    ``random-full``: full-size random copies of the defaults) or the user's ids/paths, else the
    registry's hub ids (VAE None: `VAEWrapper.load` takes DEFAULT_VAE[kind], with the video VAE's
    subfolder). Explicit flags win over the preset."""
    sources: dict[str, str | None] = {
        "vae": cfg.vae,
        "dino": cfg.dino_model,
        "sam2": cfg.sam2_model,
        "videomae": cfg.videomae_model,
        "hog": cfg.hog_model,
    }
    default_vae = cfg.vae is None
    if cfg.preset == "tiny":
        from stages.common.presets import tiny_models

        tiny = tiny_models()
        if default_vae:
            sources["vae"] = tiny["video_vae" if cfg.vae_kind == "video" else "vae"]
        for name in R.ENCODERS:
            sources[name] = sources[name] or tiny.get(name)  # hog has no tiny copy: it has no weights
    elif cfg.preset == "random-full":
        from stages.common.presets import full_size_random_models

        # only what this run uses (each is a few hundred MB); no full-size video VAE exists here
        wanted = [n for n in R.ENCODERS if n in cfg.encoders and not sources[n]]
        if default_vae and cfg.vae_kind == "image":
            wanted.insert(0, "vae")
        sources.update(full_size_random_models(names=wanted))
    for name, defaults in R.ENCODERS.items():
        sources[name] = sources[name] or defaults.hub_id
    return sources


def load_models(cfg: ExtractConfig, device: torch.device) -> Models:
    """VAE first, then the clip/VAE fit is checked (nothing else loaded yet), then the encoders."""
    sources = model_sources(cfg)
    scale = cfg.latent_scale
    if scale is None and cfg.vae_kind == "image":
        scale = R.SD_LATENT_SCALE  # video VAEs carry their own scaling_factor
    vae = VAEWrapper.load(sources["vae"], kind=cfg.vae_kind, scale=scale, device=device)
    token_grid(cfg, vae)  # --size / --frames against this VAE, before the encoders load
    sizes = {n: getattr(cfg, f"{n}_size") for n in R.ENCODERS}
    # DINOv2 takes square frames: for HxW clips, the longer side's grid (no axis is upsampled)
    side = max(cfg.hw) // vae.spatial_factor // cfg.patch_size
    encoders = {}
    for name in cfg.encoders:
        enc = load_encoder(name, sources[name], device=device, input_size=sizes[name])
        if name == "dino" and cfg.dino_size is None and enc.input_size != side * enc.patch:
            # REPA: DINOv2's patch grid equals the DiT grid (224 px for 256 px clips), no resampling
            enc = type(enc)(enc.model, enc.model_id, side * enc.patch, device=device)
        encoders[name] = enc
    text = TextEncoder.load(cfg.base, device, cfg.text_max_length) if cfg.base else None
    return Models(vae=vae, encoders=encoders, text=text)


def causal_factor(vae: VAEWrapper) -> int:
    """Temporal compression k of a causal video VAE (frame 0 alone, then k frames per latent
    step), or 1 when latent steps are plain frames (image VAE, frame by frame)."""
    return vae.temporal_factor if vae.kind in R.CAUSAL_VAE_KINDS and vae.temporal_factor > 1 else 1


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
    unit = vae.spatial_factor * cfg.patch_size
    for axis, n in cfg.axes():
        if n % unit:
            fits = ", ".join(str(unit * j) for j in (max(1, n // unit), n // unit + 1))
            raise ExtractError(
                f"size: {axis}{n} is not a multiple of {unit} (VAE '{vae.model_id}' spatial factor "
                f"{vae.spatial_factor} x patch {cfg.patch_size}); use e.g. {fits}"
            )
    t_lat = latent_frames(cfg.frames, vae)
    h, w = (n // vae.spatial_factor for n in cfg.hw)
    return (vae.latent_channels, t_lat, h, w), (t_lat, h // cfg.patch_size, w // cfg.patch_size)


def plan_targets(cfg: ExtractConfig, models: Models, grid: tuple[int, int, int]) -> list[TargetPlan]:
    """Per encoder: format, stored time grid and PCA dims; refuses PCA dims above an encoder's dim."""
    dims = cfg.pca_dims_by_encoder()
    plans = []
    for name, enc in models.encoders.items():
        own_t = enc.grid(cfg.frames)[0] if isinstance(enc, VideoMAEEncoder) else cfg.frames
        native = cfg.time_grid == "native" and own_t < grid[0]
        k = dims.get(name)
        if k is not None and k > enc.dim:
            raise ExtractError(f"pca_dims: {name}={k} exceeds the encoder's feature dim {enc.dim}")
        plans.append(
            TargetPlan(
                name=name,
                id=enc.model_id,
                dim=enc.dim,
                input_size=enc.input_size,
                format=cfg.target_format,
                time_frames=own_t if native else grid[0],
                native=native,
                pca_dims=k,
            )
        )
    return plans


def _per_frame(enc: Any, tokens: torch.Tensor, frames: torch.Tensor) -> bool:
    """An image encoder run frame by frame: one token frame per clip frame (not VideoMAE)."""
    return not isinstance(enc, VideoMAEEncoder) and tokens.shape[1] == frames.shape[1]


def encoder_input(enc: Any, frames: torch.Tensor) -> torch.Tensor:
    """uint8 [B,T,H,W,3] as `enc` should see them. A square-input encoder (dino, sam2, videomae) on
    non-square clips (--size HxW) gets the whole frame resized to its S x S input, aspect not kept:
    its own centre crop would drop the sides, and the tokens resampled to the clip's H x W grid
    would no longer lie under the DiT tokens they align. Square clips, and hog at the clip's own
    size (input size 0), pass unchanged."""
    b, t, h, w, _ = frames.shape
    size = int(getattr(enc, "input_size", 0) or 0)
    if h == w or not size:
        return frames
    mode = enc.resize_mode
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    x = frames.reshape(b * t, h, w, 3).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode=mode, antialias=True, **kw)
    x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).reshape(b, t, size, size, 3)


def _timed(key: str, device: torch.device, timings: dict[str, float], fn):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
    return out


@torch.no_grad()
def compute_batch(
    frames: torch.Tensor,
    models: Models,
    plans: list[TargetPlan],
    grid: tuple[int, int, int],
    timings: dict[str, float],
) -> Features:
    """uint8 frames [B,T,H,W,3] -> latents and each encoder's stored quantity, on the device.

    With a causal video VAE, image-encoder features are averaged over the frames of each latent
    step (frame 0 alone, then groups of k); VideoMAE's tubelets are interpolated in time
    (DiT grid) or kept (native grid).
    """
    latents = _timed("vae", frames.device, timings, lambda: models.vae.encode(frames))
    k = causal_factor(models.vae)
    quantities, norms = {}, {}
    for plan in plans:
        enc = models.encoders[plan.name]
        tokens = _timed(
            f"encoder:{plan.name}",
            frames.device,
            timings,
            lambda enc=enc: enc.features(encoder_input(enc, frames)),
        )
        tokens = tokens.float()
        if k > 1 and _per_frame(enc, tokens, frames):
            tokens = causal_temporal_mean(tokens, k)  # DESIGN.md 6
        if plan.native:
            quantities[plan.name] = resample_spatial(tokens, grid[1:]).contiguous()
        else:  # resample_to_grid then L2-normalise, as resample.to_target, keeping the norms
            raw = resample_to_grid(tokens, grid)
            norms[plan.name] = raw.norm(dim=-1)
            quantities[plan.name] = l2_normalize_tokens(raw)
    return Features(latents=latents, quantities=quantities, norms=norms)


def exact_target(quantity: torch.Tensor, plan: TargetPlan, grid: tuple[int, int, int]) -> torch.Tensor:
    """The float32 target on the DiT grid that a stored quantity stands for (fidelity reference)."""
    if not plan.native:
        return quantity
    return l2_normalize_tokens(resample_temporal(quantity, grid[0]))


def encode_quantity(
    quantity: torch.Tensor, plan: TargetPlan, basis: dict[str, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PCA-project (if the plan has PCA) then quantise with the plan's format, on the device."""
    x = formats.pca_project(quantity, basis) if plan.pca_dims else quantity
    return formats.encode(x, plan.format)


def encode_batch(
    features: Features,
    plans: list[TargetPlan],
    bases: dict[str, dict[str, torch.Tensor]],
    timings: dict[str, float],
) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray | None]], dict[str, np.ndarray]]:
    """Features -> compact CPU arrays: latents fp16, per encoder (values, scales | None), and the
    float16 token norms of encoders stored L2-normalised."""
    t0 = time.perf_counter()
    targets = {}
    for plan in plans:
        values, scales = encode_quantity(features.quantities[plan.name], plan, bases.get(plan.name))
        targets[plan.name] = (values.cpu().numpy(), None if scales is None else scales.cpu().numpy())
    norms = {name: formats.encode_norms(n).cpu().numpy() for name, n in features.norms.items()}
    latents = features.latents.to(torch.float16).cpu().numpy()
    timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - t0
    return latents, targets, norms


def nonfinite_rows(features: Features) -> list[int]:
    """Batch rows with a NaN/Inf in the latents or any encoder's quantity (one device sync)."""
    bad = ~torch.isfinite(features.latents.float()).flatten(1).all(1)
    for q in features.quantities.values():
        bad |= ~torch.isfinite(q).flatten(1).all(1)
    return bad.nonzero().flatten().cpu().tolist()
