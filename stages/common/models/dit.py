"""VideoDiT: a Latte-style video diffusion transformer predicting flow-matching velocity.

Latents [B, C, T, h, w] are cut into (1, p, p) patches, giving a token grid (T, H, W) with
H = h / p and W = w / p. Blocks alternate spatial attention (the H*W tokens of one frame) and
temporal attention (the T tokens at one spatial position). Every block is conditioned by
adaLN-Zero on the timestep embedding plus, for class-conditional models, a class embedding
whose extra index `num_classes` is the null class used for classifier-free guidance.

Prediction (`prediction`): "velocity" (SiT/REPA: the network's output is v) or "sample" (JiT,
Li & He 2025, LTH14/JiT `denoiser.py`: the network predicts the clean latent x0_hat and the model
returns the velocity v = (x_t - x0_hat) / max(t, t_eps), so the loss and every sampler still see
a velocity). Why "sample": in pixel space a token holds f^2 x 3 x p^2 values (768 for the demo's
patchify-8 latents with patch 2), more than a small model's width; noise and velocity do not
lie on a low-dimensional manifold and such a model cannot carry them, clean data does (JiT's
argument and its finding at large patch sizes). Our t is the noise level (JiT's 1 - t).

It is a diffusers `ModelMixin`/`ConfigMixin`, so `save_pretrained`/`from_pretrained` store the
config and safetensors weights; the training stage keeps its alignment projectors outside this
module, which is why the saved model is the inference model.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

# This module imports nothing else of this package: `pipeline export` ships it as-is beside the
# weights, so a trained model loads with diffusers alone (named sizes: stages/common/models/dit_sizes.py).
# Kept equal to stages.common.registry.PREDICTIONS (a test checks it): this module imports nothing
# of the package, so the tuple is written here too.
PREDICTIONS = ("velocity", "sample")


def sample_hw(sample_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(h, w) latent cells of a `sample_size`: an int is square (every config written before
    non-square clips), a pair is (height, width), as config.json stores it (a list)."""
    if isinstance(sample_size, int) and not isinstance(sample_size, bool):
        return (sample_size, sample_size)
    if isinstance(sample_size, (tuple, list)) and len(sample_size) == 2:
        return (int(sample_size[0]), int(sample_size[1]))
    raise ValueError(f"sample_size must be an int or (height, width), got {sample_size!r}")


