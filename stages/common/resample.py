"""Resample encoder tokens onto the DiT token grid and L2-normalise them.

Our definition (DESIGN.md section 6): every encoder's patch tokens ``[B, t, h, w, D]`` are
brought to the DiT grid ``(T, H, W)`` = (latent frames, latent h / patch, latent w / patch).

- Space: bilinear per frame (``align_corners=False``), antialiased when shrinking so a fine
  grid (SAM2 at stride 16) is averaged rather than point-sampled.
- Time: if ``t`` is a multiple of ``T`` (an image encoder run per frame with a VAE that
  compresses time by ``k = t / T``), average each group of ``k`` frames, i.e. exactly the
  frames that one latent step covers. Otherwise linear interpolation with
  ``align_corners=False``, which puts a VideoMAE tubelet's value at the centre of the frames
  it covers (tubelet ``i`` of size 2 sits at frame ``2i + 0.5``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cache_schema.formats import resample_time


def _check_tokens(tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 5:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a tensor [B,t,h,w,D], got {shape}")


def resample_spatial(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B,t,h,w,D] -> [B,t,H,W,D], bilinear per frame, antialiased when downsampling."""
    _check_tokens(tokens)
    b, t, h, w, d = tokens.shape
    hh, ww = int(size[0]), int(size[1])
    if (h, w) == (hh, ww):
        return tokens
    x = tokens.reshape(b * t, h, w, d).permute(0, 3, 1, 2)
    antialias = hh < h or ww < w
    x = F.interpolate(x, size=(hh, ww), mode="bilinear", align_corners=False, antialias=antialias)
    return x.permute(0, 2, 3, 1).reshape(b, t, hh, ww, d)


def resample_temporal(tokens: torch.Tensor, frames: int) -> torch.Tensor:
    """[B,t,h,w,D] -> [B,T,h,w,D]: mean over groups of k = t/T frames, else linear interpolation.

    The rule is the cache contract's (cache_schema.formats.resample_time, which the trainer's
    on-device rebuild uses too); this checks the arguments first."""
    _check_tokens(tokens)
    T = int(frames)
    if T < 1:
        raise ValueError(f"target number of frames must be >= 1, got {T}")
    return resample_time(tokens, T)


def resample_to_grid(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Tokens [B,t,h,w,D] on an encoder's grid -> [B,T,H,W,D] on the DiT grid (float32)."""
    _check_tokens(tokens)
    if len(grid) != 3:
        raise ValueError(f"grid must be (T, H, W), got {tuple(grid)}")
    T, H, W = (int(g) for g in grid)
    x = tokens.float()
    x = resample_spatial(x, (H, W))
    x = resample_temporal(x, T)
    return x.contiguous()


def l2_normalize_tokens(tokens: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Unit L2 norm along the last (channel) axis; an all-zero token stays zero."""
    return tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(eps)


def to_target(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Resample to the DiT grid, then L2-normalise per token: one encoder's slice of ``targets``."""
    return l2_normalize_tokens(resample_to_grid(tokens, grid))


def causal_groups(frames: int, k: int) -> list[tuple[int, int]]:
    """``[start, stop)`` frame ranges of each latent step of a causal video VAE.

    A causal VAE with temporal compression ``k`` (CogVideoX) encodes frame 0 alone and then
    ``k`` frames per step, so a clip needs ``1 + k * j`` frames and has ``1 + j`` latent steps.
    """
    k, frames = int(k), int(frames)
    if k < 1:
        raise ValueError(f"temporal compression must be >= 1, got {k}")
    if frames < 1 or (frames - 1) % k:
        raise ValueError(
            f"{frames} frames do not fit a causal VAE with temporal compression {k}: "
            f"use 1 + {k}*j frames (e.g. {', '.join(str(1 + k * j) for j in range(1, 5))})"
        )
    return [(0, 1)] + [(1 + k * j, 1 + k * (j + 1)) for j in range((frames - 1) // k)]


def causal_temporal_mean(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Per-frame tokens [B,t,h,w,D] -> [B,1+(t-1)/k,h,w,D]: the mean over the frames of each
    causal latent step (frame 0 alone, then groups of ``k``), see :func:`causal_groups`."""
    _check_tokens(tokens)
    b, t, h, w, d = tokens.shape
    causal_groups(t, k)  # validates t against k
    if k == 1:
        return tokens
    rest = tokens[:, 1:].reshape(b, (t - 1) // k, k, h, w, d).mean(dim=2)
    return torch.cat([tokens[:, :1], rest], dim=1)
