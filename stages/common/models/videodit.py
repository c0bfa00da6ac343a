"""Our Latte-style VideoDiT (dit.py) as one `VideoModelAdapter`: class ids, patch (1, p, p), no
timestep shift, t passed as is (dit.py embeds t * 1000 itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .adapter import Condition, Conditioning, ModelOutput, Objective, TokenLayout, VideoModelAdapter
from .dit import VideoDiT, sample_hw
from .dit_sizes import build_video_dit


class VideoDiTAdapter(VideoModelAdapter):
    """A VideoDiT behind the interface; `module` is the network, EMA copies and wrappers of it go
    through the same `forward`."""

    family = "videodit"
    class_names: ClassVar[tuple[str, ...]] = ("VideoDiT",)  # config.json `_class_name` of its folders

    def __init__(self, module: VideoDiT) -> None:
        if not isinstance(module, VideoDiT):
            raise TypeError(f"VideoDiTAdapter wraps a VideoDiT, got {type(module).__name__}")
        c = module.config
        self.module = module
        self.conditioning = Conditioning("class", num_classes=c.num_classes, dropout=c.class_dropout)
        self.objective = Objective()
        self.tokens = TokenLayout((1, c.patch_size, c.patch_size), c.hidden_size, c.depth)
        self.latent_shape = (c.in_channels, c.num_frames, *sample_hw(c.sample_size))

    @classmethod
    def build(cls, size: str | None = None, **config: Any) -> VideoDiTAdapter:
        """A fresh VideoDiT: of a named size (stages.common.registry.MODEL_SIZES) with `config` setting
        the rest (in_channels, num_frames, sample_size, num_classes, ...), or from `config` alone.
        `gradient_checkpointing=True` enables activation checkpointing."""
        if size is not None:
            return cls(build_video_dit(size, **config))
        checkpointing = bool(config.pop("gradient_checkpointing", False))
        module = VideoDiT(**config)
        if checkpointing:
            module.enable_gradient_checkpointing()
        return cls(module)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> VideoDiTAdapter:
        """The model a `save_pretrained` folder holds (fp32 as saved, on the CPU)."""
        return cls(VideoDiT.from_pretrained(str(folder), low_cpu_mem_usage=False))

    def forward(
        self,
        module: nn.Module,
        latents: torch.Tensor,
        t: torch.Tensor,
        condition: Condition,
        align_block: int | None = None,
    ) -> ModelOutput:
        if condition.text_embeds is not None:
            raise ValueError("a VideoDiT is conditioned on class ids, not text embeddings")
        out = module(
            latents, t, condition.class_labels, force_drop_ids=condition.drop, return_hidden_at=align_block
        )
        if align_block is None:
            return ModelOutput(out)
        velocity, hidden = out
        return ModelOutput(velocity, hidden)

    def save_pretrained(self, module: nn.Module, folder: str | Path) -> None:
        module.save_pretrained(folder, safe_serialization=True)
