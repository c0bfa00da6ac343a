"""Stage two: train a video diffusion transformer (a model adapter, stages/common/models) from
WebDataset shards alone (no encoder code is imported).

The config is importable without torch (the CLI builds its options from it); the loop is
loaded on first use."""

from typing import Any

from .config import TRAIN_PRESETS, TrainConfig

__all__ = ["TRAIN_PRESETS", "NonFiniteLoss", "TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from .loop import train

        return train
    if name == "NonFiniteLoss":
        from .step import NonFiniteLoss

        return NonFiniteLoss
    raise AttributeError(f"module 'stages.train' has no attribute {name!r}")
