"""Self-supervised pretraining of the tiny encoders on synthetic clips, with no downloaded weights.

Why: the tiny preset's random encoders give alignment targets that carry no information about
the videos, so an alignment experiment on them cannot show anything. These objectives give the
same real model classes informative features in about a minute of CPU:

- **VideoMAE**: its own objective, ``transformers.VideoMAEForPreTraining`` (tube masking: one
  random spatial mask repeated over every tubelet time step, ``norm_pix_loss``), as in Tong et al.
  2022. Only the encoder (``.videomae``, a ``VideoMAEModel``) is saved.
- **DINOv2**: masked-token self-distillation in DINOv2's family (iBOT's patch objective in the
  regression form of data2vec): an EMA teacher sees the whole frame; the student
  (``Dinov2Model`` with ``bool_masked_pos``: masked patches are replaced by DINOv2's own mask
  token) predicts, through a linear head, the teacher's patch features at the masked
  positions; targets are the average of the teacher's last ``target_layers`` blocks, each
  instance-normalised over the patches (data2vec's guard against a constant solution). We use
  the regression form rather than iBOT's prototype cross-entropy because it has no centering /
  sharpening temperatures to tune and trains in a few hundred steps; the measured probe
  figures (BENCHMARKS.md) say whether it learned. ``objective="simmim"`` (SimMIM: regress the
  masked patches' normalised pixels) is the fallback kept for comparison.

Everything is seeded: torch's generator for the initial weights and a private generator for
batches and masks, so one seed gives the same weights bit for bit on one machine and thread count.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stages.common.models.encoders import IMAGENET_MEAN, IMAGENET_STD, resize_center_crop

INPUT_SIZE_KEY = "align4gen_input_size"


@dataclass
class PretrainConfig:
    """One pretraining run. ``clips`` synthetic clips are rendered once and reused every epoch."""

    objective: str
    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 20
    mask_ratio: float = 0.75
    masking: str = "tube"  # VideoMAE: "tube" (one spatial mask for every time slot) | "random" (per token)
    norm_pix_loss: bool = True  # VideoMAE: regress per-patch normalised pixels
    clips: int = 384
    seed: int = 0
    ema_start: float = 0.99  # DINOv2 teacher momentum, cosine to 1 over the run
    target_layers: int = 2  # DINOv2: teacher blocks averaged into the target

    def recipe(self) -> dict[str, Any]:
        return asdict(self)


def videomae_config() -> Any:
    """Tiny VideoMAE with a 1-block decoder: 64 px, patch 16, 8 frames, tubelet 2 -> 4 x 4 x 4."""
    from transformers import VideoMAEConfig

    cfg = VideoMAEConfig(
        image_size=64,
        patch_size=16,
        num_frames=8,
        tubelet_size=2,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        use_mean_pooling=False,
        decoder_hidden_size=64,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=128,
        norm_pix_loss=True,
    )
    setattr(cfg, INPUT_SIZE_KEY, 64)
    return cfg


def dino_config() -> Any:
    """Tiny DINOv2: 56 px, patch 14 -> 4 x 4 per frame, width 64, 3 blocks."""
    from transformers import Dinov2Config

    cfg = Dinov2Config(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, patch_size=14, image_size=56
    )
    setattr(cfg, INPUT_SIZE_KEY, 56)
    return cfg


def normalise(frames: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """uint8 [N,H,W,3] -> ImageNet-normalised float [N,3,size,size], as the encoder loader does."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    x = resize_center_crop(x, size, mode).clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _random_mask(gen: torch.Generator, batch: int, positions: int, ratio: float) -> torch.Tensor:
    """bool [batch, positions], exactly round(ratio * positions) True per row."""
    k = int(round(ratio * positions))
    order = torch.rand(batch, positions, generator=gen).argsort(dim=1)
    mask = torch.zeros(batch, positions, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask


def _optimizer(params, cfg: PretrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))


