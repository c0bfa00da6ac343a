"""Stage two: train a VideoDiT with flow matching and cached-target alignment, from shards alone.

Read top to bottom: check the cache, build model + projectors + EMA + AdamW, maybe resume,
then loop: micro-batches -> losses -> backward -> clip -> step -> EMA -> log / sample /
checkpoint. No encoder code is imported anywhere on this path.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import cache_schema
from stages.common.dit import VideoDiT, build_video_dit, default_align_depth
from stages.common.flow import flow_loss, interpolate, sample_timesteps, velocity_target

from . import checkpoint as ckpt
from .align import AlignmentHead
from .config import TrainConfig
from .data import LoaderSpec, derive_seed, iterate_steps, shard_urls
from .report import plot_losses, read_log, sample_latents, video_grid, write_gif


class NonFiniteLoss(RuntimeError):
    """The loss or gradient became NaN/Inf; the run stops and keeps its last good checkpoint."""


# ----------------------------------------------------------------------------- setup helpers


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """'auto' picks this rank's GPU when there is one, else the CPU."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA GPU is available")
        return torch.device("cuda", local_rank)
    return torch.device(preference)


def setup_distributed(device_preference: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def check_cache(cfg: TrainConfig) -> dict[str, Any]:
    """The shards' layout, after refusing a cache that does not match the request (names the field)."""
    errors = cache_schema.validate_shards(cfg.shards)
    if errors:
        raise cache_schema.CacheError("; ".join(errors))
    requested = {"fingerprint": cfg.expect_fingerprint, "encoders": list(cfg.encoders) or None}
    layout = cache_schema.compatible(cfg.shards, requested)
    run_config = Path(cfg.out) / "config.yaml"
    if cfg.resume and run_config.is_file():
        previous = yaml.safe_load(run_config.read_text()) or {}
        recorded = previous.get("expect_fingerprint")
        if recorded and recorded != layout["fingerprint"]:
            raise cache_schema.CacheMismatch("fingerprint", recorded, layout["fingerprint"], cfg.shards)
        chosen = list(cache_schema.encoder_slices(layout, list(cfg.encoders) or None))
        if previous.get("encoders") and list(previous["encoders"]) != chosen:
            raise ValueError(
                f"encoders: the run in {cfg.out} aligned to {previous['encoders']} but this resume asks "
                f"for {chosen}; pass --encoders {','.join(previous['encoders'])} or start a new run"
            )
    return layout


class Trainee(nn.Module):
    """The unit DDP wraps: VideoDiT + alignment head -> losses of one micro-batch."""

    def __init__(self, model: VideoDiT, head: AlignmentHead | None, align_depth: int, align_lambda: float):
        super().__init__()
        self.model, self.head = model, head
        self.align_depth, self.align_lambda = align_depth, align_lambda

    def forward(
        self,
        x0: torch.Tensor,
        eps: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        drop: torch.Tensor | None,
        target: torch.Tensor,
        with_hidden: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        x_t = interpolate(x0, eps, t)
        depth = self.align_depth if (with_hidden and self.head is not None) else None
        out = self.model(x_t, t, y, force_drop_ids=drop, return_hidden_at=depth)
        velocity, hidden = out if depth is not None else (out, None)
        flow = flow_loss(velocity, velocity_target(x0, eps))
        align = torch.zeros_like(flow)
        cos: dict[str, torch.Tensor] = {}
        if hidden is not None and self.align_lambda > 0:
            align, cos = self.head(hidden, target)
        elif hidden is not None:  # alignment off: frozen projectors only measure the similarity
            with torch.no_grad():
                _, cos = self.head(hidden.detach(), target)
        return flow + self.align_lambda * align, flow, align, cos


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)


def _rng_state(gen: torch.Generator, info: DistInfo) -> dict[str, Any]:
    states = [gen.get_state()]
    if info.distributed:
        states = [None] * info.world_size
        dist.all_gather_object(states, gen.get_state())
    return {"noise": states, "torch": torch.get_rng_state()}


class _StopFlag:
    """Set by SIGTERM: the loop finishes the current step, checkpoints and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. called from a notebook worker)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------- the run


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) training; returns a summary. Under torchrun every rank calls this."""
    cfg.validate()
    info = setup_distributed(cfg.device)
    try:
        return _train(cfg, info, progress)
    finally:
        if info.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, info: DistInfo, progress: bool) -> dict[str, Any]:
    device, run_dir = info.device, Path(cfg.out)
    use_bf16 = device.type == "cuda" and cfg.precision == "bf16"

    # --- the cache: refuse a mismatch before building anything
    layout = check_cache(cfg)
    slices = cache_schema.encoder_slices(layout, list(cfg.encoders) or None)
    channels, frames, height, width = layout["latent_shape"]
    class_names = layout.get("class_names") or []
    spec_vae = (layout.get("spec") or {}).get("vae") or {}
    latent_scale = cfg.latent_scale if cfg.latent_scale is not None else spec_vae.get("scale")

    # --- the run directory: never overwrite a run by accident
    resume_from = ckpt.latest_checkpoint(run_dir) if cfg.resume else None
    if not cfg.resume and (run_dir / "checkpoints" / ckpt.LATEST).exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or pick another --out"
        )

    # --- model, projectors, EMA, optimizer (same init on every rank)
    torch.manual_seed(cfg.seed)
    model = build_video_dit(
        cfg.model,
        in_channels=channels,
        num_frames=frames,
        sample_size=height,
        num_classes=len(class_names),
        class_dropout=cfg.class_dropout,
        gradient_checkpointing=cfg.gradient_checkpointing,
    ).to(device)
    depth = model.config.depth
    align_depth = cfg.align_depth or default_align_depth(depth)
    if align_depth > depth:
        raise ValueError(f"align_depth {align_depth} is deeper than the model ({depth} blocks)")
    head = AlignmentHead(model.config.hidden_size, slices, cfg.projector_dim).to(device)
    if cfg.align_lambda == 0:
        head.requires_grad_(False)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    resolved = replace(
        cfg,
        encoders=list(slices),
        align_depth=align_depth,
        expect_fingerprint=layout["fingerprint"],
        vae=cfg.vae or spec_vae.get("id"),
        latent_scale=latent_scale,
        resume=False,
    )
    segment_steps = cfg.checkpoint_every
    start_step, noise_state = 0, None
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, ema, head, optimizer, device)
        start_step = int(state["step"])
        loader_state = state.get("loader", {})
        segment_steps = int(loader_state.get("segment_steps", segment_steps))
        noise_states = state.get("rng", {}).get("noise", [])
        if len(noise_states) == info.world_size:
            noise_state = noise_states[info.rank]
        elif info.is_main:
            tqdm.write(
                f"note: resuming on {info.world_size} ranks from {len(noise_states)}; noise streams reseeded"
            )
        torch.set_rng_state(state["rng"]["torch"])
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(resolved, run_dir / "config.yaml")
        _truncate_log(run_dir / "log.jsonl", start_step)

    # --- noise / timestep / class-dropout randomness: one generator per rank, checkpointed
    gen = torch.Generator(device=device).manual_seed(derive_seed("noise", cfg.seed, info.rank, start_step))
    if noise_state is not None:
        gen.set_state(noise_state)

    trainee = Trainee(model, head, align_depth, cfg.align_lambda)
    ddp = None
    if info.distributed:
        ddp = DistributedDataParallel(trainee, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn: nn.Module = ddp if ddp is not None else trainee

    loader = LoaderSpec(
        urls=shard_urls(cfg.shards, layout),
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        batches_per_step=cfg.grad_accum,
        segment_steps=segment_steps,
        shuffle_buffer=cfg.shuffle_buffer,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    batches = iterate_steps(loader, start_step)

    vae = (
        _load_vae(cfg, spec_vae, latent_scale, device)
        if info.is_main and cfg.vae and cfg.sample_every > 0
        else None
    )
    writer = None
    if info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(
            str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
        )

    samples_per_step = cfg.batch_size * cfg.grad_accum * info.world_size
    stop = _StopFlag()
    stop.install()
    window: dict[str, Any] = _new_window()
    last_row: dict[str, Any] = {}
    saved_step = start_step
    interrupted = False
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not (progress and info.is_main),
    )
    model.train()
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            log_now = step % cfg.log_every == 0 or step == cfg.steps
            with_hidden = cfg.align_lambda > 0 or log_now

            # --- forward / backward over the micro-batches of this step
            micro_batches = next(batches)
            totals = torch.zeros(3, device=device)
            cos_totals = torch.zeros(len(slices), device=device)
            for i, batch in enumerate(micro_batches):
                x0 = batch["latent"].to(device, non_blocking=True)
                target = batch["target"].to(device, non_blocking=True)
                y, drop = _labels(batch["label"].to(device, non_blocking=True), model, gen)
                t = sample_timesteps(x0.shape[0], cfg.time_schedule, gen, device)
                eps = torch.randn(x0.shape, generator=gen, device=device)
                sync = ddp is not None and i < len(micro_batches) - 1
                with ddp.no_sync() if sync else contextlib.nullcontext():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        loss, flow, align, cos = step_fn(x0, eps, t, y, drop, target, with_hidden)
                    (loss / cfg.grad_accum).backward()
                totals += torch.stack([loss, flow, align]).detach().float() / cfg.grad_accum
                if cos:
                    cos_totals += torch.stack([cos[n] for n in slices]).detach().float() / cfg.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            )

            # --- one sync per step: averaged losses, the stop flag, finiteness
            stats = torch.cat([totals, cos_totals, grad_norm.detach().float().reshape(1).to(device)])
            stats = torch.cat([stats, torch.tensor([float(stop.requested)], device=device)])
            if info.distributed:
                dist.all_reduce(stats)
                stats /= info.world_size
            values = stats.tolist()
            loss_v, flow_v, align_v = values[:3]
            cos_v = dict(zip(slices, values[3 : 3 + len(slices)], strict=True))
            grad_norm_v, stop_requested = values[-2], values[-1] > 0
            if not all(map(_finite, (loss_v, flow_v, align_v, grad_norm_v))):
                raise NonFiniteLoss(
                    f"non-finite loss at step {step} (loss={loss_v}, flow={flow_v}, align={align_v}, "
                    f"grad_norm={grad_norm_v}); stopped without updating the weights. The last good "
                    f"checkpoint is {ckpt.latest_checkpoint(run_dir) or 'none (no checkpoint written yet)'}"
                )

            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_ema(ema, model, cfg.ema)
            bar.update(1)

            # --- log
            window["steps"] += 1
            for key, value in (
                ("loss", loss_v),
                ("flow_loss", flow_v),
                ("align_loss", align_v),
                ("grad_norm", grad_norm_v),
            ):
                window[key] += value
            if with_hidden:
                window["cos_steps"] += 1
                for name, value in cos_v.items():
                    window["cos"][name] = window["cos"].get(name, 0.0) + value
            if log_now:
                last_row = _log_row(step, window, optimizer, samples_per_step, step * samples_per_step)
                if info.is_main:
                    _write_row(run_dir / "log.jsonl", writer, last_row)
                    bar.set_postfix(loss=f"{last_row['loss']:.4f}", align=f"{last_row['align_loss']:.3f}")
                window = _new_window()

            # --- periodic samples (rank 0, EMA weights)
            if vae is not None and step % cfg.sample_every == 0:
                _write_samples(
                    ema, vae, (channels, frames, height, width), cfg, step, device, use_bf16, run_dir
                )
                window["start"] = time.perf_counter()

            # --- checkpoint: on schedule, at the end, or when asked to stop
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop_requested:
                state = {
                    "rng": _rng_state(gen, info),
                    "loader": {
                        "seed": cfg.seed,
                        "segment_steps": segment_steps,
                        "samples_consumed": step * samples_per_step,
                        "world_size": info.world_size,
                    },
                    "config": json.dumps(_config_dict(resolved)),
                }
                if info.is_main:
                    ckpt.save_checkpoint(run_dir, step, model, ema, head, optimizer, state)
                if info.distributed:
                    dist.barrier()
                saved_step = step
                window["start"] = time.perf_counter()
            if stop_requested:
                interrupted = True
                if info.is_main:
                    tqdm.write(f"SIGTERM: checkpoint written at step {step}; exiting cleanly")
                break
    finally:
        bar.close()
        stop.uninstall()
        if writer is not None:
            writer.close()
        if info.is_main:
            plot_losses(run_dir / "log.jsonl", run_dir / "loss.png")
    return {
        "run_dir": str(run_dir),
        "step": saved_step,
        "interrupted": interrupted,
        "checkpoint": str(ckpt.latest_checkpoint(run_dir)) if info.is_main else None,
        "last_log": last_row,
        "align_depth": align_depth,
        "encoders": list(slices),
    }


