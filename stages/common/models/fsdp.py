"""FSDP2 sharding (torch.distributed.fsdp.fully_shard) for models that do not fit one GPU.

Why per block, then the root: each transformer block becomes one communication group, so only
one block's full weights live at a time during forward and backward (the layout diffusers'
`_no_split_modules` names, and what torchtitan does); the root group holds what is left
(embeddings, output head). Parameters stay on their module as DTensors, so forward hooks,
peft's LoRA layers (mixed frozen and trainable parameters are allowed in FSDP2) and the
adapter's `forward` work unchanged. Gradients are averaged over ranks like DDP's.
"""

from __future__ import annotations

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
) -> nn.Module:
    """fully_shard each block of `module.<blocks>` (none when `blocks` is None) and then `module`
    itself, in place; returns it.
    `param_dtype` (e.g. torch.bfloat16) computes in that dtype with float32 master weights and
    float32 gradient reduction (FSDP2's MixedPrecisionPolicy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(module.parameters()).device
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
