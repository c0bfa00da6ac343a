"""Stage two: train a VideoDiT from WebDataset shards alone (no encoder code is imported)."""

from .config import PRESETS, TrainConfig
from .loop import NonFiniteLoss, train

__all__ = ["PRESETS", "NonFiniteLoss", "TrainConfig", "train"]