def _run(cfg: PretrainConfig, params, loss_fn, after_step=None) -> dict[str, Any]:
    """The shared loop: seeded batches of clip indices, lr schedule, loss history."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(params, cfg)
    losses, t0 = [], time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        idx = torch.randint(0, cfg.clips, (cfg.batch_size,), generator=gen)
        loss = loss_fn(idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(step)
        losses.append(float(loss.detach()))
    tail = max(1, cfg.steps // 10)
    return {
        "loss_first": float(np.mean(losses[:tail])),
        "loss_last": float(np.mean(losses[-tail:])),
        "train_s": round(time.perf_counter() - t0, 2),
    }


def videomae_initial(seed: int) -> Any:
    """The pretraining model at its seeded initialisation (its ``.videomae`` is the random twin)."""
    from transformers import VideoMAEForPreTraining

    torch.manual_seed(seed)
    return VideoMAEForPreTraining(videomae_config()).float()


def pretrain_videomae(clips: np.ndarray, cfg: PretrainConfig) -> tuple[Any, dict[str, Any]]:
    """VideoMAE's masked autoencoding on uint8 clips [N,8,H,W,3] (resized to its input as the encoder
    loader does at extraction); returns (VideoMAEModel, stats)."""
    model = videomae_initial(cfg.seed).train()
    model.config.norm_pix_loss = cfg.norm_pix_loss
    mc = model.config
    size, frames = int(mc.image_size), int(mc.num_frames)
    if clips.ndim != 5 or clips.shape[1] != frames:
        raise ValueError(f"videomae pretraining wants clips [N,{frames},H,W,3], got {clips.shape}")
    n = clips.shape[0]
    data = normalise(torch.from_numpy(clips).reshape(-1, *clips.shape[2:]), size, "bilinear")
    data = data.reshape(n, frames, 3, size, size)
    grid = size // int(mc.patch_size)
    slots = frames // int(mc.tubelet_size)
    cfg = PretrainConfig(**{**asdict(cfg), "clips": n})

    def loss_fn(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if cfg.masking == "tube":  # the same spatial mask at every time slot
            mask = _random_mask(gen, len(idx), grid * grid, cfg.mask_ratio).repeat(1, slots)
        else:
            mask = _random_mask(gen, len(idx), slots * grid * grid, cfg.mask_ratio)
        return model(pixel_values=data[idx], bool_masked_pos=mask).loss

    stats = _run(cfg, model.parameters(), loss_fn)
    return model.videomae.eval(), stats


def dino_initial(seed: int) -> Any:
    """The DINOv2 student at its seeded initialisation (the random twin)."""
    from transformers import Dinov2Model

    torch.manual_seed(seed)
    return Dinov2Model(dino_config()).float()


def _instance_norm(h: torch.Tensor) -> torch.Tensor:
    """Normalise each channel over the patches of one image (data2vec)."""
    return F.instance_norm(h.transpose(1, 2)).transpose(1, 2)


def pretrain_dino(clips: np.ndarray, cfg: PretrainConfig) -> tuple[Any, dict[str, Any]]:
    """Masked-token self-distillation (default) or SimMIM on the frames of uint8 clips
    [N,T,H,W,3]; returns (Dinov2Model, stats)."""
    if cfg.objective not in ("distill", "simmim"):
        raise ValueError(f"dino objective must be 'distill' or 'simmim', got {cfg.objective!r}")
    student = dino_initial(cfg.seed).train()
    size, patch = int(student.config.image_size), int(student.config.patch_size)
    grid, dim = size // patch, int(student.config.hidden_size)
    frames = torch.from_numpy(clips.reshape(-1, *clips.shape[2:]))
    data = normalise(frames, size, "bicubic")
    cfg = PretrainConfig(**{**asdict(cfg), "clips": data.shape[0]})
    torch.manual_seed(cfg.seed + 1)
    out_dim = dim if cfg.objective == "distill" else 3 * patch * patch
    head = torch.nn.Linear(dim, out_dim)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)

    def targets(x: torch.Tensor) -> torch.Tensor:
        if cfg.objective == "simmim":
            p = x.unfold(2, patch, patch).unfold(3, patch, patch)  # B,3,g,g,p,p
            p = p.permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], grid * grid, -1)
            return (p - p.mean(-1, keepdim=True)) / (p.std(-1, keepdim=True) + 1e-6)
        with torch.no_grad():
            hs = teacher(pixel_values=x, output_hidden_states=True).hidden_states
            layers = [_instance_norm(h[:, 1:]) for h in hs[-cfg.target_layers :]]
            return sum(layers) / len(layers)

    def loss_fn(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = data[idx]
        mask = _random_mask(gen, len(idx), grid * grid, cfg.mask_ratio)
        pred = head(student(pixel_values=x, bool_masked_pos=mask).last_hidden_state[:, 1:])
        return F.mse_loss(pred[mask], targets(x)[mask])

    def ema(step: int) -> None:
        if cfg.objective != "distill":
            return
        m = 1 - (1 - cfg.ema_start) * 0.5 * (1 + math.cos(math.pi * (step + 1) / cfg.steps))
        with torch.no_grad():
            for pt, ps in zip(teacher.parameters(), student.parameters(), strict=True):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)

    stats = _run(cfg, [*student.parameters(), *head.parameters()], loss_fn, ema)
    # The teacher (EMA of the student) is the encoder kept, as in DINO/iBOT/data2vec.
    return (teacher if cfg.objective == "distill" else student).eval(), stats
