"""Which weights to sample from: a run's latest checkpoint, a step folder, or a save_pretrained
folder, read through the run-directory contract (cache_schema.run)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache_schema import RunDir, RunError
from cache_schema.run import CHECKPOINTS, weights_folder
from stages.common.dit import VideoDiT

log = logging.getLogger(__name__)


@dataclass
class ResolvedCheckpoint:
    weights_dir: Path  # the save_pretrained folder actually loaded
    weights: str  # "ema", "model" or "pretrained" (a bare save_pretrained folder)
    checkpoint: Path  # the step folder (or the save_pretrained folder)
    run: RunDir | None
    vae_spec: dict[str, Any] = field(default_factory=dict)  # the VAE the run's latents came from


def resolve_checkpoint(run: str | None, checkpoint: str | None, ema: bool = True) -> ResolvedCheckpoint:
    """The weights folder to load from `--run` and/or `--checkpoint`, preferring EMA weights."""
    run_dir = RunDir(run).require() if run else None
    if checkpoint:
        path = Path(checkpoint)
        if not path.exists() and run_dir is not None and (run_dir.checkpoints / checkpoint).exists():
            path = run_dir.checkpoints / checkpoint  # --checkpoint step-0000020 inside --run
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        if run_dir is None and path.parent.name == CHECKPOINTS and RunDir(path.parent.parent).exists():
            run_dir = RunDir(path.parent.parent)
    else:
        path = run_dir.latest_checkpoint()
        if path is None:
            raise RunError(f"run {run_dir.path} has no checkpoint yet (checkpoints/latest is missing)")
    folder, kind = weights_folder(path, ema=ema)
    if ema and kind == "model":
        log.warning("%s has no EMA weights; sampling with the raw model weights", path)
    vae_spec = run_dir.vae_spec() if run_dir is not None else {}
    return ResolvedCheckpoint(folder, kind, path, run_dir, vae_spec)


def load_model(resolved: ResolvedCheckpoint) -> VideoDiT:
    """The VideoDiT in eval mode, fp32, on CPU (the caller moves it)."""
    model = VideoDiT.from_pretrained(str(resolved.weights_dir), low_cpu_mem_usage=False)
    return model.float().eval()
