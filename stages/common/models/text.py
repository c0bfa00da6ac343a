"""A pipeline's text encoder, run once at extraction: captions -> prompt embeddings + mask.

Wan's text encoder is UMT5 (`PIPELINE/text_encoder`, transformers' UMT5EncoderModel) with a T5
tokenizer (`PIPELINE/tokenizer`). `encode` computes exactly what diffusers'
`WanPipeline._get_t5_prompt_embeds` gives the transformer: the prompt cleaned by diffusers' own
`prompt_clean`, padded/truncated to `max_length` tokens, the encoder's last hidden state, and every
position past the prompt's own length set to zero. The mask is the tokenizer's attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.common.registry import WAN_MAX_TEXT_LENGTH

TEXT_ENCODER_SUBFOLDER = "text_encoder"
TOKENIZER_SUBFOLDER = "tokenizer"


@dataclass
class TextEncoder:
    """A frozen text encoder and its tokenizer (eval mode, no gradients)."""

    model: Any  # transformers.UMT5EncoderModel
    tokenizer: Any
    model_id: str  # the pipeline folder or hub id it came from
    max_length: int = WAN_MAX_TEXT_LENGTH
    batch_size: int = 8

    @classmethod
    def load(
        cls, base: str | Path, device: torch.device | str = "cpu", max_length: int = WAN_MAX_TEXT_LENGTH
    ) -> TextEncoder:
        """The text encoder and tokenizer of a diffusers pipeline folder or hub id (`--base`)."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        from stages.common.models.vae import hub_kwargs, load_errors

        source, kwargs = hub_kwargs(base, "--base")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, subfolder=TOKENIZER_SUBFOLDER, **kwargs)
            model = UMT5EncoderModel.from_pretrained(source, subfolder=TEXT_ENCODER_SUBFOLDER, **kwargs)
        except load_errors() as exc:
            raise OSError(
                f"--base {base}: cannot load its {TEXT_ENCODER_SUBFOLDER}/ and {TOKENIZER_SUBFOLDER}/ "
                f"(a diffusers pipeline folder or hub id with a UMT5 text encoder is expected): {exc}"
            ) from None
        model = model.to(device).eval().requires_grad_(False)
        return cls(model, tokenizer, str(base), max_length)

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds float32 [N, L, D], zero past each prompt's length; mask uint8 [N, L])."""
        embeds, masks = [], []
        for i in range(0, len(prompts), self.batch_size):
            e, m = self._encode(prompts[i : i + self.batch_size])
            embeds.append(e)
            masks.append(m)
        if not embeds:
            empty = torch.zeros(0, self.max_length, self.dim)
            return empty, torch.zeros(0, self.max_length, dtype=torch.uint8)
        return torch.cat(embeds), torch.cat(masks)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        inputs = self.tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device)
        hidden = self.model(ids, mask).last_hidden_state.float()
        lengths = mask.gt(0).sum(dim=1)
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        return torch.where(keep[..., None], hidden, 0.0).cpu(), mask.to(torch.uint8).cpu()
