"""Prompts for a text-to-video run (`sample --prompt` / `--prompts FILE`), encoded here with the
base pipeline's own text encoder: training reads prompt embeddings from the cache and never loads
a text encoder, so sampling is where one runs.

Why WanPipeline.encode_prompt (the pipeline loaded without its transformer and VAE): it is
exactly what the pipeline generates with (prompt cleaning, padding, zeros past each prompt's
length), so a prompt here and a caption at extraction become the same embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.common.models.adapter import Condition

PROMPT_NEEDED = "prompt: this run fine-tuned a text-to-video model; pass --prompt TEXT or --prompts FILE"


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """--prompt TEXT, or --prompts FILE (one prompt per non-empty line); [] when neither is given."""
    if prompt is not None:
        return [prompt]
    if prompts_file is None:
        return []
    path = Path(prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompts: {path} does not exist (a text file, one prompt per line)")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    found = [line for line in lines if line]
    if not found:
        raise ValueError(f"prompts: {path} holds no prompt (one per line)")
    return found


def encode_prompts(
    base: str, prompts: list[str], num: int, max_length: int, device: torch.device
) -> tuple[Condition, torch.Tensor]:
    """(the `num` videos' condition, video i with prompt i mod len(prompts); the empty prompt's
    embedding [max_length, D], classifier-free guidance's null branch)."""
    from diffusers import WanPipeline

    from stages.common.models.vae import hub_kwargs, weights_not_found_as_error

    src, kwargs = hub_kwargs(base, "--base")
    with weights_not_found_as_error(base, "--base"):
        pipe = WanPipeline.from_pretrained(src, transformer=None, vae=None, **kwargs)
    pipe.text_encoder.to(device).eval()
    chosen = [prompts[i % len(prompts)] for i in range(num)]
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(
            [*chosen, ""], do_classifier_free_guidance=False, max_sequence_length=max_length, device=device
        )
    tokens = pipe.tokenizer(chosen, padding="max_length", max_length=max_length, truncation=True,
                            add_special_tokens=True, return_attention_mask=True, return_tensors="pt")  # fmt: skip
    embeds = embeds.float().cpu()
    return Condition(text_embeds=embeds[:-1], text_mask=tokens.attention_mask.bool()), embeds[-1]
