"""torchrun worker for test_wan_adapter's FSDP2 test: a few steps of the flow + alignment loss on
fixed data through the Wan adapter, full fine-tune and LoRA, each rank on its slice of the batch.

Usage: python -m torch.distributed.run --standalone --nproc_per_node N tests/wan_fsdp_worker.py
PIPELINE OUT.pt. With one process nothing is sharded (the reference); with more, the transformer
and the projector are sharded with shard_model. Rank 0 saves the gathered weights to OUT.pt.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from stages.common import flow
from stages.common.models.adapter import Condition
from stages.common.models.fsdp import full_state_dict, shard_model
from stages.common.models.lora import LoraSpec, add_lora
from stages.common.models.wan import WanAdapter
from stages.common.runtime import setup_distributed, teardown_distributed

BATCH, STEPS = 4, 3


def _data(step: int) -> tuple[torch.Tensor, ...]:
    """The global batch of one step, the same on every rank."""
    g = torch.Generator().manual_seed(100 + step)
    x0 = torch.randn(BATCH, 16, 3, 4, 4, generator=g)
    eps = torch.randn(BATCH, 16, 3, 4, 4, generator=g)
    t = torch.rand(BATCH, generator=g)
    text = torch.randn(BATCH, 5, 32, generator=g)
    target = F.normalize(torch.randn(BATCH, 3, 4, 24, generator=g), dim=-1)
    return x0, eps, t, text, target


def train(folder: str, lora: bool, rank: int, world: int) -> dict[str, torch.Tensor]:
    a = WanAdapter.from_pretrained(folder, max_text_tokens=8)
    if lora:
        add_lora(a.module, LoraSpec(rank=4, alpha=4))
    torch.manual_seed(0)
    proj = torch.nn.Linear(a.tokens.hidden_size, 24)
    if world > 1:
        shard_model(a.module)
        shard_model(proj, blocks=None)
    params = [p for p in [*a.module.parameters(), *proj.parameters()] if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for step in range(STEPS):
        x0, eps, t, text, target = (v[part] for v in _data(step))
        out = a.forward(a.module, flow.interpolate(x0, eps, t), t, Condition(text_embeds=text), align_block=2)
        align = -(F.normalize(proj(out.hidden), dim=-1) * target).sum(-1).mean()
        loss = flow.flow_loss(out.velocity, flow.velocity_target(x0, eps)) + 0.5 * align
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {f"transformer.{k}": v for k, v in full_state_dict(a.module).items()}
    state.update({f"projector.{k}": v for k, v in full_state_dict(proj).items()})
    return state


def main() -> None:
    folder, out = sys.argv[1], sys.argv[2]
    dist = setup_distributed("cpu")
    result = {}
    for lora in (False, True):
        state = train(folder, lora, dist.rank, dist.world_size)
        result.update({f"{'lora' if lora else 'full'}.{k}": v.detach().clone() for k, v in state.items()})
    if dist.is_main:
        torch.save(result, out)
    teardown_distributed()


if __name__ == "__main__":
    main()
