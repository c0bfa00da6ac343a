"""Wan 2.1 text-to-video sizes: the transformers' configs, their token grids, the cache's bytes per
clip and the training step's FLOPs, without weights (meta device) so a budget needs no download.

Configs are those of the diffusers repos Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers
(transformer/config.json); both share the VAE (16 channels, 8x spatial, 4x causal temporal) and
UMT5-XXL (4096-wide embeddings, WanPipeline's 512 tokens), and the patch (1, 2, 2), so their token
grids are the same: the cache of a clip does not depend on which of the two is trained.
"""

from __future__ import annotations

from typing import Any

import torch

from cache_schema import formats

WAN_COMMON: dict[str, Any] = dict(
    patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
    freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
)  # fmt: skip
WAN_SIZES: dict[str, dict[str, Any]] = {
    "Wan2.1-T2V-1.3B": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "Wan2.1-T2V-14B": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40),
}
WAN_HUB_IDS = {name: f"Wan-AI/{name}-Diffusers" for name in WAN_SIZES}
WAN_VAE = dict(channels=16, spatial=8, temporal=4)
WAN_TEXT = dict(tokens=512, dim=4096)  # UMT5-XXL, WanPipeline's max_sequence_length


def wan_config(name: str, **over: Any) -> dict[str, Any]:
    """WanTransformer3DModel keyword arguments of a named size (`over` replaces some, e.g. num_layers)."""
    if name not in WAN_SIZES:
        raise ValueError(f"unknown Wan size {name!r}; known: {', '.join(WAN_SIZES)}")
    return {**WAN_COMMON, **WAN_SIZES[name], **over}


def wan_latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, T', h, w) of a clip's Wan VAE latents; refuses sizes the VAE cannot encode."""
    k, f = WAN_VAE["temporal"], WAN_VAE["spatial"]
    if frames < 1 or (frames - 1) % k:
        raise ValueError(f"Wan clips need 1 + {k}*j frames (e.g. 81), got {frames}")
    if height % (2 * f) or width % (2 * f):
        raise ValueError(f"Wan frame sizes must be multiples of {2 * f} (VAE x patch), got {height}x{width}")
    return (WAN_VAE["channels"], 1 + (frames - 1) // k, height // f, width // f)


def wan_token_grid(name: str, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(T', H', W') of the transformer's tokens for a clip."""
    _, t, h, w = wan_latent_shape(frames, height, width)
    pt, ph, pw = wan_config(name)["patch_size"]
    return (t // pt, h // ph, w // pw)


def wan_bytes_per_clip(
    name: str,
    frames: int,
    height: int,
    width: int,
    encoders: dict[str, int],
    fmt: str = formats.DEFAULT_TARGET_FORMAT,
    text_tokens: int = WAN_TEXT["tokens"],
    encoder_frames: dict[str, int] | None = None,
) -> dict[str, int]:
    """Raw (uncompressed) bytes one clip takes in the cache: float16 latents, each encoder's targets
    at the token grid in `fmt` (+ a float16 norm per token), the float16 prompt embedding of
    `text_tokens` tokens and its uint8 mask. `encoders`: name -> feature dim; `encoder_frames`:
    the time steps of an encoder stored on its own, coarser time grid (VideoMAE: 8 per 16 frames)."""
    c, t, h, w = wan_latent_shape(frames, height, width)
    grid = wan_token_grid(name, frames, height, width)
    out = {"latents": c * t * h * w * 2, "text": text_tokens * WAN_TEXT["dim"] * 2 + text_tokens}
    for enc, dim in encoders.items():
        steps = (encoder_frames or {}).get(enc, grid[0])
        out[enc] = steps * grid[1] * grid[2] * (formats.bytes_per_token(fmt, dim) + 2)
    out["total"] = sum(out.values())
    return out


def _count_step(config: dict[str, Any], latent_shape, text_tokens: int, backward: bool) -> int:
    """FLOPs of one clip through WanTransformer3DModel (forward, + backward when asked), on meta."""
    from diffusers import WanTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
        x = torch.randn(1, *latent_shape)
        text = torch.randn(1, text_tokens, config["text_dim"])
        t = torch.full((1,), 500.0)
    with FlopCounterMode(display=False) as counter:
        out = model(x, t, encoder_hidden_states=text, return_dict=False)[0]
        if backward:
            out.float().pow(2).mean().backward()
    return counter.get_total_flops()


def wan_step_tflop(
    name: str,
    frames: int,
    height: int,
    width: int,
    backward: bool = True,
    text_tokens: int = WAN_TEXT["tokens"],
) -> float:
    """TFLOP of one clip's full fine-tuning step (forward + backward; forward only when not
    `backward`), by torch.utils.flop_counter on the meta device, for a clip of frames x height x width px."""
    return wan_latent_step_tflop(name, wan_latent_shape(frames, height, width), backward, text_tokens)


def wan_latent_step_tflop(
    name: str, latent_shape, backward: bool = True, text_tokens: int = WAN_TEXT["tokens"]
) -> float:
    """`wan_step_tflop` on latents of (C, T', h, w) cells (a store's own latent shape; counted with the
    model's own channels). The blocks are identical, so two shallow copies (2 and 4 blocks) give any
    depth exactly."""
    latent = (WAN_COMMON["in_channels"], *(int(v) for v in latent_shape[1:]))
    depth = wan_config(name)["num_layers"]
    two, four = (_count_step(wan_config(name, num_layers=d), latent, text_tokens, backward) for d in (2, 4))
    return (two + (four - two) * (depth - 2) / 2) / 1e12
