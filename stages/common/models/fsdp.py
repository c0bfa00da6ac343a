"""FSDP2 sharding (torch.distributed.fsdp.fully_shard) for models that do not fit one GPU.

Why per block, then the root: each transformer block becomes one communication group, so only
one block's full weights live at a time during forward and backward (the layout diffusers'
`_no_split_modules` names, and what torchtitan does); the root group holds what is left
(embeddings, output head). Parameters stay on their module as DTensors, so forward hooks,
peft's LoRA layers (mixed frozen and trainable parameters are allowed in FSDP2) and the
adapter's `forward` work unchanged. Gradients are averaged over ranks like DDP's.

What training adds (stages/train/state.py `shard_state`): tensors laid out like a sharded
parameter (`shard_like`: the EMA, AdamW's moments), an optimizer moved onto the sharded parameters
(`move_optimizer`), a gradient norm over DTensor and plain gradients (`clip_grad_norm`), and
checkpoints of FULL weights in the unsharded format: rank 0 gathers them (`gather_state_dict`)
into a copy of the module whose parameters live on the meta device until then (`meta_copy`,
`materialize`), so the model's own save_pretrained writes them.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn


def _mesh(device: torch.device):
    """A 1-D mesh over all ranks on this rank's device type (CPU + gloo, or CUDA + NCCL)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("FSDP2 sharding needs a process group: launch with torchrun")
    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_model(
    module: nn.Module,
    blocks: str | None = "blocks",
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> nn.Module:
    """fully_shard each block of `module.<blocks>` (none when `blocks` is None) and then `module`
    itself, in place; returns it.
    `param_dtype` (e.g. torch.bfloat16) computes in that dtype with float32 master weights and
    float32 gradient reduction (FSDP2's MixedPrecisionPolicy). `device` (default: where the
    parameters are) is the mesh's: a module still on the CPU moves there block by block, so the
    whole model never sits on one GPU."""
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # diffusers' transformers return a reshaped view; the adapters never change it in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    device = device or next(module.parameters()).device
    kwargs = {"mesh": _mesh(device), "reshard_after_forward": reshard_after_forward}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in getattr(module, blocks) if blocks else ():
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    return module


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank's state dict with sharded tensors gathered (a collective: call it on all ranks)."""
    out = {}
    for k, v in module.state_dict().items():
        out[k] = v.full_tensor() if hasattr(v, "full_tensor") else v
    return out


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` (full, the same on every rank) laid out as the sharded `like`: each rank keeps its
    shard, on `like`'s device."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.detach().to(like.dtype), like.device_mesh, like.placements)


def gather_state_dict(
    module: nn.Module, keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of `module` on rank 0, on the CPU; {} on the other ranks.
    A collective: every rank calls it. `keep(name)` limits it (a LoRA run gathers its LoRA weights
    only)."""
    import torch.distributed as dist

    main = not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for name, value in module.state_dict().items():
        if keep is not None and not keep(name):
            continue
        full = value.full_tensor() if is_sharded(value) else value
        if main:
            out[name] = full.detach().cpu().clone()
    return out


def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with its sharded tensors gathered, on rank 0 and the CPU ({} on the
    other ranks): the format an unsharded run saves, so either loads the other's. A collective."""
    import torch.distributed as dist

    main = not dist.is_initialized() or dist.get_rank() == 0
    saved = optimizer.state_dict()
    state = {}
    for index, values in saved["state"].items():
        full = {k: v.full_tensor() if is_sharded(v) else v for k, v in values.items()}
        state[index] = {
            k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in full.items()
        }
    return {"state": state, "param_groups": saved["param_groups"]} if main else {}


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` (unsharded) whose parameters are on the meta device: its structure (and
    small buffers), holding no weights."""
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in module.parameters()
    }
    return copy.deepcopy(module, memo)


def materialize(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A module of `skeleton`'s structure holding the tensors of `state` (assigned, not copied);
    parameters not in `state` stay on the meta device."""
    module = copy.deepcopy(skeleton)
    module.load_state_dict(state, strict=False, assign=True)
    return module


def move_optimizer(optimizer: torch.optim.Optimizer, new: dict[int, torch.Tensor]) -> None:
    """Point `optimizer` at new parameters in place (`new[id(old)]`; others kept), laying out its
    per-parameter state (AdamW's moments) as each new parameter: the learning-rate scheduler
    bound to it keeps working, and a state loaded from a full checkpoint keeps its values."""
    state: defaultdict = defaultdict(dict)
    for param, values in optimizer.state.items():
        target = new.get(id(param), param)
        state[target] = {k: shard_like(v, target) if _shards_as(v, target) else v for k, v in values.items()}
    optimizer.state = state
    for group in optimizer.param_groups:
        group["params"] = [new.get(id(p), p) for p in group["params"]]


def _shards_as(value: object, param: torch.Tensor) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and is_sharded(param)
        and not is_sharded(value)
        and value.shape == param.shape
    )


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (L2) over sharded (DTensor) and plain gradients together:
    the sharded part's norm is all-reduced to the full one, then both parts are scaled by the same
    factor. Returns the total norm (a plain tensor); without DTensors it is clip_grad_norm_."""
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    params = [p for p in params if p.grad is not None]
    sharded = [p for p in params if is_sharded(p.grad)]
    plain = [p for p in params if not is_sharded(p.grad)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(plain, max_norm)
    norms = [get_total_norm([p.grad for p in sharded]).full_tensor()]
    if plain:
        norms.append(get_total_norm([p.grad for p in plain]).to(norms[0].device))
    total = torch.linalg.vector_norm(torch.stack(norms))
    if not math.isinf(max_norm):
        for part in (sharded, plain):
            if part:
                clip_grads_with_norm_(part, max_norm, total)
    return total
