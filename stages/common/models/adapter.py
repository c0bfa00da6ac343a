"""The interface a trainable video model offers to train, sample and the benches.

One adapter per model family (our Latte-style VideoDiT, diffusers' WanTransformer3DModel, ...):
train, sample and the benches call only what is here, so adding a family is one more adapter,
not a copy of the trainer (shared/DESIGN.md section 2).

Conventions every adapter follows (stages.common.flow): t = 0 is data, t = 1 is noise,
x_t = (1 - t) x0 + t eps, and `forward` returns the velocity eps - x0 in latent units, whatever
the model predicts internally. A family's own timestep input (Wan's 0..1000) and timestep shift
are in its `Objective`, so the trainer samples t once and the adapter maps it.

Conditioning travels as a `Condition` (class ids, or text embeddings with their mask) so a model
never sees a loader's dict. The module is passed to `forward` explicitly: the trainer calls it on
the DDP/FSDP/compiled wrapper, the sampler on the EMA copy, both through the same adapter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

CONDITIONING_KINDS = ("class", "text")


@dataclass(frozen=True)
class Conditioning:
    """What a model is conditioned on. "class": ids in [0, num_classes), num_classes = the null
    (unconditional) id. "text": embeddings [B, L, text_dim] with a 0/1 mask [B, L]; the null
    condition is the stored empty-prompt embedding (classifier-free guidance dropout)."""

    kind: str
    num_classes: int = 0
    text_dim: int = 0
    max_text_tokens: int = 0
    dropout: float = 0.0  # the share of training samples whose condition is dropped (CFG dropout)

    def __post_init__(self) -> None:
        if self.kind not in CONDITIONING_KINDS:
            raise ValueError(f"conditioning kind must be one of {CONDITIONING_KINDS}, got {self.kind!r}")

    @property
    def conditional(self) -> bool:
        """False for a class model with no classes: no condition, no dropout, no guidance."""
        return self.kind == "text" or self.num_classes > 0


@dataclass(frozen=True)
class Objective:
    """A family's flow-matching objective in our convention. `shift` (SD3 / Wan timestep shift,
    1 = none) maps a uniform draw u to t = shift u / (1 + (shift - 1) u); `timestep_scale` is what
    the model's own timestep input is in units of t (1 for VideoDiT, 1000 for Wan)."""

    shift: float = 1.0
    timestep_scale: float = 1.0

    def shift_time(self, t: torch.Tensor) -> torch.Tensor:
        if self.shift == 1.0:
            return t
        return self.shift * t / (1 + (self.shift - 1) * t)


@dataclass(frozen=True)
class TokenLayout:
    """How latents become tokens: latent cells per token (pt, ph, pw), the width of the hidden
    states and the number of blocks (alignment depth is 1..depth)."""

    patch_size: tuple[int, int, int]
    hidden_size: int
    depth: int

    def grid(self, latent_thw: tuple[int, int, int]) -> tuple[int, int, int]:
        """The token grid (T', H', W') of latents of (T, h, w) cells; refuses a grid that does not divide."""
        out = []
        for name, n, p in zip(("frames", "height", "width"), latent_thw, self.patch_size, strict=True):
            if n % p:
                raise ValueError(f"latent {name} {n} is not divisible by the patch size {p}")
            out.append(n // p)
        return tuple(out)  # type: ignore[return-value]


@dataclass
class Condition:
    """One batch's conditioning: `class_labels` [B] long, or `text_embeds` [B, L, D] with
    `text_mask` [B, L]. `drop` [B] bool marks samples whose condition is replaced by the null one
    (classifier-free guidance dropout, decided by the trainer so a resume replays it)."""

    class_labels: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    drop: torch.Tensor | None = None

    def with_null(self) -> Condition:
        """This batch followed by its null condition (the same batch, every sample dropped):
        classifier-free guidance's two branches in one forward pass."""
        fields = {
            "class_labels": self.class_labels,
            "text_embeds": self.text_embeds,
            "text_mask": self.text_mask,
        }
        given = [v for v in fields.values() if v is not None]
        if not given:
            raise ValueError("an empty condition (unconditional model) has no null branch to guide with")
        first = given[0]
        dropped = torch.zeros(len(first), dtype=torch.bool, device=first.device)
        if self.drop is not None:
            dropped = self.drop.to(first.device).bool()
        doubled = {k: None if v is None else torch.cat([v, v]) for k, v in fields.items()}
        return Condition(**doubled, drop=torch.cat([dropped, torch.ones_like(dropped)]))


@dataclass
class ModelOutput:
    """The velocity [B, C, T, h, w] and, when asked, block `align_block`'s hidden states
    [B, T', H' * W', D] (the tokens REPA aligns)."""

    velocity: torch.Tensor
    hidden: torch.Tensor | None = None


class VideoModelAdapter(ABC):
    """A trainable video model family behind one interface (see the module docstring)."""

    family: str  # "videodit", "wan", ...: what a checkpoint's config records (factory.py)
    class_names: ClassVar[tuple[str, ...]] = ()  # config.json `_class_name`s its saved folders carry
    module: nn.Module  # the trainable network; EMA copies it, LoRA / DDP / FSDP2 wrap it
    conditioning: Conditioning
    objective: Objective
    tokens: TokenLayout
    latent_shape: tuple[int, int, int, int] | None = None  # (C, T, h, w) it was built for; None: any

    @classmethod
    def build(cls, **options: Any) -> VideoModelAdapter:
        """A fresh model (factory.build_adapter passes its options here)."""
        raise NotImplementedError(f"{cls.__name__} does not build fresh models")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> VideoModelAdapter:
        """The model a `save_pretrained` folder holds (factory.load_adapter)."""
        raise NotImplementedError(f"{cls.__name__} does not load saved models")

    @abstractmethod
    def forward(
        self,
        module: nn.Module,
        latents: torch.Tensor,
        t: torch.Tensor,
        condition: Condition,
        align_block: int | None = None,
    ) -> ModelOutput:
        """Velocity of `module` (this adapter's network, or a wrapper / EMA copy of it) at flow time
        t [B] in [0, 1], with block `align_block`'s hidden states when it is not None."""

    @abstractmethod
    def save_pretrained(self, module: nn.Module, folder: str | Path) -> None:
        """Write `module` where this family's own loader reads it back."""

    def default_align_block(self) -> int:
        """REPA's block 8 for deep models, a third of the depth for shallow ones (dit.default_align_depth)."""
        from stages.common.models.dit import default_align_depth

        return default_align_depth(self.tokens.depth)
