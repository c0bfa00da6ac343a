"""The one definition of "generate N videos' latents from a model", shared by `pipeline sample`
and the trainer's periodic sample GIFs, so a GIF seen during training can be reproduced exactly
with `pipeline sample` (same seed, labels, sampler, convention, steps).

Reproducibility rules: video i's initial noise depends only on (seed, i), and so does its
Euler-Maruyama noise (one generator per video), so the batch size never changes a sample; labels
are a balanced round-robin over the classes (video i has class i % num_classes) unless one class is
asked for.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from stages.common.flow import get_sampler
from stages.common.models.adapter import Condition, VideoModelAdapter
from stages.common.progress import tqdm
from stages.common.registry import SAMPLER_CONVENTIONS

_NOISE_STRIDE = 1_000_003  # initial-noise seed of video i: seed * _NOISE_STRIDE + i (kept from `sample`)


def sample_labels(num: int, num_classes: int, class_: int | None = None) -> np.ndarray:
    """Labels for `num` videos: all `class_`, a balanced round-robin over classes, or -1 (none)."""
    if num_classes <= 0:
        if class_ is not None:
            raise ValueError(f"class {class_} was given but the model is unconditional (num_classes=0)")
        return np.full(num, -1, dtype=np.int64)
    if class_ is not None:
        if not 0 <= class_ < num_classes:
            raise ValueError(
                f"--class {class_} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
            )
        return np.full(num, class_, dtype=np.int64)
    return np.arange(num, dtype=np.int64) % num_classes


def _latent_shape(adapter: VideoModelAdapter, shape: Sequence[int] | None) -> tuple[int, ...]:
    if shape is not None:
        return tuple(int(s) for s in shape)
    if adapter.latent_shape is None:
        raise ValueError(f"a {adapter.family} model has no built-in latent shape: pass shape=(C, T, h, w)")
    return tuple(adapter.latent_shape)


def initial_noise(
    adapter: VideoModelAdapter, indices: Sequence[int], seed: int, shape: Sequence[int] | None = None
) -> torch.Tensor:
    """Noise [len(indices), C, T, h, w] on the CPU, video i from its own generator seeded by
    (seed, i): independent of batch size. `shape` (C, T, h, w) defaults to the model's own."""
    size = _latent_shape(adapter, shape)
    out = [
        torch.randn(size, generator=torch.Generator().manual_seed(seed * _NOISE_STRIDE + i)) for i in indices
    ]
    return torch.stack(out)


def sde_generators(indices: Sequence[int], seed: int) -> list[torch.Generator]:
    """One CPU generator per video for Euler-Maruyama's step noise, seeded by (seed, i) through a
    SeedSequence so the stream never coincides with an initial-noise stream."""
    gens = []
    for i in indices:
        state = np.random.SeedSequence([seed, i, 1]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1))
    return gens


def _velocity_fn(
    adapter: VideoModelAdapter, module: torch.nn.Module, device: torch.device, autocast: bool
) -> Callable:
    """`module` as a velocity field through its adapter; bf16 autocast only on CUDA (CPU always
    runs fp32)."""
    use_amp = autocast and device.type == "cuda"

    def fn(x: torch.Tensor, t: torch.Tensor, condition: Condition | None) -> torch.Tensor:
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        with torch.no_grad(), amp:
            return adapter.forward(module, x, t, condition or Condition()).velocity.float()

    return fn


def _text_condition(
    adapter: VideoModelAdapter, text: Condition | None, num: int, class_: int | None
) -> Condition | None:
    """The prompts of a text model's `num` videos (refusing a missing or mis-sized one); None for a
    class model, which refuses prompts."""
    if adapter.conditioning.kind != "text":
        if text is not None:
            raise ValueError(f"a {adapter.family} model takes class ids, not text prompts")
        return None
    if class_ is not None:
        raise ValueError(f"a {adapter.family} model takes text prompts, not --class")
    if text is None or text.text_embeds is None or text.text_mask is None:
        raise ValueError(
            f"a {adapter.family} model is text-conditioned: give the prompts' embeddings and mask"
        )
    if len(text.text_embeds) != num or len(text.text_mask) != num:
        raise ValueError(f"{len(text.text_embeds)} prompt embeddings for {num} videos: give one per video")
    return text


def _check(num: int, batch_size: int, steps: int, convention: str) -> None:
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if convention not in SAMPLER_CONVENTIONS:
        raise ValueError(
            f"unknown sampler convention {convention!r}; choose from {', '.join(SAMPLER_CONVENTIONS)}"
        )


