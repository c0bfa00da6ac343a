"""diffusers' WanTransformer3DModel behind the adapter interface (shared/DESIGN.md section 2).

Why these conversions, checked against diffusers and finetrainers:
- Time: Wan's flow matching is ours (x_t = (1 - sigma) x0 + sigma eps, target eps - x0 in
  finetrainers' `flow_match_target`; FlowMatchEulerDiscreteScheduler steps x + (sigma' - sigma) v), so
  our t is Wan's sigma and the transformer's timestep input is t * 1000. The prediction is
  returned unchanged as the velocity.
- Text: WanPipeline zeroes the prompt embedding past each prompt's length and pads it with zeros
  to `max_sequence_length` (512); the transformer takes no mask, so the padding tokens take part
  in cross-attention. We do the same (mask -> zeros, pad to `max_text_tokens`), so what is trained
  is what the pipeline generates with.
- Hidden states: the output of `blocks[align_block - 1]`, taken with a forward hook, as tokens
  [B, T', H' * W', D] (the patch embedding flattens (T', H', W') in that order).

This module imports no VAE and no text encoder (the import audit): latents and prompt
embeddings come from the cache. LoRA: `add_lora` / `save_lora` (diffusers' LoRA file);
FSDP2: `shard_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cache_schema.run import LORA_WEIGHTS_FILE
from stages.common.models.adapter import (
    Condition,
    Conditioning,
    ModelOutput,
    Objective,
    TokenLayout,
    VideoModelAdapter,
)

WAN_TIMESTEP_SCALE = 1000.0  # the transformer's timestep is sigma * num_train_timesteps
WAN_MAX_TEXT_TOKENS = 512  # WanPipeline.__call__'s max_sequence_length
WAN_DEFAULT_SHIFT = 3.0  # used when a folder has no scheduler config (Wan 2.1 480p's flow_shift)
# diffusers' Wan LoRA training targets (finetrainers: blocks.*(to_q|to_k|to_v|to_out.0)), in attn1 and attn2
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WEIGHTS_NAME = LORA_WEIGHTS_FILE  # what WanPipeline.load_lora_weights(folder) reads


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def _transformer_subfolder(src: str, local_only: bool) -> str | None:
    """ "transformer" for a pipeline (folder or hub id), None for a saved transformer."""
    from stages.common.models.vae import _repo_has

    if _repo_has(src, "config.json", local_only):
        return None
    return "transformer"


def _flow_shift(src: str, kwargs: dict[str, Any]) -> float:
    """The pipeline scheduler's `flow_shift` (or `shift`); WAN_DEFAULT_SHIFT without a scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stages.common.models.vae import load_errors

    try:
        # any scheduler class's load_config reads the folder's scheduler_config.json as a dict
        cfg = FlowMatchEulerDiscreteScheduler.load_config(src, subfolder="scheduler", **kwargs)
    except (*load_errors(), ValueError):  # a bare transformer folder: no scheduler beside it
        return WAN_DEFAULT_SHIFT
    for key in ("flow_shift", "shift"):
        if cfg.get(key) is not None:
            return float(cfg[key])
    return WAN_DEFAULT_SHIFT


def flow_shift(source: str | Path, flag: str = "--base") -> float:
    """The timestep shift of a pipeline folder / hub id's scheduler (a saved full fine-tune has
    none: sampling takes its base's)."""
    from stages.common.models.vae import hub_kwargs

    return _flow_shift(*hub_kwargs(source, flag))


def load_wan_transformer(
    source: str | Path, dtype: torch.dtype = torch.float32, flag: str = "--base"
) -> tuple[nn.Module, float]:
    """(WanTransformer3DModel, flow shift) from a pipeline folder / hub id (its transformer/ and
    scheduler/) or from a folder written by save_pretrained (a full fine-tune)."""
    from diffusers import WanTransformer3DModel

    from stages.common.models.vae import hub_kwargs, weights_not_found_as_error

    src, kwargs = hub_kwargs(source, flag)
    with weights_not_found_as_error(source, flag):
        subfolder = _transformer_subfolder(src, bool(kwargs.get("local_files_only")))
        extra = {"subfolder": subfolder} if subfolder else {}
        model = WanTransformer3DModel.from_pretrained(src, torch_dtype=dtype, **kwargs, **extra)
    return model, _flow_shift(src, kwargs)


