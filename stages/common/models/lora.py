"""LoRA (peft) on a diffusers transformer, saved in diffusers' LoRA format.

Why peft through diffusers' own `add_adapter`: the module stays a WanTransformer3DModel (same
forward, same block list for the alignment hook, same FSDP2 wrapping), and its state dict is
what `get_peft_model_state_dict` turns into the file `WanPipeline.load_lora_weights(folder)`
reads. The LoRA config (rank, alpha, targets) is saved beside the weights as diffusers'
adapter metadata, so an alpha other than the rank loads with the right scale.

We save with WanLoraLoaderMixin (the class WanPipeline inherits `save_lora_weights` from), so the
training process never imports the pipeline module and its text encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from stages.common.models.wan import LORA_WEIGHTS_NAME, WAN_LORA_TARGETS, unwrap

ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LoraSpec:
    """rank r, alpha (scale alpha / r; diffusers' scripts use alpha = r) and the module names
    (suffixes, as peft matches them) that get LoRA."""

    rank: int = 16
    alpha: float | None = None
    targets: tuple[str, ...] = WAN_LORA_TARGETS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"--lora-rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target module name")


def add_lora(module: nn.Module, spec: LoraSpec) -> nn.Module:
    """Freeze `module` and add LoRA adapters to the named modules: afterwards only the LoRA
    weights require gradients. Refuses target names that match no module."""
    from peft import LoraConfig

    names = [n for n, _ in module.named_modules()]
    missing = [t for t in spec.targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"LoRA target modules {missing} match no module of {type(module).__name__}")
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.rank if spec.alpha is None else spec.alpha,
        lora_dropout=spec.dropout,
        init_lora_weights=True,
        target_modules=list(spec.targets),
    )
    module.requires_grad_(False)
    module.add_adapter(config, adapter_name=ADAPTER_NAME)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return module


def lora_state_dict(module: nn.Module) -> dict:
    """The LoRA weights only, keys without the adapter name (peft's get_peft_model_state_dict)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unwrap(module), adapter_name=ADAPTER_NAME)


def save_lora(module: nn.Module, folder: str | Path) -> Path:
    """Write folder/pytorch_lora_weights.safetensors in diffusers' format (keys "transformer.*",
    the LoRA config as adapter metadata), as diffusers' Wan LoRA training saves it."""
    from diffusers.loaders import WanLoraLoaderMixin

    net = unwrap(module)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    WanLoraLoaderMixin.save_lora_weights(
        str(folder),
        transformer_lora_layers=lora_state_dict(net),
        transformer_lora_adapter_metadata=net.peft_config[ADAPTER_NAME].to_dict(),
        weight_name=LORA_WEIGHTS_NAME,
        safe_serialization=True,
    )
    return folder / LORA_WEIGHTS_NAME


def load_lora(module: nn.Module, folder: str | Path, spec: LoraSpec | None = None) -> nn.Module:
    """Resume: add LoRA (from the file's own metadata unless `spec`) and load the saved weights
    into `module` (a fresh base transformer)."""
    from diffusers.loaders import WanLoraLoaderMixin
    from peft import set_peft_model_state_dict

    path = Path(folder) / LORA_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: a LoRA checkpoint folder holds {LORA_WEIGHTS_NAME}")
    try:
        state, meta = WanLoraLoaderMixin.lora_state_dict(str(folder), return_lora_metadata=True)
    except Exception as e:  # safetensors' own errors (truncated or garbage file) have no common base class
        raise ValueError(
            f"{path} is not a readable LoRA file ({type(e).__name__}: {e}); save it again"
        ) from e
    prefix = WanLoraLoaderMixin.transformer_name + "."
    if spec is None:  # diffusers stores the metadata keys as "transformer.<LoraConfig field>"
        m = {k[len(prefix) :]: v for k, v in (meta or {}).items() if k.startswith(prefix)}
        if "r" not in m:
            raise ValueError(f"{Path(folder) / LORA_WEIGHTS_NAME} has no LoRA metadata; pass the LoRA spec")
        spec = LoraSpec(
            rank=int(m["r"]), alpha=float(m["lora_alpha"]), targets=tuple(_targets(m["target_modules"]))
        )
    add_lora(module, spec)
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    result = set_peft_model_state_dict(module, weights, adapter_name=ADAPTER_NAME)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(
            f"{folder}: LoRA weights do not fit this transformer: {result.unexpected_keys[:3]} ..."
        )
    return module


def _targets(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else sorted(value)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters that require gradients (only the LoRA ones after add_lora)."""
    return [p for p in module.parameters() if p.requires_grad]
