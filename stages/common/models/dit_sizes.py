"""VideoDiTs of the named sizes (DiT/Latte widths and depths, stages.common.registry), kept out of
dit.py so that module imports nothing else of this package (`pipeline export` ships it as-is)."""

from __future__ import annotations

import torch

from stages.common.models.dit import VideoDiT
from stages.common.registry import MODEL_SIZES  # name -> (hidden size, depth, heads)


def size_patch(name: str) -> int:
    """The patch of a named size: "B/2" -> 2, "mini/4" -> 4; a name without one ("tiny") has 2."""
    return int(name.split("/")[1]) if "/" in name else 2


def build_video_dit(name: str, **config) -> VideoDiT:
    """A VideoDiT of a named size ("S/2", "B/2", "L/2", "XL/2", "tiny"); `config` sets the rest.

    Pass `gradient_checkpointing=True` to enable activation checkpointing (not stored in config).
    """
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown VideoDiT size {name!r}; known: {', '.join(MODEL_SIZES)}")
    checkpointing = bool(config.pop("gradient_checkpointing", False))
    hidden, depth, heads = MODEL_SIZES[name]
    patch = size_patch(name)
    values = {"hidden_size": hidden, "depth": depth, "num_heads": heads, "patch_size": patch}
    values.update(config)
    model = VideoDiT(**values)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def _count_train_flops(hidden: int, depth: int, heads: int, patch: int, latent_shape) -> int:
    """FLOPs of one clip's forward + backward (torch.utils.flop_counter), on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    c, t, h, w = (int(v) for v in latent_shape)
    with torch.device("meta"):
        model = VideoDiT(
            in_channels=c, num_frames=t, sample_size=(h, w), patch_size=patch,
            hidden_size=hidden, depth=depth, num_heads=heads,
        )  # fmt: skip
        x, time = torch.randn(1, c, t, h, w), torch.rand(1)
    with FlopCounterMode(display=False) as counter:
        model(x, time).float().pow(2).mean().backward()
    return counter.get_total_flops()


def train_tflop_per_clip(name: str, latent_shape) -> float:
    """TFLOP of one training step per clip (forward + backward, no alignment head) of the named size
    on latents [C, T', h, w], counted with torch.utils.flop_counter on the meta device (no memory,
    no compute). Blocks alternate spatial and temporal attention, so the count is linear in depth:
    two shallow models (2 and 4 blocks) give it for any depth, exactly and in well under a second."""
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown VideoDiT size {name!r}; known: {', '.join(MODEL_SIZES)}")
    hidden, depth, heads = MODEL_SIZES[name]
    patch = size_patch(name)
    two, four = (_count_train_flops(hidden, d, heads, patch, latent_shape) for d in (2, 4))
    return (two + (four - two) * (depth - 2) / 2) / 1e12
