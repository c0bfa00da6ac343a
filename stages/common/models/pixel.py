"""Pixel space as an exact autoencoder: space-to-depth patchify (``kind="pixel"``).

Why: a latent diffusion demo is only as good as its autoencoder, and a randomly initialised VAE
decodes every sample to noise. Pixel-space diffusion transformers (JiT, Li & He 2025, "Back to
Basics: Let Denoising Generative Models Denoise") skip the autoencoder: the "latent" of a frame
is its pixels, rearranged so that each f x f x 3 block becomes one position with 3 f^2 channels
(``torch.nn.functional.pixel_unshuffle``). That map is invertible, so decode(encode(x)) == x
bit for bit for uint8 frames (values k/127.5 - 1 survive float16 with room to spare), and the
token grid of a 64 x 64 clip with f = 8 and DiT patch 2 is the same 4 x 4 grid the tiny VAE
gives. It exposes the interface of `stages.common.models.vae.VAEWrapper` (encode, decode, spec, shapes),
so extract, sample and the trainer's decoding use it unchanged.

Ids: ``patchify-F`` (F = 2, 4, 8, 16, ...); ``DEFAULT_VAE["pixel"]`` in the registry.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from stages.common.registry import DEFAULT_VAE

_ID = re.compile(r"^patchify-(\d+)$")
PIXEL_SCALE = 1.0  # pixels in [-1, 1]: std ~0.3-0.5 on natural and synthetic frames, like a scaled VAE latent


def parse_pixel_id(model_id: str | None) -> int:
    """'patchify-8' -> 8; a clear error for anything else."""
    model_id = model_id or DEFAULT_VAE["pixel"]
    match = _ID.match(str(model_id).strip())
    if not match or int(match.group(1)) < 1:
        raise ValueError(
            f"vae: {model_id!r} is not a pixel-space id; use patchify-F with F the patch side (e.g. patchify-8)"
        )
    return int(match.group(1))


class Patchify(nn.Module):
    """Frames [N, 3, H, W] in [-1, 1] <-> [N, 3 f^2, H/f, W/f]; no weights."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = int(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(x, self.factor)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(z, self.factor)
