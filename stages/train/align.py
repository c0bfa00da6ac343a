"""Representation alignment heads: one projector per encoder, negative cosine loss (REPA).

The projectors live here, outside VideoDiT, so the saved inference model carries no trace
of them; checkpoints keep them separately for resuming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Sequential):
    """hidden -> width -> width -> encoder dim with SiLU (REPA's MLP, width 2048 by default)."""

    def __init__(self, hidden_size: int, width: int, out_dim: int):
        super().__init__(
            nn.Linear(hidden_size, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, out_dim),
        )


def _key(name: str) -> str:
    # ModuleDict keys may not contain dots.
    return name.replace(".", "_")


class AlignmentHead(nn.Module):
    """Projects block hidden states onto each chosen encoder's slice of the fused target."""

    def __init__(self, hidden_size: int, slices: dict[str, tuple[int, int]], width: int = 2048):
        super().__init__()
        if not slices:
            raise ValueError("alignment needs at least one encoder")
        self.names = list(slices)
        self.slices = dict(slices)
        self.projectors = nn.ModuleDict(
            {_key(n): Projector(hidden_size, width, stop - start) for n, (start, stop) in slices.items()}
        )

    def forward(
        self, hidden: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """hidden [B, T, H*W, hidden], target [B, T, H, W, D] -> (mean over encoders of -cos, cos per encoder).

        Tokens are in the same (t, row, col) order on both sides, so the flattening matches.
        """
        b, t, n, _ = hidden.shape
        tokens = hidden.reshape(b, t * n, -1)
        target = target.reshape(b, -1, target.shape[-1])
        if target.shape[1] != t * n:
            raise ValueError(
                f"target grid has {target.shape[1]} tokens per clip but the model has {t * n}; "
                "the cache grid does not match the model's patch grid"
            )
        cos: dict[str, torch.Tensor] = {}
        for name in self.names:
            start, stop = self.slices[name]
            projected = self.projectors[_key(name)](tokens)
            sim = F.cosine_similarity(projected.float(), target[..., start:stop].float(), dim=-1)
            cos[name] = sim.mean()
        loss = -torch.stack(list(cos.values())).mean()
        return loss, cos
