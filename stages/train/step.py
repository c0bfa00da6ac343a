"""One optimizer step, callable on its own (the trainer's loop and bench/train_step.py use it).

`prepare_batch` moves a loader batch to the device and reconstructs each encoder's targets
there from their stored format (dequantise, PCA, time interpolation, L2 normalisation), so the
loader moves compact bytes. `train_step` runs the micro-batches (forward, backward), clips,
syncs the losses once across ranks, refuses a non-finite step before the weights change,
then steps AdamW and the EMA.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cache_schema.formats import reconstruct, reconstruct_raw
from cache_schema.layout import EncoderEntry
from stages.common.flow import flow_loss, interpolate, sample_timesteps, velocity_target
from stages.common.models.adapter import Condition, Conditioning
from stages.common.models.fsdp import clip_grad_norm

from .data import leading_parts, unpack, unpack_text
from .state import TrainState, ema_decay_at, update_ema


class NonFiniteLoss(RuntimeError):
    """The loss or gradient became NaN/Inf; the run stops and keeps its last good checkpoint."""


@dataclass
class StepConfig:
    """What a step needs besides the state and the batch."""

    device: torch.device
    encoders: dict[str, EncoderEntry]  # cache layout entries of the targets to reconstruct
    bases: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # PCA bases on the device
    frames: int = 1  # DiT grid T: targets are interpolated to it
    raw_targets: bool = False  # the encoders' raw tokens, not unit ones (iREPA's spatial z-score)
    use_bf16: bool = False
    grad_accum: int = 1
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    time_schedule: str = "uniform"
    time_mean: float = 0.0
    time_std: float = 1.0
    world_size: int = 1
    rank: int = 0
    batch_size: int = 0  # per rank, nominal (0: each batch's own size); see _global_draw


@dataclass
class StepMetrics:
    loss: float
    flow_loss: float
    align_loss: float
    grad_norm: float
    cos: dict[str, float]
    stop_requested: bool
    lr: float = math.nan  # the learning rate this step ran at (of the model's param group)


def prepare_batch(batch: dict[str, Any], cfg: StepConfig, with_targets: bool = True) -> dict[str, Any]:
    """Loader batch -> device tensors: x0 float32 latents, labels, dense targets {encoder: [B,T,H,W,D]},
    and with prompt embeddings in the shards `text_embeds` float32 [B, L, D] and `text_mask` bool [B, L].

    The batch's compact bytes cross to the device in one copy (done ahead by data.DevicePrefetch on
    CUDA; else here, only the latents' part when the targets are not needed this step); the targets
    are dequantised and reconstructed there."""
    dev = cfg.device
    buffer = batch.get("device_buffer")  # already copied by data.DevicePrefetch (CUDA)
    if buffer is None:
        buffer = batch["buffer"]
        if not with_targets:
            last = leading_parts(batch) - 1  # the latents (and the prompt) come first
            key, role, dtype, shape, start = batch["layout"][last]
            buffer = buffer[: start + batch["batch_size"] * int(np.prod(shape)) * np.dtype(dtype).itemsize]
        buffer = buffer.to(dev, non_blocking=True)
    latent, stored = unpack(batch, buffer, with_targets)
    out: dict[str, Any] = {
        "x0": latent.float(),
        "label": batch["label"].to(dev, non_blocking=True),
        "targets": {},
    }
    text = unpack_text(batch, buffer)
    if text is not None:
        out["text_embeds"], out["text_mask"] = text[0].float(), text[1].bool()
    if with_targets:
        for name, entry in cfg.encoders.items():
            values, scales, norms = stored[name]
            if cfg.raw_targets and norms is None and entry.stores_norms:
                raise ValueError(f"raw targets of {name!r} need its token norms, which this batch lacks")
            args = (values, scales, entry.format, entry.stored_dim, cfg.frames, cfg.bases.get(name))
            out["targets"][name] = (
                reconstruct_raw(*args, norms=norms) if cfg.raw_targets else reconstruct(*args)
            )
    return out


def _global_draw(cfg: StepConfig, n: int, draw) -> torch.Tensor:
    """This rank's rows of a draw made for the whole global micro-batch: every rank's generator is
    in the same state and draws for batch_size x world_size samples, so the noise, times and
    class dropout of each global position do not depend on the number of ranks (elastic resume)."""
    per_rank = cfg.batch_size or n
    start = cfg.rank * per_rank
    return draw(per_rank * cfg.world_size)[start : start + n]


def _condition(
    batch: dict[str, Any], conditioning: Conditioning, gen: torch.Generator, cfg: StepConfig
) -> Condition:
    """This micro-batch's condition: class ids (unlabelled -> the null class), or the cached prompt
    embeddings and mask, with this step's dropout mask drawn from the step's generator for the
    global micro-batch (so a resume on any number of ranks replays it; the adapter gives dropped
    samples its null condition, for text the stored empty prompt); empty when unconditional."""
    if not conditioning.conditional:
        return Condition()
    labels = batch["label"]
    if conditioning.kind == "text":
        if "text_embeds" not in batch:
            raise ValueError(
                "the model is text-conditioned but the shards' batches carry no prompt embeddings; "
                "extract a captioned manifest with --base and pack it"
            )
        embeds = batch["text_embeds"]
        u = _global_draw(cfg, embeds.shape[0], lambda n: torch.rand(n, generator=gen, device=embeds.device))
        drop = u < conditioning.dropout
        return Condition(text_embeds=embeds, text_mask=batch["text_mask"], drop=drop)
    null = conditioning.num_classes
    y = torch.where(labels < 0, torch.full_like(labels, null), labels)
    u = _global_draw(cfg, y.shape[0], lambda n: torch.rand(n, generator=gen, device=y.device))
    return Condition(class_labels=y, drop=u < conditioning.dropout)


def micro_step(
    state: TrainState, batch: dict[str, Any], cfg: StepConfig, weights: dict[str, float] | None, measure: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Losses of one micro-batch: (total, flow, weighted alignment, cosine per encoder)."""
    x0, adapter, gen = batch["x0"], state.adapter, state.gen
    condition = _condition(batch, adapter.conditioning, gen, cfg)
    t = _global_draw(
        cfg,
        x0.shape[0],
        lambda n: sample_timesteps(n, cfg.time_schedule, gen, cfg.device, cfg.time_mean, cfg.time_std),
    )
    t = adapter.objective.shift_time(t)
    eps = _global_draw(
        cfg, x0.shape[0], lambda n: torch.randn((n, *x0.shape[1:]), generator=gen, device=cfg.device)
    )
    depth = state.align_depth if (state.head is not None and (weights is not None or measure)) else None
    with torch.autocast(cfg.device.type, dtype=torch.bfloat16, enabled=cfg.use_bf16):
        out = adapter.forward(state.forward_model, interpolate(x0, eps, t), t, condition, depth)
        velocity, hidden = out.velocity, out.hidden
        flow = flow_loss(velocity, velocity_target(x0, eps))
        align, cos = torch.zeros_like(flow), {}
        if hidden is not None and weights is not None:
            align, cos = state.forward_head(hidden, batch["targets"], weights)
        elif hidden is not None:  # alignment off: the frozen projectors only measure
            with torch.no_grad():
                _, cos = state.head(hidden.detach(), batch["targets"], dict.fromkeys(state.head.names, 0.0))
    return flow + align, flow, align, cos