# ----------------------------------------------------------------------------- small pieces


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


def _labels(
    labels: torch.Tensor, model: VideoDiT, gen: torch.Generator
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Class ids (unlabelled -> null class) and this step's class-dropout mask, or (None, None)."""
    null = model.null_class
    if null is None:
        return None, None
    y = torch.where(labels < 0, torch.full_like(labels, null), labels)
    drop = torch.rand(y.shape[0], generator=gen, device=y.device) < model.config.class_dropout
    return y, drop


def _new_window() -> dict[str, Any]:
    return {
        "start": time.perf_counter(),
        "steps": 0,
        "loss": 0.0,
        "flow_loss": 0.0,
        "align_loss": 0.0,
        "grad_norm": 0.0,
        "cos_steps": 0,
        "cos": {},
    }


def _log_row(
    step: int, window: dict[str, Any], optimizer: torch.optim.Optimizer, samples_per_step: int, seen: int
) -> dict[str, Any]:
    n = max(1, window["steps"])
    elapsed = max(time.perf_counter() - window["start"], 1e-9)
    cos = {name: total / max(1, window["cos_steps"]) for name, total in window["cos"].items()}
    return {
        "step": step,
        "loss": window["loss"] / n,
        "flow_loss": window["flow_loss"] / n,
        "align_loss": window["align_loss"] / n,
        "cos_sim": cos,
        "lr": optimizer.param_groups[0]["lr"],
        "grad_norm": window["grad_norm"] / n,
        "samples_per_s": window["steps"] * samples_per_step / elapsed,
        "samples_seen": seen,
    }


def _write_row(path: Path, writer: Any, row: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    step = row["step"]
    for key in ("loss", "flow_loss", "align_loss", "lr", "grad_norm", "samples_per_s"):
        writer.add_scalar(f"train/{key}", row[key], step)
    for name, value in row["cos_sim"].items():
        writer.add_scalar(f"align/cos_{name}", value, step)


def _truncate_log(path: Path, start_step: int) -> None:
    """On resume, drop log rows written after the checkpoint we resume from (they will be redone)."""
    rows = read_log(path)
    if rows and any(r["step"] > start_step for r in rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= start_step))


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(cfg), default=str))


def write_run_config(cfg: TrainConfig, path: Path) -> None:
    """RUN/config.yaml: the resolved config (the sample stage reads `vae` and `latent_scale`)."""
    path.write_text(yaml.safe_dump(_config_dict(cfg), sort_keys=False))


def _load_vae(cfg: TrainConfig, spec_vae: dict[str, Any], scale: float | None, device: torch.device):
    from stages.common.vae import VAEWrapper

    kind = "video" if int(spec_vae.get("temporal_factor", 1) or 1) > 1 else "image"
    return VAEWrapper.load(cfg.vae, kind=kind, scale=scale, device=device)


def _write_samples(
    ema: nn.Module,
    vae: Any,
    shape: tuple[int, int, int, int],
    cfg: TrainConfig,
    step: int,
    device: torch.device,
    use_bf16: bool,
    run_dir: Path,
) -> Path:
    latents = sample_latents(ema, shape, cfg.num_samples, cfg.sample_steps, device, cfg.seed, use_bf16)
    frames = vae.decode(latents).numpy()
    return write_gif(video_grid(frames), run_dir / "samples" / f"{ckpt.step_dir_name(step)}.gif")
