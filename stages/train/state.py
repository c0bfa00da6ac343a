"""The training state and how it is built, saved and loaded (torchtitan's "state" in one place).

TrainState holds everything a step changes: the model's adapter (stages/common/models; its
module is the trained network), its EMA, the alignment head (None once alignment has ended, or
when it never ran), AdamW, and the generator of noise, timesteps and class dropout (in the same
state on every rank: each draws for the global micro-batch and keeps its rows, step.py).
`save_state` / `load_state` write and read a checkpoint folder in
the run directory's layout (cache_schema.run): a resume restores all of it exactly.

Under torchrun the model is wrapped in DDP (`wrap_ddp`), or with --fsdp sharded with FSDP2
(`shard_state`): a checkpoint then still holds FULL weights and optimizer state in the same
format, gathered by `checkpoint_parts` (so an FSDP run resumes on any number of ranks, with or
without --fsdp, and its step folders load in diffusers as any other).
"""

from __future__ import annotations

import contextlib
import errno
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cache_schema import run as run_files
from cache_schema.checkpoint import CheckpointError, verify_checkpoint
from cache_schema.layout import CacheLayout
from stages.common.models.adapter import VideoModelAdapter
from stages.common.models.factory import build_adapter
from stages.common.runtime import is_disk_full

from .align import AlignmentHead
from .config import TrainConfig
from .data import derive_seed
from .finetune import ema_copy

PROJECTOR_GROUP = "projectors"
MODEL_FAMILY = "videodit"  # the family `pipeline train` builds (stages/common/models/factory.py)


@dataclass
class TrainState:
    adapter: VideoModelAdapter  # adapter.module is the trained network
    ema: nn.Module
    head: AlignmentHead | None
    optimizer: torch.optim.Optimizer
    gen: torch.Generator
    align_depth: int
    step: int = 0
    ddp_model: nn.Module | None = None  # DistributedDataParallel wrappers under torchrun
    ddp_head: nn.Module | None = None
    lr_scheduler: Any = None  # torch LambdaLR from diffusers' get_scheduler (lr.py), stepped per step
    skeleton: nn.Module | None = None  # --fsdp: the unsharded model on the meta device (checkpoint_parts)

    @property
    def model(self) -> nn.Module:
        return self.adapter.module

    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates (and gradient clipping sees)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def forward_model(self) -> nn.Module:
        return self.ddp_model or self.model

    @property
    def forward_head(self) -> nn.Module | None:
        return None if self.head is None else (self.ddp_head or self.head)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (DDP) for all but the last micro-batch."""
        with contextlib.ExitStack() as stack:
            for wrapper in (self.ddp_model, self.ddp_head if self.head is not None else None):
                if wrapper is not None:
                    stack.enter_context(wrapper.no_sync())
            yield


def wrap_ddp(state: TrainState, device: torch.device) -> None:
    """Wrap the model and the head for gradient all-reduce across torchrun ranks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    state.ddp_model = DDP(state.model, device_ids=ids)
    if state.head is not None and any(p.requires_grad for p in state.head.parameters()):
        state.ddp_head = DDP(state.head, device_ids=ids)


@dataclass
class CheckpointParts:
    """What a checkpoint writes: full (unsharded) model and EMA modules and the optimizer state dict."""

    model: nn.Module
    ema: nn.Module
    optimizer: dict[str, Any]


def shard_state(state: TrainState, device: torch.device) -> None:
    """--fsdp under torchrun, after any resume loaded the full weights: FSDP2-shard the model (each
    block, then the root; moved to `device` block by block), lay the EMA out as the sharded
    parameters (a LoRA EMA shares the frozen base again), move AdamW onto the sharded parameters
    with its state, and keep the alignment head replicated (DDP all-reduces its gradients)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from stages.common.models.fsdp import meta_copy, move_optimizer, shard_like, shard_model

    model, ema = state.model, state.ema
    names = {id(p): n for n, p in model.named_parameters()}
    shared = {n for (n, e), p in zip(ema.named_parameters(), model.parameters(), strict=True) if e is p}
    state.skeleton = meta_copy(model)
    shard_model(model, device=device)
    params = dict(model.named_parameters())
    for name, e in list(ema.named_parameters()):
        p = params[name]
        owner, _, leaf = name.rpartition(".")
        new = p if name in shared else nn.Parameter(shard_like(e, p), requires_grad=False)
        setattr(ema.get_submodule(owner), leaf, new)
    move_optimizer(state.optimizer, {i: params[n] for i, n in names.items()})
    if state.head is not None and any(p.requires_grad for p in state.head.parameters()):
        ids = [device.index] if device.type == "cuda" else None
        state.ddp_head = DDP(state.head, device_ids=ids)


def checkpoint_parts(state: TrainState) -> CheckpointParts | None:
    """The model, EMA and optimizer state a checkpoint writes. Sharded (--fsdp): a collective that
    gathers the full tensors to rank 0 (a LoRA run only its LoRA weights), which gets them as
    modules of the model's structure; the other ranks get None."""
    if state.skeleton is None:
        return CheckpointParts(state.model, state.ema, state.optimizer.state_dict())
    from stages.common.models.fsdp import gather_optimizer_state, gather_state_dict, materialize

    from .finetune import is_lora

    keep = (lambda name: "lora_" in name) if is_lora(state.model) else None
    model, ema = gather_state_dict(state.model, keep), gather_state_dict(state.ema, keep)
    optimizer = gather_optimizer_state(state.optimizer)
    if not optimizer:  # not rank 0
        return None
    return CheckpointParts(materialize(state.skeleton, model), materialize(state.skeleton, ema), optimizer)


