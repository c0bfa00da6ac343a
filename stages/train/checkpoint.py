"""Checkpoint layout read by the sample stage and by --resume.

RUN/checkpoints/step-0000020/
    model/                 VideoDiT.save_pretrained (config.json + safetensors): the raw weights
    ema/                   the EMA weights, same format (what sampling uses)
    projectors.safetensors alignment projectors (training only; not part of the inference model)
    train_state.pt         optimizer, step, RNG states per rank, loader position
RUN/checkpoints/latest     text: the newest complete step folder's name

A checkpoint is written into a temporary folder and renamed, and `latest` is replaced after
that, so a crash mid-write never leaves `latest` pointing at a partial checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder `checkpoints/latest` names, or None when the run has no checkpoint yet."""
    ckpt_root = Path(run_dir) / "checkpoints"
    marker = ckpt_root / LATEST
    if not marker.is_file():
        return None
    folder = ckpt_root / marker.read_text().strip()
    if not folder.is_dir():
        raise FileNotFoundError(f"{marker} names {folder.name}, which does not exist")
    return folder


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    ema: nn.Module,
    head: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """Write one checkpoint atomically and point `latest` at it. Rank 0 only."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp / "model", safe_serialization=True)
    ema.save_pretrained(tmp / "ema", safe_serialization=True)
    if head is not None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
            tmp / "projectors.safetensors",
        )
    torch.save({**state, "step": step, "optimizer": optimizer.state_dict()}, tmp / "train_state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    marker_tmp = ckpt_root / (LATEST + ".tmp")
    marker_tmp.write_text(final.name + "\n")
    os.replace(marker_tmp, ckpt_root / LATEST)
    return final


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def load_checkpoint(
    folder: str | Path,
    model: nn.Module,
    ema: nn.Module,
    head: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> dict[str, Any]:
    """Load weights, EMA, projectors and optimizer in place; return the rest of the train state."""
    folder = Path(folder)
    model.load_state_dict(_weights(folder / "model"))
    ema.load_state_dict(_weights(folder / "ema"))
    if head is not None:
        projector_file = folder / "projectors.safetensors"
        if not projector_file.is_file():
            raise FileNotFoundError(f"{folder} has no projectors.safetensors but this run aligns to encoders")
        head.load_state_dict(load_file(projector_file))
    state = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state.pop("optimizer"))
    return state
