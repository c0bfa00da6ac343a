"""Sample videos from a trained model: ODE/SDE sampling in latent space, VAE decode, write out."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache_schema import OutputError, OutputLock, prepare_output
from cache_schema.outputs import LOCK, MARKER, clear_artifact
from stages.common.progress import tqdm
from stages.common.registry import SD_LATENT_SCALE
from stages.common.runtime import config_to_dict, dump_config, resolve_device
from stages.common.sampling import generate_latents, sample_labels, write_filmstrip, write_gif_grid
from stages.sample.checkpoint import ResolvedCheckpoint, damaged, load_model, resolve_checkpoint
from stages.sample.config import SampleConfig
from stages.sample.writers import NpzVideoWriter, save_npz, write_video

SUMMARY_FILE = "summary.json"  # written last: its presence marks a finished set of samples

log = logging.getLogger(__name__)


def _output_dir(cfg: SampleConfig, resolved: ResolvedCheckpoint) -> Path:
    """--out, or RUN/samples/<checkpoint name> (next to the run's training-time GIF grids)."""
    if cfg.out:
        return Path(cfg.out)
    if resolved.run is None:
        raise ValueError("out: an output folder (--out) is required with --checkpoint outside a run")
    return resolved.run.samples / resolved.checkpoint.name


def vae_settings(cfg: SampleConfig, resolved: ResolvedCheckpoint) -> tuple[str | None, str, float | None]:
    """(VAE id or None for latents only, kind, scale): flags win over the run's recorded VAE spec."""
    spec = resolved.vae_spec
    vae_id = cfg.vae or spec.get("id")
    if isinstance(vae_id, str) and vae_id.strip().lower() in ("", "none", "null"):
        vae_id = None  # `--vae none`: skip decoding even if the run has a VAE
    kind = cfg.vae_kind or spec.get("kind") or "image"
    scale = cfg.latent_scale or spec.get("scale") or (SD_LATENT_SCALE if kind == "image" else None)
    return vae_id, kind, scale


def _load_vae(vae_id: str, kind: str, scale: float | None, device: torch.device):
    from stages.common.models.vae import VAEWrapper

    return VAEWrapper.load(vae_id, kind=kind, scale=scale, device=str(device), dtype=torch.float32)


def _decode_and_write(
    cfg: SampleConfig,
    vae: Any,
    latents: torch.Tensor,
    labels: np.ndarray,
    conditional: bool,
    out: Path,
    device: torch.device,
) -> list[np.ndarray]:
    """VAE-decode in batches; write one mp4 per video and videos.npz; return the GIF grid frames."""
    video_dir = out / "videos"
    video_dir.mkdir(exist_ok=True)
    grid: list[np.ndarray] = []
    npz = NpzVideoWriter(out / "videos.npz", cfg.num, labels)
    try:
        for lo in tqdm(range(0, cfg.num, cfg.batch_size), desc="decode", unit="batch"):
            idx = range(lo, min(lo + cfg.batch_size, cfg.num))
            with torch.no_grad():
                frames = vae.decode(latents[idx.start : idx.stop].to(device)).cpu().numpy()
            npz.write(frames)
            for i, video in zip(idx, frames, strict=True):
                suffix = f"_c{labels[i]}" if conditional else ""
                write_video(video_dir / f"{i:06d}{suffix}.mp4", video, cfg.fps)
            grid.extend(frames[: max(0, cfg.grid_max - len(grid))])
    finally:
        npz.close()
    return grid


def run_sample(cfg: SampleConfig) -> dict[str, Any]:
    """Generate `cfg.num` videos; returns the summary also written to OUT/summary.json."""
    cfg.validate()
    resolved = resolve_checkpoint(cfg.run, cfg.checkpoint, ema=cfg.ema)
    out = _output_dir(cfg, resolved)
    prepare_output(out, "samples", inputs={"--checkpoint": resolved.checkpoint})
    with OutputLock(str(out), "pipeline sample"):
        _replace_earlier(cfg, out)
        return _sample(cfg, resolved, out)


def _recorded(out: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return {k: v for k, v in (data or {}).items() if k != "overwrite"} if isinstance(data, dict) else {}


def _replace_earlier(cfg: SampleConfig, out: Path) -> None:
    """Samples already in `out` are kept unless --overwrite. An unfinished set (no summary.json:
    a killed sampler) of the same config is ours to redo; of another config it is refused too."""
    if not any(p.name not in (MARKER, LOCK) for p in out.iterdir()):
        return
    finished = (out / SUMMARY_FILE).is_file()
    recorded = _recorded(out)
    same = recorded == {k: v for k, v in config_to_dict(cfg).items() if k != "overwrite"}
    if cfg.overwrite or (same and not finished):
        clear_artifact(out, "samples")
        return
    what = "samples" if finished else "unfinished samples of another config"
    made = ", ".join(f"{k} {recorded[k]}" for k in ("num", "seed", "steps", "sampler") if k in recorded)
    raise OutputError(
        f"--out {out} already holds {what} ({made or 'unknown settings'}); pass --overwrite to replace "
        "them or choose another --out (nothing was changed)"
    )


def _sample(cfg: SampleConfig, resolved: ResolvedCheckpoint, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    use_amp = device.type == "cuda" and cfg.precision == "bf16"
    adapter = load_model(resolved)
    adapter.module.to(device)
    dump_config(cfg, out / "config.yaml")
    vae_id, vae_kind, scale = vae_settings(cfg, resolved)
    sample_labels(cfg.num, adapter.conditioning.num_classes, cfg.class_)  # a bad --class, before the VAE
    vae = _load_vae(vae_id, vae_kind, scale, device) if vae_id else None
    if vae is None:
        log.warning("no VAE configured (--vae or the run's VAE spec): writing latents only, no videos")

    texts, prompts = _prompts(cfg, resolved, adapter, device)
    try:
        latents, labels = _generate(
            cfg, adapter, device, use_amp, texts, resolved.run_config.get("latent_shape")
        )
    except FloatingPointError as exc:
        problem = f"sampling from {resolved.weights_dir} gave non-finite values ({exc}): its weights are damaged or diverged"
        raise damaged(resolved, problem) from None
    conditional = adapter.conditioning.conditional and texts is None  # class ids name the files
    keep_latents = vae is None or cfg.save_latents
    grid = _decode_and_write(cfg, vae, latents, labels, conditional, out, device) if vae is not None else []

    outputs: dict[str, str] = {"config": str(out / "config.yaml")}
    if grid:
        write_gif_grid(out / "grid.gif", np.stack(grid), cfg.fps)
        write_filmstrip(out / "filmstrip.png", np.stack(grid))
        outputs.update(videos=str(out / "videos"), grid=str(out / "grid.gif"), npz=str(out / "videos.npz"),
                       filmstrip=str(out / "filmstrip.png"))  # fmt: skip
    if keep_latents:
        save_npz(out / "latents.npz", latents=latents.numpy(), labels=labels)
        outputs["latents"] = str(out / "latents.npz")
    seconds = time.perf_counter() - start
    summary = {
        "num": cfg.num,
        "weights": resolved.weights,
        "weights_dir": str(resolved.weights_dir),
        "run_dir": str(resolved.run.path) if resolved.run else None,
        "checkpoint": str(resolved.checkpoint),
        "vae": vae_id,
        "vae_kind": vae_kind if vae is not None else None,
        "latent_scale": None if vae is None else float(vae.scale),
        "decoded": vae is not None,
        "sampler": cfg.sampler,
        "sampler_convention": cfg.sampler_convention,
        "steps": cfg.steps,
        "cfg": cfg.cfg,
        "guidance_interval": cfg.guidance_interval,
        "device": str(device),
        "class_counts": {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True), strict=True)},
        **({"prompts": [prompts[i % len(prompts)] for i in range(cfg.num)]} if prompts else {}),
        "seconds": round(seconds, 3),
        "videos_per_s": round(cfg.num / seconds, 4),
        "outputs": outputs,
    }
    tmp = out / (SUMMARY_FILE + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / SUMMARY_FILE)
    return summary


def _prompts(
    cfg: SampleConfig, resolved: ResolvedCheckpoint, adapter: Any, device: torch.device
) -> tuple[Any, list[str]]:
    """A text model's prompts, encoded with its base pipeline's text encoder (the empty prompt
    becomes the adapter's null condition); (None, []) for a class model, which refuses prompts."""
    from stages.sample.prompts import PROMPT_NEEDED, encode_prompts, read_prompts

    prompts = read_prompts(cfg.prompt, cfg.prompts)
    if adapter.conditioning.kind != "text":
        if prompts:
            raise ValueError(
                f"prompt: {resolved.weights_dir} is a class-conditioned model; use --class, not prompts"
            )
        return None, []
    if not prompts:
        raise ValueError(PROMPT_NEEDED)
    if not resolved.base:
        raise ValueError(
            f"{resolved.weights_dir}: a text-to-video checkpoint is sampled with --run RUN (its base)"
        )
    max_length = int(
        (resolved.run_config.get("text_spec") or {}).get("max_length", adapter.conditioning.max_text_tokens)
    )
    texts, null = encode_prompts(resolved.base, prompts, cfg.num, max_length, device)
    adapter.set_null_text(null)
    return texts, prompts


def _generate(
    cfg: SampleConfig,
    adapter: Any,
    device: torch.device,
    use_amp: bool,
    texts: Any = None,
    shape: list[int] | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    return generate_latents(
        adapter,
        adapter.module,
        cfg.num,
        steps=cfg.steps,
        sampler=cfg.sampler,
        convention=cfg.sampler_convention,
        seed=cfg.seed,
        cfg_scale=cfg.cfg,
        guidance_interval=cfg.guidance_interval,
        class_=cfg.class_,
        batch_size=cfg.batch_size,
        device=device,
        autocast=use_amp,
        diffusion_norm=cfg.diffusion_norm,
        progress=True,
        shape=shape,
        text=texts,
    )
