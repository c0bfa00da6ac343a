"""The requested sizes checked against the models' config.json files, before any weights load.

`--size`, `--dino-size`, `--sam2-size`, `--videomae-size` and `--pca-dims` depend on the models
(the VAE's spatial factor, an encoder's patch, input size or feature dim). Their config files
are read (a local folder, or the hub cache), so a bad value is refused as a usage error (exit 2)
in well under a second instead of after the models load. A model whose config is not at hand
(not downloaded yet) is checked after it loads, as before (stages/extract/models.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.common import registry as R
from stages.common.models.encoders import SAM2_SIZE_UNIT

from .config import ExtractConfig


def read_config(source: str | None, subfolder: str = "") -> dict[str, Any] | None:
    """A model's config.json from a local folder or the hub cache; None when not at hand."""
    if not source:
        return None
    name = f"{subfolder}/config.json" if subfolder else "config.json"
    folder = Path(source).expanduser()
    if folder.is_dir():
        path = folder / name
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, name)
        except Exception:  # not a repo id: the loader says what is wrong with it
            return None
        if not isinstance(found, str):
            return None
        path = Path(found)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _multiples(unit: int, near: int) -> str:
    low = max(1, near // unit)
    return f"{unit * low}, {unit * (low + 1)}"


def _vae_spatial_factor(cfg: ExtractConfig, sources: dict[str, str | None]) -> int | None:
    """The VAE's spatial factor from its config.json (an image VAE's down blocks; a Wan VAE's
    `scale_factor_spatial`, in a pipeline's vae/ or a bare VAE folder); None when not at hand."""
    src = sources.get("vae") or R.DEFAULT_VAE[cfg.vae_kind]
    if cfg.vae_kind == "image":
        blocks = (read_config(src) or {}).get("block_out_channels")
        return 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else None
    if cfg.vae_kind == "wan":
        factor = (read_config(src, "vae") or read_config(src) or {}).get("scale_factor_spatial")
        return int(factor) if isinstance(factor, int) and factor > 0 else None
    return None


def check_sizes(cfg: ExtractConfig, sources: dict[str, str | None]) -> None:
    """ValueError naming the key when a size or PCA dim cannot fit the models' configs."""
    factor = _vae_spatial_factor(cfg, sources)
    if factor is not None:
        unit = factor * cfg.patch_size
        for axis, n in cfg.axes():
            if n % unit:
                raise ValueError(
                    f"size: {axis}{n} is not a multiple of {unit} (the VAE's spatial factor {factor} x "
                    f"patch {cfg.patch_size}); use e.g. {_multiples(unit, n)}"
                )
    dims: dict[str, int] = {}
    for name in cfg.encoders:
        config = read_config(sources.get(name))
        if config is None:
            continue
        if name == "sam2":
            config = config.get("vision_config") or config
            dims[name] = int(config.get("fpn_hidden_size") or 0)
        else:
            dims[name] = int(config.get("hidden_size") or 0)
        _check_input_size(cfg, name, config)
    for name, k in cfg.pca_dims_by_encoder().items():
        if dims.get(name) and k > dims[name]:
            raise ValueError(f"pca_dims: {name}={k} exceeds the encoder's feature dim {dims[name]}")


def _check_input_size(cfg: ExtractConfig, name: str, config: dict[str, Any]) -> None:
    size = getattr(cfg, f"{name}_size")
    if size is None:
        return
    if name == "dino" and config.get("patch_size") and size % int(config["patch_size"]):
        patch = int(config["patch_size"])
        raise ValueError(
            f"dino_size: {size} is not a multiple of DINOv2's patch {patch}; use e.g. {_multiples(patch, size)}"
        )
    if name == "sam2" and size % SAM2_SIZE_UNIT:
        raise ValueError(
            f"sam2_size: {size} is not a multiple of {SAM2_SIZE_UNIT}; use e.g. {_multiples(SAM2_SIZE_UNIT, size)}"
        )
    if name == "videomae" and config.get("image_size") and size != int(config["image_size"]):
        raise ValueError(
            f"videomae_size: VideoMAE has fixed position embeddings for {config['image_size']} px input; "
            f"got {size}"
        )
