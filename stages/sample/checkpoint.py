"""Which weights to sample from: a run's latest checkpoint, a step folder, or a save_pretrained
folder, read through the run-directory contract (cache_schema.run)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from cache_schema import RunDir, RunError
from cache_schema.checkpoint import MANIFEST, CheckpointError, verify_checkpoint
from cache_schema.run import CHECKPOINTS, LORA_WEIGHTS_FILE, weights_folder
from stages.common.models.adapter import VideoModelAdapter
from stages.common.models.factory import load_adapter

log = logging.getLogger(__name__)


@dataclass
class ResolvedCheckpoint:
    weights_dir: Path  # the save_pretrained folder actually loaded
    weights: str  # "ema", "model" or "pretrained" (a bare save_pretrained folder)
    checkpoint: Path  # the step folder (or the save_pretrained folder)
    run: RunDir | None
    vae_spec: dict[str, Any] = field(default_factory=dict)  # the VAE the run's latents came from
    family: str | None = None  # the run's model family; None: read from the weights' config.json
    run_config: dict[str, Any] = field(default_factory=dict)  # RUN/config.yaml ({} outside a run)

    @property
    def base(self) -> str | None:
        """The pretrained model a fine-tuned run started from (`train --base`), else None."""
        return self.run_config.get("base")


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
    config = run_dir.read_config() if run_dir is not None else {}
    vae_spec = dict(config.get("vae_spec") or {})
    family = config.get("model_family")
    return ResolvedCheckpoint(folder, kind, path, run_dir, vae_spec, family, config)


def verify_weights(resolved: ResolvedCheckpoint) -> None:
    """Check the weights about to be loaded against the checkpoint's checksums (a checkpoint
    written before checksums loads unverified)."""
    folder = resolved.weights_dir
    if (folder.parent / MANIFEST).is_file():  # ema/ or model/ inside a step folder
        verify_checkpoint(folder.parent, within=f"{folder.name}/")
    elif (folder / MANIFEST).is_file():
        verify_checkpoint(folder)


def damaged(resolved: ResolvedCheckpoint, problem: str) -> CheckpointError:
    """`problem` with the way out: another checkpoint of the run, when it has one."""
    others = [p.name for p in resolved.run.step_dirs() if p != resolved.checkpoint] if resolved.run else []
    hint = f"--checkpoint {others[-1]}" if others else "--checkpoint PATH"
    return CheckpointError(f"{problem}. Sample from another checkpoint ({hint})")


def _load_finetuned(resolved: ResolvedCheckpoint) -> VideoModelAdapter:
    """A `train --base` run's model: the base with the checkpoint's LoRA file, or its full
    fine-tune (save_pretrained) with the base's timestep shift."""
    from stages.common.models.factory import adapter_class

    folder, base = resolved.weights_dir, str(resolved.base)
    family = adapter_class(resolved.family or "wan")
    if (folder / LORA_WEIGHTS_FILE).is_file():
        from stages.common.models.lora import load_lora

        adapter = family.from_pretrained(base)
        load_lora(adapter.module, folder)
        return adapter
    from stages.common.models.wan import flow_shift

    return family.from_pretrained(folder, shift=flow_shift(base))


def load_model(resolved: ResolvedCheckpoint) -> VideoModelAdapter:
    """The model's adapter, its module in eval mode, fp32, on CPU (the caller moves it); a damaged
    weight file is named (checksum, unreadable file or non-finite weights) instead of failing later."""
    try:
        verify_weights(resolved)
    except CheckpointError as exc:
        raise damaged(resolved, str(exc)) from None
    folder = resolved.weights_dir
    try:
        adapter = _load_finetuned(resolved) if resolved.base else load_adapter(folder, resolved.family)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        files = sorted(folder.glob("*.safetensors"))
        name = files[0] if len(files) == 1 else folder
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise damaged(resolved, f"{name} cannot be read ({detail})") from None
    bad = [n for n, p in adapter.module.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise damaged(resolved, f"{folder} holds non-finite weights ({bad[0]}, {len(bad)} tensors)")
    adapter.module.float().eval()
    return adapter
