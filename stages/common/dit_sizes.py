"""VideoDiTs of the named sizes (DiT/Latte widths and depths, stages.common.registry), kept out of
dit.py so that module imports nothing else of this package (`pipeline export` ships it as-is)."""

from __future__ import annotations

from stages.common.dit import VideoDiT
from stages.common.registry import MODEL_SIZES  # name -> (hidden size, depth, heads)


def build_video_dit(name: str, **config) -> VideoDiT:
    """A VideoDiT of a named size ("S/2", "B/2", "L/2", "XL/2", "tiny"); `config` sets the rest.

    Pass `gradient_checkpointing=True` to enable activation checkpointing (not stored in config).
    """
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown VideoDiT size {name!r}; known: {', '.join(MODEL_SIZES)}")
    checkpointing = bool(config.pop("gradient_checkpointing", False))
    hidden, depth, heads = MODEL_SIZES[name]
    patch = int(name.split("/")[1]) if "/" in name else 2
    values = {"hidden_size": hidden, "depth": depth, "num_heads": heads, "patch_size": patch}
    values.update(config)
    model = VideoDiT(**values)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model