@torch.no_grad()
def generate_latents(
    adapter: VideoModelAdapter,
    module: torch.nn.Module,
    num: int,
    *,
    steps: int,
    sampler: str = "euler",
    convention: str = "repa",
    seed: int = 0,
    cfg_scale: float = 1.0,
    guidance_interval: Sequence[float] | None = None,
    class_: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    autocast: bool = False,
    diffusion_norm: float = 1.0,
    progress: bool = False,
    shape: Sequence[int] | None = None,
    text: Condition | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Sample `num` latents from `module` (the adapter's network or its EMA copy, already on
    `device`; None: the module's device), its velocity through `adapter.forward`, on the time grid
    shifted by the model's objective (Objective.shift; 1: none).

    A text model takes `text`: the prompts' embeddings [num, L, D] and mask [num, L] (video i gets
    prompt i; guidance's null branch is the adapter's empty prompt).
    Returns (float32 latents [num, C, T, h, w] on the CPU, int64 labels [num], -1 if unconditional).
    The module runs in eval mode and is put back in its previous mode afterwards.
    """
    _check(num, batch_size, steps, convention)
    sample_fn = get_sampler(sampler)
    is_sde = sample_fn is get_sampler("euler-maruyama")
    device = torch.device(device) if device is not None else next(module.parameters()).device
    texts = _text_condition(adapter, text, num, class_)
    labels = sample_labels(num, adapter.conditioning.num_classes if texts is None else 0, class_)
    conditional = adapter.conditioning.conditional
    if (cfg_scale != 1.0 or guidance_interval) and not conditional:
        raise ValueError(
            "cfg_scale (--cfg) / guidance_interval need a class-conditional model; this one is unconditional"
        )
    velocity = _velocity_fn(adapter, module, device, autocast)
    shift = {"shift": adapter.objective.shift} if adapter.objective.shift != 1.0 else {}
    out: list[torch.Tensor] = []
    was_training = module.training
    module.eval()
    try:
        for lo in tqdm(range(0, num, batch_size), desc="sample", disable=not progress, leave=False):
            idx = range(lo, min(lo + batch_size, num))
            noise = initial_noise(adapter, idx, seed, shape).to(device)
            y = None
            if texts is not None:
                y = Condition(
                    text_embeds=texts.text_embeds[idx.start : idx.stop].to(device),
                    text_mask=texts.text_mask[idx.start : idx.stop].to(device),
                )
            elif conditional:
                y = Condition(class_labels=torch.from_numpy(labels[idx.start : idx.stop]).to(device))
            extra = (
                {"diffusion_norm": diffusion_norm, "generator": sde_generators(idx, seed)} if is_sde else {}
            )
            z = sample_fn(
                velocity,
                noise,
                num_steps=steps,
                y=y,
                cfg_scale=cfg_scale,
                guidance_interval=guidance_interval,
                null_by_drop=True,
                convention=convention,
                **shift,
                **extra,
            )
            if not torch.isfinite(z).all():
                raise FloatingPointError(f"non-finite latents in the batch starting at video {lo}")
            out.append(z.float().cpu())
    finally:
        module.train(was_training)
    return torch.cat(out), labels


def grid_frames(videos: np.ndarray, pad: int = 2) -> np.ndarray:
    """[N, T, H, W, 3] -> [T, rows*(H+pad)-pad, cols*(W+pad)-pad, 3], near-square, white gaps."""
    n, t, h, w, _ = videos.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((t, rows * (h + pad) - pad, cols * (w + pad) - pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[:, r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = videos[i]
    return out


def write_gif_grid(path: Path, videos: np.ndarray, fps: int) -> None:
    """An animated GIF showing the videos side by side, looping."""
    from PIL import Image

    frames = [Image.fromarray(f) for f in grid_frames(videos)]
    frames[0].save(
        path,
        save_all=True,
        append_images=frames[1:],
        duration=max(1, round(1000 / fps)),
        loop=0,
        optimize=False,
    )


def filmstrip(videos: np.ndarray, pad: int = 2, scale: int = 2) -> np.ndarray:
    """[N, T, H, W, 3] -> one still image: a row per video, its frames left to right (white gaps),
    each pixel repeated `scale` times. Why: a PNG shows motion on a page where a GIF does not play
    (the README, a PDF), and nearest-neighbour upscaling keeps small frames sharp."""
    n, t, h, w, _ = videos.shape
    out = np.full((n * (h + pad) - pad, t * (w + pad) - pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        for j in range(t):
            out[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = videos[i, j]
    return out.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else out


def write_filmstrip(path: Path, videos: np.ndarray, scale: int = 2) -> None:
    """A PNG filmstrip of the videos (see `filmstrip`)."""
    from PIL import Image

    Image.fromarray(filmstrip(videos, scale=scale)).save(path)