def build_model(
    cfg: TrainConfig, layout: CacheLayout, null_text: torch.Tensor | None = None
) -> VideoModelAdapter:
    """A fresh model (MODEL_FAMILY) for the shards' latents, or with `cfg.base` the pretrained model
    (finetune.py; `null_text` is the shards' empty prompt for its CFG dropout)."""
    if cfg.base:
        from .finetune import build_pretrained

        return build_pretrained(cfg, layout, null_text)
    channels, frames, height, width = layout.latent_shape
    return build_adapter(
        MODEL_FAMILY,
        size=cfg.model,
        in_channels=channels,
        num_frames=frames,
        sample_size=height if height == width else (height, width),  # an int as before for square
        num_classes=len(layout.class_names),
        class_dropout=cfg.class_dropout,
        prediction=cfg.prediction,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )


def build_state(
    cfg: TrainConfig,
    layout: CacheLayout,
    encoder_dims: dict[str, int],
    lambdas: dict[str, float],
    device: torch.device,
    with_head: bool = True,
    null_text: torch.Tensor | None = None,
    sharded: bool = False,
) -> TrainState:
    """A fresh state, identical on every rank (seeded); the head only while alignment runs.
    The optimizer and the EMA see only the trainable parameters (a LoRA run's adapters).
    `sharded`: the model stays where it was built (the CPU); shard_state moves it block by block."""
    torch.manual_seed(cfg.seed)
    adapter = build_model(cfg, layout, null_text)
    model = adapter.module if sharded else adapter.module.to(device)
    depth = adapter.tokens.depth
    align_depth = cfg.align_depth or adapter.default_align_block()
    if align_depth > depth:
        raise ValueError(f"align_depth {align_depth} is deeper than the model ({depth} blocks)")
    head = None
    if with_head:
        head = AlignmentHead(
            adapter.tokens.hidden_size,
            encoder_dims,
            cfg.projector_dim,
            projector=cfg.projector,
            grid=layout.grid,
            target_norm=cfg.target_norm,
            kernel_size=cfg.projector_kernel,
        ).to(device)
        for name, weight in lambdas.items():  # never trained: no gradient, no optimizer state
            if weight == 0.0:
                head.projectors[name.replace(".", "_")].requires_grad_(False)
    ema = ema_copy(model)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "model"}]
    trainable = [p for p in head.parameters() if p.requires_grad] if head is not None else []
    if trainable:
        groups.append({"params": trainable, "name": PROJECTOR_GROUP})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **_fused(device))
    # one stream for all ranks; the 0 (once the rank) keeps single-rank runs as they were
    gen = torch.Generator(device=device).manual_seed(derive_seed("noise", cfg.seed, 0))
    return TrainState(adapter, ema, head, optimizer, gen, align_depth)


def _fused(device: torch.device) -> dict[str, bool]:
    """Fused AdamW (one kernel for all parameters) on CUDA and on the CPU, where it is 3x faster than
    the default for-each update (24 vs 73 ms for the demo's 6.5M-parameter model on one thread,
    measured; the optimizer step was then 60 % of a demo training step); the default elsewhere."""
    return {"fused": True} if device.type in ("cuda", "cpu") else {}


def drop_alignment(state: TrainState) -> None:
    """Alignment has ended for good: the projectors leave the optimizer, the state and checkpoints."""
    if state.head is None:
        return
    head_params = {id(p) for p in state.head.parameters()}
    for param in list(state.optimizer.state):
        if id(param) in head_params:
            del state.optimizer.state[param]
    state.optimizer.param_groups[:] = [
        g for g in state.optimizer.param_groups if g.get("name") != PROJECTOR_GROUP
    ]
    state.head, state.ddp_head = None, None