def default_align_depth(depth: int) -> int:
    """REPA's block 8 for deep models (>= 24 blocks), a third of the depth for shallower ones."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return 8 if depth >= 24 else max(1, depth // 3)


# ----------------------------------------------------------------------------- embeddings


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[len(positions), dim] sin/cos features with geometric frequencies (dim must be even)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """[height*width, dim]: half the channels encode the row, half the column (row-major order)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, rows), _sincos_1d(dim // 2, cols)], axis=1)
    return torch.from_numpy(emb).float()


def sincos_1d(dim: int, length: int) -> torch.Tensor:
    """[length, dim] temporal position embedding."""
    return torch.from_numpy(_sincos_1d(dim, np.arange(length))).float()


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t * 1000 (t in [0, 1]), so the frequencies match DiT's integer steps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)


# ----------------------------------------------------------------------------- blocks


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: [B, T, N, D]; shift/scale: [B, D] broadcast over frames and tokens.
    return x * (1 + scale[:, None, None]) + shift[:, None, None]


class Attention(nn.Module):
    """Multi-head self-attention over the second-to-last axis, using torch SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class VideoDiTBlock(nn.Module):
    """adaLN-Zero transformer block attending either within frames or across frames."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden_size),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def _attend(self, h: torch.Tensor) -> torch.Tensor:
        b, t, n, d = h.shape
        if self.temporal:  # sequences are the T tokens at one position
            seq = h.permute(0, 2, 1, 3).reshape(b * n, t, d)
            return self.attn(seq).reshape(b, n, t, d).permute(0, 2, 1, 3)
        return self.attn(h.reshape(b * t, n, d)).reshape(b, t, n, d)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a[:, None, None] * self._attend(_modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m[:, None, None] * self.mlp(_modulate(self.norm2(x), shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


# ----------------------------------------------------------------------------- model


class VideoDiT(ModelMixin, ConfigMixin):
    """Video diffusion transformer: (x_t, t, y) -> velocity, optionally with block hidden states."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        num_frames: int = 16,
        sample_size: int | tuple[int, int] = 32,  # latent cells: square, or (height, width)
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        class_dropout: float = 0.1,
        prediction: str = "velocity",
        t_eps: float = 0.05,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        height, width = sample_hw(sample_size)
        if height % patch_size or width % patch_size:
            raise ValueError(f"sample_size {sample_size} is not divisible by patch_size {patch_size}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 (2D sin-cos embedding), got {hidden_size}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.out_channels = in_channels
        self.gradient_checkpointing = False

        self.patch_embed = nn.Conv3d(
            in_channels,
            hidden_size,
            kernel_size=(1, patch_size, patch_size),
            stride=(1, patch_size, patch_size),
        )
        self.t_embedder = TimestepEmbedder(hidden_size)
        # Index `num_classes` is the null class (classifier-free guidance).
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes > 0 else None
        self.grid_hw = (height // patch_size, width // patch_size)
        self.register_buffer("spatial_pos", sincos_2d(hidden_size, *self.grid_hw), persistent=False)
        self.register_buffer("temporal_pos", sincos_1d(hidden_size, num_frames), persistent=False)
        self.blocks = nn.ModuleList(
            [VideoDiTBlock(hidden_size, num_heads, mlp_ratio, temporal=bool(i % 2)) for i in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        def _xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_xavier)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def null_class(self) -> int | None:
        """Label index meaning "no class" (classifier-free guidance), or None if unconditional."""
        return self.config.num_classes if self.config.num_classes > 0 else None

    def _positions(self, t: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        """[T, H*W, D] position embedding; recomputed when the grid differs from the config."""
        d = self.config.hidden_size
        spatial = self.spatial_pos if (h, w) == self.grid_hw else sincos_2d(d, h, w)
        temporal = self.temporal_pos if self.temporal_pos.shape[0] == t else sincos_1d(d, t)
        return temporal.to(device)[:, None] + spatial.to(device)[None]

    def _class_embedding(
        self, y: torch.Tensor | None, batch: int, force_drop_ids: torch.Tensor | None
    ) -> torch.Tensor | None:
        if self.y_embedder is None:
            if y is not None and bool(torch.any(torch.as_tensor(y) >= 0)):
                raise ValueError("this VideoDiT is unconditional (num_classes=0) but class labels were given")
            return None
        null = self.config.num_classes
        if y is None:  # no labels given: the unconditional (null-class) branch
            y = torch.full((batch,), null, dtype=torch.long, device=self.y_embedder.weight.device)
        y = y.long()
        if y.shape != (batch,):
            raise ValueError(f"y must have shape [{batch}], got {tuple(y.shape)}")
        # (a data-dependent check: skipped inside torch.compile, where it would break the graph)
        if not torch.compiler.is_compiling() and torch.any((y < 0) | (y > null)):
            raise ValueError(f"class labels must lie in [0, {null}] ({null} = null class), got {y.tolist()}")
        if force_drop_ids is not None:
            drop = force_drop_ids.to(y.device).bool()
        elif self.training and self.config.class_dropout > 0:
            drop = torch.rand(batch, device=y.device) < self.config.class_dropout
        else:
            drop = None
        if drop is not None:
            y = torch.where(drop, torch.full_like(y, null), y)
        return self.y_embedder(y)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
        return_hidden_at: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Velocity [B, C, T, h, w]; with `return_hidden_at=k` also block k's output [B, T, H*W, D].

        `t` is the flow time in [0, 1] (0 = data, 1 = noise), one value per sample (a scalar is
        broadcast). `force_drop_ids` (1 = replace the label by the null class) overrides the
        random class dropout applied in training mode.
        """
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, T, h, w], got {tuple(x.shape)}")
        b, _, frames, height, width = x.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by patch size {p}")
        if return_hidden_at is not None and not 1 <= return_hidden_at <= cfg.depth:
            raise ValueError(f"return_hidden_at must be in [1, {cfg.depth}], got {return_hidden_at}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must have shape [{b}], got {tuple(t.shape)}")

        gh, gw = height // p, width // p
        tokens = self.patch_embed(x)  # [B, D, T, H, W]
        tokens = tokens.flatten(3).permute(0, 2, 3, 1)  # [B, T, H*W, D]
        tokens = tokens + self._positions(frames, gh, gw, x.device).to(tokens.dtype)

        c = self.t_embedder(t)
        class_emb = self._class_embedding(y, b, force_drop_ids)
        if class_emb is not None:
            c = c + class_emb

        hidden = None
        for k, block in enumerate(self.blocks, start=1):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(block, tokens, c)
            else:
                tokens = block(tokens, c)
            if k == return_hidden_at:
                hidden = tokens

        out = self.final_layer(tokens, c)  # [B, T, H*W, p*p*C_out]
        out = out.reshape(b, frames, gh, gw, p, p, self.out_channels)
        out = out.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, self.out_channels, frames, height, width)
        if cfg.prediction == "sample":  # x0_hat -> velocity (JiT's v from its x-prediction)
            out = (x - out) / t.to(out.dtype).clamp_min(cfg.t_eps).reshape(b, 1, 1, 1, 1)
        return out if return_hidden_at is None else (out, hidden)
