"""A small video classifier of the built-in synthetic classes: the domain network of the
synthetic evaluator (``stages.common.synth_eval``), as a LeNet is for MNIST FID.

Why here (stages/common): the cached-model builder (``stages.common.trained``) trains it next to
the encoders, and the evaluator loads it; neither stage imports the other.

A diffusers ``ModelMixin`` / ``ConfigMixin`` 3D CNN, saved with ``save_pretrained``. Input:
uint8 clips [N, T, H, W, 3] at the size it was trained on (``frames``, ``size`` in its config),
scaled to [-1, 1]. Three strided 3D conv blocks, global average pooling (the penultimate
``features``, width ``channels[-1]``), a linear head.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from stages.common.synth import SEED_OFFSETS, render_clips


class SynthVideoClassifier(ModelMixin, ConfigMixin):
    """3D CNN: conv blocks (stride 1x2x2, 2x2x2, 2x2x2), BatchNorm + SiLU, mean pool, linear."""

    @register_to_config
    def __init__(
        self, num_classes: int = 4, frames: int = 8, size: int = 64, channels: tuple[int, ...] = (16, 32, 64)
    ) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        c_in = 3
        for i, c in enumerate(channels):
            stride = (1, 2, 2) if i == 0 else (2, 2, 2)
            # BatchNorm, not GroupNorm: a per-sample norm right before global pooling erases the
            # differences between clips' pooled features (a first version did not learn).
            layers += [
                torch.nn.Conv3d(c_in, c, 3, stride=stride, padding=1),
                torch.nn.BatchNorm3d(c),
                torch.nn.SiLU(),
            ]
            c_in = c
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(c_in, num_classes)

    @staticmethod
    def prepare(clips: torch.Tensor) -> torch.Tensor:
        """uint8 [N,T,H,W,3] -> float [N,3,T,H,W] in [-1, 1]."""
        return clips.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, channels[-1]] of prepared clips."""
        return self.body(x).mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class ClassifierConfig:
    """Training recipe of the evaluator's classifier (seeded; clips rendered in memory)."""

    classes: int = 4  # the demo's classes: the four drifts
    frames: int = 8
    size: int = 64
    train_clips: int = 384
    test_clips: int = 256
    steps: int = 800  # measured: 200 stay near chance, 800 reach 100 % held-out on the demo's clips
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    arch: str = "cnn3d-bn"  # SynthVideoClassifier's layout (part of the cache key)


def classifier_data(cfg: ClassifierConfig, render=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train and held-out clips from disjoint seed streams (never the demo dataset's)."""
    args = (cfg.classes, cfg.frames, cfg.size, render)
    return {
        "train": render_clips(cfg.train_clips, cfg.seed, SEED_OFFSETS["classifier"], *args),
        "test": render_clips(cfg.test_clips, cfg.seed, SEED_OFFSETS["classifier_test"], *args),
    }


@torch.no_grad()
def accuracy(model: SynthVideoClassifier, clips: np.ndarray, labels: np.ndarray, batch: int = 64) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(clips), batch):
        x = SynthVideoClassifier.prepare(torch.from_numpy(clips[i : i + batch]))
        hits += int((model(x).argmax(1).numpy() == labels[i : i + batch]).sum())
    return hits / len(clips)


def train_classifier(cfg: ClassifierConfig, render=None) -> tuple[SynthVideoClassifier, dict[str, Any]]:
    """Train on ``cfg.train_clips`` clips (no flips: a flip changes a drift's class), seeded batch
    order; returns the model and its train / held-out accuracy."""
    data = classifier_data(cfg, render)
    torch.manual_seed(cfg.seed)
    model = SynthVideoClassifier(num_classes=cfg.classes, frames=cfg.frames, size=cfg.size).float()
    clips, labels = data["train"]
    x_all, y_all = torch.from_numpy(clips), torch.from_numpy(labels)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(clips), (cfg.batch_size,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(SynthVideoClassifier.prepare(x_all[idx])), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    stats = {
        "train_s": round(time.perf_counter() - t0, 2),
        "loss_last": round(float(loss.detach()), 4),
        "train_acc": round(accuracy(model, clips, labels), 4),
        "heldout_acc": round(accuracy(model, *data["test"]), 4),
        "recipe": asdict(cfg),
    }
    return model.eval(), stats
