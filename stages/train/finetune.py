"""Fine-tuning a pretrained text-to-video model (`train --base`): the adapter the shared loop and
step train instead of a fresh model.

Why here and not in state.py: what differs from a fresh model is only how the module is built
(loaded, frozen and given LoRA, or trained in full), which of its parameters the optimizer and the
EMA see, and how a checkpoint's weights are read back; the loop, the step, the alignment head and
the checkpoint layout are the DiT's. The model is loaded in float32 (bf16 autocast applies as for
the DiT), and never with its VAE or text encoder: latents and prompt embeddings come from the cache.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cache_schema.layout import CacheLayout
from stages.common.models.adapter import VideoModelAdapter
from stages.common.models.factory import adapter_class

from .config import TrainConfig

PRETRAINED_FAMILY = "wan"  # the family `--base` loads (the only pretrained one so far)
BASE_TEXT_TOKENS = 512  # WanPipeline pads prompts to 512 tokens; train as it generates


def is_lora(module: nn.Module) -> bool:
    """Whether `module` (or the network inside its wrappers) carries peft LoRA adapters."""
    from stages.common.models.wan import unwrap

    return bool(getattr(unwrap(module), "peft_config", None))


def check_layout(adapter: VideoModelAdapter, layout: CacheLayout, base: str) -> None:
    """Refuse shards whose latents the base model cannot take, naming the field: the latent
    channels (`latent_shape`), the token grid the targets were resampled to (`grid`), the text."""
    shape = [int(v) for v in layout.latent_shape]
    channels, *thw = shape
    want = int(adapter.module.config.in_channels)
    if channels != want:
        raise ValueError(
            f"the shards' latent_shape {shape} has {channels} channels but --base "
            f"{base} takes {want}: extract the clips with its VAE (--base {base} --vae {base} --vae-kind wan)"
        )
    try:
        grid = adapter.tokens.grid(tuple(thw))
    except ValueError as exc:
        raise ValueError(f"the shards' latent_shape {shape}: {exc} of --base {base}") from None
    if list(grid) != [int(g) for g in layout.grid]:
        raise ValueError(
            f"the shards' grid {list(layout.grid)} is not --base {base}'s token grid {list(grid)} for "
            f"latents {thw}: extract with --patch-size {adapter.tokens.patch_size[1]} so the targets are "
            "resampled to its tokens"
        )
    if adapter.conditioning.kind == "text" and layout.text is None:
        raise ValueError(
            f"the shards hold no prompt embeddings (no `text` field in index.json) but --base {base} is "
            "text-conditioned: extract a captioned manifest with --base, then pack"
        )


def build_pretrained(
    cfg: TrainConfig, layout: CacheLayout, null_text: torch.Tensor | None
) -> VideoModelAdapter:
    """The base model's adapter, checked against the shards, with LoRA or trainable in full;
    `null_text` is the shards' empty prompt (classifier-free guidance dropout)."""
    from dataclasses import replace

    tokens = max(BASE_TEXT_TOKENS, layout.text.max_length if layout.text is not None else 0)
    adapter = adapter_class(PRETRAINED_FAMILY).from_pretrained(
        cfg.base, null_text=null_text, max_text_tokens=tokens
    )
    check_layout(adapter, layout, str(cfg.base))
    adapter.conditioning = replace(adapter.conditioning, dropout=cfg.class_dropout)
    module = adapter.module.float()
    if cfg.gradient_checkpointing:
        module.enable_gradient_checkpointing()
    if cfg.lora_rank is not None:
        from stages.common.models.lora import LoraSpec, add_lora

        targets = tuple(cfg.lora_targets) or LoraSpec.targets
        add_lora(module, LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=targets))
    else:
        module.requires_grad_(True)
    return adapter


def ema_copy(model: nn.Module) -> nn.Module:
    """The EMA copy: a deep copy whose frozen parameters are the model's own tensors (shared, not
    copied), so a LoRA run's EMA costs the LoRA weights only; a full model is copied whole."""
    memo = {id(p): p for p in model.parameters() if not p.requires_grad}
    ema = copy.deepcopy(model, memo)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema.eval()


def load_lora_file(module: nn.Module, path: Path, read: Any) -> None:
    """Resume: the LoRA weights of a checkpoint's pytorch_lora_weights.safetensors (diffusers'
    keys) into `module`, which already carries the same adapters; every LoRA weight must be there."""
    from peft import set_peft_model_state_dict

    from stages.common.models.lora import ADAPTER_NAME
    from stages.common.models.wan import unwrap

    prefix = "transformer."
    weights = {k[len(prefix) :]: v for k, v in read(path).items() if k.startswith(prefix)}
    net = unwrap(module)
    result = set_peft_model_state_dict(net, weights, adapter_name=ADAPTER_NAME)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if missing or unexpected or not weights:
        raise ValueError(
            f"{path} does not hold this run's LoRA weights (missing {missing[:2]}, unexpected "
            f"{unexpected[:2]}): resume with the run's own --lora-rank / --lora-targets"
        )
