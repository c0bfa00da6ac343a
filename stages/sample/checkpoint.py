"""Find and load the inference model a train run saved.

Layout written by `pipeline train`: RUN/config.yaml, RUN/checkpoints/step-XXXXXXX/{model,ema}/
(each a `VideoDiT.save_pretrained` folder) and RUN/checkpoints/latest naming the newest step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages.common.dit import VideoDiT

log = logging.getLogger(__name__)

DEFAULT_LATENT_SCALE = 0.18215


@dataclass
class ResolvedCheckpoint:
    weights_dir: Path  # the save_pretrained folder actually loaded
    weights: str  # "ema", "model" or "pretrained" (a bare save_pretrained folder)
    run_dir: Path | None
    run_config: dict[str, Any]


def _is_pretrained(path: Path) -> bool:
    return (path / "config.json").is_file()


def latest_step(run_dir: Path) -> Path:
    """RUN/checkpoints/<name in `latest`>, else the highest step-* folder."""
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        raise FileNotFoundError(f"run {run_dir} has no checkpoints/ folder (has it saved a checkpoint yet?)")
    marker = ckpts / "latest"
    if marker.is_file():
        name = marker.read_text().strip()
        step = ckpts / name
        if step.is_dir():
            return step
        log.warning("checkpoints/latest names %r, which does not exist; using the highest step folder", name)
    steps = sorted(p for p in ckpts.glob("step-*") if p.is_dir())
    if not steps:
        raise FileNotFoundError(f"run {run_dir} has no checkpoints/step-* folders")
    return steps[-1]


def _read_run_config(run_dir: Path | None) -> dict[str, Any]:
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return {}
    data = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{run_dir / 'config.yaml'} does not hold a mapping")
    return data


def resolve_checkpoint(run: str | None, checkpoint: str | None, ema: bool = True) -> ResolvedCheckpoint:
    """Pick the weights folder to load from `--run` and/or `--checkpoint`, preferring EMA weights."""
    run_dir = Path(run) if run else None
    if run_dir is not None and not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if checkpoint:
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if (
            run_dir is None
            and path.parent.name == "checkpoints"
            and (path.parent.parent / "config.yaml").is_file()
        ):
            run_dir = path.parent.parent
    else:
        assert run_dir is not None
        path = latest_step(run_dir)
    run_config = _read_run_config(run_dir)

    if _is_pretrained(path):
        return ResolvedCheckpoint(path, "pretrained", run_dir, run_config)
    order = ["ema", "model"] if ema else ["model"]
    for name in order:
        if _is_pretrained(path / name):
            if ema and name == "model":
                log.warning("%s has no EMA weights; sampling with the raw model weights", path)
            return ResolvedCheckpoint(path / name, name, run_dir, run_config)
    raise FileNotFoundError(
        f"{path} is neither a save_pretrained folder (config.json) nor a step folder with "
        f"{' or '.join(order)}/ inside"
    )


def load_model(resolved: ResolvedCheckpoint) -> VideoDiT:
    """The VideoDiT in eval mode, fp32, on CPU (the caller moves it)."""
    model = VideoDiT.from_pretrained(str(resolved.weights_dir), low_cpu_mem_usage=False)
    return model.float().eval()