def train_step(
    state: TrainState,
    batches: list[dict[str, Any]],
    cfg: StepConfig,
    weights: dict[str, float] | None,
    measure: bool = False,
    stop: bool = False,
) -> StepMetrics:
    """One optimizer step over the micro-batches (already on the device, see prepare_batch).

    `weights` are the per-encoder alignment weights of this step (None: no alignment loss);
    `measure` records cosines even without alignment; `stop` is this rank's stop request,
    OR-ed across ranks."""
    names = list(state.head.names) if state.head is not None else []
    totals = torch.zeros(3, device=cfg.device)
    cos_totals = torch.zeros(len(names), device=cfg.device)
    for i, batch in enumerate(batches):
        with state.no_sync() if i < len(batches) - 1 else contextlib.nullcontext():
            loss, flow, align, cos = micro_step(state, batch, cfg, weights, measure)
            (loss / cfg.grad_accum).backward()
        totals += torch.stack([loss, flow, align]).detach().float() / cfg.grad_accum
        if cos:
            cos_totals += torch.stack([cos[n] for n in names]).detach().float() / cfg.grad_accum
    params = state.parameters()
    grad_norm = clip_grad_norm(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)  # DTensors too
    flags = torch.tensor([float(stop)], device=cfg.device)
    stats = torch.cat([totals, cos_totals, grad_norm.detach().float().reshape(1).to(cfg.device), flags])
    if cfg.world_size > 1:  # one sync per step: averaged losses, the stop flag
        dist.all_reduce(stats)
        stats /= cfg.world_size
    values = stats.tolist()
    metrics = StepMetrics(
        loss=values[0],
        flow_loss=values[1],
        align_loss=values[2],
        grad_norm=values[-2],
        cos=dict(zip(names, values[3 : 3 + len(names)], strict=True))
        if (weights is not None or measure)
        else {},
        stop_requested=values[-1] > 0,
    )
    if not all(
        math.isfinite(v) for v in (metrics.loss, metrics.flow_loss, metrics.align_loss, metrics.grad_norm)
    ):
        state.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(
            f"non-finite loss at step {state.step + 1} (loss={metrics.loss}, flow={metrics.flow_loss}, "
            f"align={metrics.align_loss}, grad_norm={metrics.grad_norm}); stopped without updating the weights"
        )
    metrics.lr = float(state.optimizer.param_groups[0]["lr"])
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    if state.lr_scheduler is not None:
        state.lr_scheduler.step()
    update_ema(state.ema, state.model, ema_decay_at(state.step + 1, cfg.ema_decay, cfg.ema_warmup))
    state.step += 1
    return metrics