class WanAdapter(VideoModelAdapter):
    """A text-to-video WanTransformer3DModel in our flow convention (module docstring).

    `null_text` [L, text_dim] is the empty prompt's embedding (WanPipeline.encode_prompt("")):
    samples with `condition.drop` set get it instead of their own (classifier-free guidance dropout).
    """

    family = "wan"
    class_names = ("WanTransformer3DModel",)  # config.json `_class_name` of a saved transformer

    def __init__(
        self,
        module: nn.Module,
        shift: float = WAN_DEFAULT_SHIFT,
        null_text: torch.Tensor | None = None,
        max_text_tokens: int = WAN_MAX_TEXT_TOKENS,
    ):
        cfg = module.config
        self.module = module
        self.conditioning = Conditioning(
            "text", text_dim=int(cfg.text_dim), max_text_tokens=int(max_text_tokens)
        )
        self.objective = Objective(shift=float(shift), timestep_scale=WAN_TIMESTEP_SCALE)
        hidden = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
        self.tokens = TokenLayout(tuple(int(p) for p in cfg.patch_size), hidden, int(cfg.num_layers))
        self.null_text: torch.Tensor | None = None
        if null_text is not None:
            self.set_null_text(null_text)

    def set_null_text(self, null_text: torch.Tensor) -> None:
        """The empty prompt's embedding [L, text_dim] (padded to max_text_tokens): what dropped
        samples and guidance's null branch get."""
        self.null_text = self._pad(null_text[None].float(), None)[0]

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        dtype: torch.dtype = torch.float32,
        null_text: torch.Tensor | None = None,
        max_text_tokens: int = WAN_MAX_TEXT_TOKENS,
        shift: float | None = None,
        flag: str = "--base",
    ) -> WanAdapter:
        """Load from a diffusers pipeline folder or hub id, or a saved full fine-tune; `shift`
        overrides the scheduler's flow_shift (a bare transformer folder has none)."""
        module, folder_shift = load_wan_transformer(source, dtype, flag)
        shift = folder_shift if shift is None else shift
        return cls(module, shift, null_text=null_text, max_text_tokens=max_text_tokens)

    # ------------------------------------------------------------------ conditioning
    def _pad(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Zero past the mask and pad with zeros to max_text_tokens, as WanPipeline does."""
        n, limit = embeds.shape[1], self.conditioning.max_text_tokens
        if embeds.shape[-1] != self.conditioning.text_dim:
            raise ValueError(
                f"text embeddings have width {embeds.shape[-1]}, the transformer takes {self.conditioning.text_dim}"
            )
        if n > limit:
            raise ValueError(f"text embeddings have {n} tokens, more than max_text_tokens={limit}")
        if mask is not None:
            embeds = embeds * mask[..., None].to(embeds.dtype)
        return torch.nn.functional.pad(embeds, (0, 0, 0, limit - n))

    def text_states(self, condition: Condition, dtype: torch.dtype) -> torch.Tensor:
        """encoder_hidden_states [B, max_text_tokens, text_dim], the dropped samples' replaced by null_text."""
        if condition.text_embeds is None:
            raise ValueError("the Wan adapter is text-conditioned: the condition has no text_embeds")
        states = self._pad(condition.text_embeds, condition.text_mask)
        if condition.drop is not None and bool(condition.drop.any()):
            if self.null_text is None:
                raise ValueError(
                    "classifier-free guidance dropout needs the empty-prompt embedding; "
                    "give WanAdapter null_text (the store's empty prompt)"
                )
            null = self.null_text.to(states.device, states.dtype)
            states = torch.where(condition.drop.to(states.device)[:, None, None], null[None], states)
        return states.to(dtype)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        module: nn.Module,
        latents: torch.Tensor,
        t: torch.Tensor,
        condition: Condition,
        align_block: int | None = None,
    ) -> ModelOutput:
        net = unwrap(module)
        if align_block is not None and not 1 <= align_block <= self.tokens.depth:
            raise ValueError(f"align_block must be in 1..{self.tokens.depth}, got {align_block}")
        grid = self.tokens.grid(tuple(latents.shape[2:]))
        dtype = next(net.parameters()).dtype
        captured: list[torch.Tensor] = []
        handle = None
        if align_block is not None:
            block = net.blocks[align_block - 1]
            handle = block.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            timestep = (
                t.to(latents.device, torch.float32).expand(latents.shape[0]) * self.objective.timestep_scale
            )
            out = module(
                hidden_states=latents.to(dtype),
                timestep=timestep,
                encoder_hidden_states=self.text_states(condition, dtype).to(latents.device),
                return_dict=False,
            )[0]
        finally:
            if handle is not None:
                handle.remove()
        hidden = None
        if align_block is not None:
            # the first call is the forward; gradient checkpointing re-runs the block in backward
            hidden = captured[0].reshape(latents.shape[0], grid[0], grid[1] * grid[2], -1)
        return ModelOutput(velocity=out, hidden=hidden)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, module: nn.Module, folder: str | Path) -> None:
        """Full fine-tune: the transformer's save_pretrained (loads as WanPipeline's transformer/).
        LoRA: diffusers' LoRA file (WanPipeline.load_lora_weights(folder))."""
        from stages.common.models.lora import save_lora

        net = unwrap(module)
        if getattr(net, "peft_config", None):
            save_lora(net, folder)
        else:
            net.save_pretrained(str(folder))
