"""Which adapter a model family uses: `build_adapter(family, ...)` for a fresh model,
`load_adapter(folder)` for a saved one. A family is one entry of FAMILIES, imported on first use
(so building a VideoDiT never imports another family's libraries)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from .adapter import VideoModelAdapter

# family -> "module:class" of its adapter (a second family is one more line)
FAMILIES: dict[str, str] = {
    "videodit": "stages.common.models.videodit:VideoDiTAdapter",
    "wan": "stages.common.models.wan:WanAdapter",
}
MODEL_CONFIG = "config.json"  # what a diffusers save_pretrained folder holds; `_class_name` names the class


def adapter_class(family: str) -> type[VideoModelAdapter]:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)


def build_adapter(family: str, **options: Any) -> VideoModelAdapter:
    """A fresh model of `family`; `options` are its adapter's `build` arguments."""
    return adapter_class(family).build(**options)


def family_of(folder: str | Path) -> str:
    """The family whose model a save_pretrained folder holds, from its config.json's `_class_name`."""
    path = Path(folder) / MODEL_CONFIG
    config = json.loads(path.read_text())
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    for family in FAMILIES:
        if class_name in getattr(adapter_class(family), "class_names", ()):
            return family
    raise ValueError(
        f"{path} names the model class {class_name!r}, which no model family ({', '.join(FAMILIES)}) loads"
    )


def load_adapter(folder: str | Path, family: str | None = None) -> VideoModelAdapter:
    """The model saved in `folder` (a checkpoint's model/ or ema/, or any save_pretrained folder),
    behind its family's adapter; `family` None: read from the folder (family_of)."""
    return adapter_class(family or family_of(folder)).from_pretrained(folder)