@torch.no_grad()
def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay of optimizer step `step` (1-based): REPA's constant `decay`, or with `warmup`
    diffusers' EMAModel rule min(decay, (1 + step) / (10 + step)), so that a short run's EMA does
    not keep most of its random initialisation."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        if e is not p:  # a LoRA run's EMA shares the frozen base weights (finetune.ema_copy)
            e.lerp_(p.detach(), 1.0 - decay)


def save_state(
    folder: Path, state: TrainState, extra: dict[str, Any], parts: CheckpointParts | None = None
) -> None:
    """Fill one checkpoint folder (RunDir.publish_checkpoint makes it the `latest`); `parts`: what
    checkpoint_parts gathered (default: the state's own modules, unsharded)."""
    parts = parts or checkpoint_parts(state)
    with _writing(folder / run_files.MODEL_WEIGHTS):
        state.adapter.save_pretrained(parts.model, folder / run_files.MODEL_WEIGHTS)
    with _writing(folder / run_files.EMA_WEIGHTS):
        state.adapter.save_pretrained(parts.ema, folder / run_files.EMA_WEIGHTS)
    lora = folder / run_files.EMA_WEIGHTS / run_files.LORA_WEIGHTS_FILE
    if lora.is_file():  # the step folder itself loads in WanPipeline.load_lora_weights(folder)
        with _writing(folder / run_files.LORA_WEIGHTS_FILE):
            shutil.copyfile(lora, folder / run_files.LORA_WEIGHTS_FILE)
    if state.head is not None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.head.state_dict().items()}
        with _writing(folder / run_files.PROJECTORS_FILE):
            save_file(tensors, folder / run_files.PROJECTORS_FILE)
    payload = {**extra, "step": state.step, "optimizer": parts.optimizer}
    with _writing(folder / run_files.TRAIN_STATE_FILE), open(folder / run_files.TRAIN_STATE_FILE, "wb") as fh:
        torch.save(payload, fh)  # through a Python file: a full disk raises ENOSPC, not a bare RuntimeError


@contextlib.contextmanager
def _writing(target: Path):
    """A full disk while writing `target` (a file, or a save_pretrained folder) becomes one
    OSError(ENOSPC) naming the file: safetensors and torch report it as SafetensorError or
    RuntimeError with the OS error only in the message or the context."""
    try:
        yield
    except Exception as exc:
        if not _disk_full(exc):
            raise
        name = target
        if target.is_dir():  # the weights file save_pretrained was writing, when it got that far
            files = sorted(target.glob("*.safetensors"))
            name = files[0] if files else target
        raise OSError(errno.ENOSPC, "No space left on device", str(name)) from exc


def _disk_full(exc: BaseException) -> bool:
    return is_disk_full(exc) or "os error 28" in str(exc) or "No space left on device" in str(exc)


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    """`reader(path)`, or a CheckpointError naming the file when it cannot be parsed."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the checkpoint")
    try:
        return reader(path)
    except (SafetensorError, RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is damaged and cannot be read ({detail})") from None


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise run_files.RunError(f"{folder} holds no safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(_read(f, load_file))
    return weights


def _load_module(module: nn.Module, folder: Path) -> None:
    """A checkpoint's model/ or ema/ into `module`: its LoRA file (a LoRA run), else every weight."""
    from .finetune import is_lora, load_lora_file

    if is_lora(module):
        path = folder / run_files.LORA_WEIGHTS_FILE
        try:
            load_lora_file(module, path, lambda p: _read(p, load_file))
        except CheckpointError:
            raise
        except ValueError as exc:
            raise run_files.RunError(str(exc)) from None
        return
    module.load_state_dict(_weights(folder))


def _load_train_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state(folder: Path, state: TrainState) -> dict[str, Any]:
    """Load weights, EMA, projectors and optimizer in place, after checking the checkpoint's
    checksums (an older checkpoint without them loads unverified); returns the rest of the saved
    state. A damaged file raises CheckpointError naming it."""
    verify_checkpoint(folder)
    _load_module(state.model, folder / run_files.MODEL_WEIGHTS)
    _load_module(state.ema, folder / run_files.EMA_WEIGHTS)
    if state.head is not None:
        projector_file = folder / run_files.PROJECTORS_FILE
        if not projector_file.is_file():
            raise run_files.RunError(
                f"{folder} has no {run_files.PROJECTORS_FILE} but this run still aligns to encoders"
            )
        state.head.load_state_dict(_read(projector_file, load_file))
    saved = _read(folder / run_files.TRAIN_STATE_FILE, _load_train_state)
    state.optimizer.load_state_dict(saved.pop("optimizer"))
    state.step = int(saved["step"])
    return saved
