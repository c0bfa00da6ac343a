"""Stage two: train a VideoDiT from WebDataset shards alone (no encoder code is imported)."""

from .config import PRESETS, TrainConfig
from .loop import train
from .step import NonFiniteLoss

__all__ = ["PRESETS", "NonFiniteLoss", "TrainConfig", "train"]
