"""The synthetic-domain evaluator: class accuracy and a Fréchet distance in the feature space of a
classifier of the built-in synthetic classes. NOT FVD.

Why: FVD's I3D needs weights we cannot download, and on our own synthetic data a network
trained on that data is the better judge anyway (as FID with a LeNet is for MNIST). The
classifier (``stages.common.synth_classifier``, built and cached by ``stages.common.trained``)
gives two numbers, named so no one mistakes them for FVD:

- ``synth_class_acc``: the fraction of videos the classifier assigns to the class they were
  generated for ("does a drift_left sample drift left?");
- ``synth_frechet``: |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2) between the classifier's
  penultimate features of real clips (``reference_stats``) and of the videos
  (``stages.common.fvd.frechet_distance``). With fewer videos than the feature width (64) the
  covariance is rank-deficient and the distance is biased upwards: compare runs at one count.

Input rule: videos are uint8 [N, T, H, W, 3]. Frames: the first ``frames`` (the classifier's,
8) are used; fewer are refused. Size: when H x W is not the classifier's ``size`` square, the
shorter side is resized to ``size`` (bilinear, antialiased) and the centre cropped, as the
encoders do.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.common.fvd import FeatureStats, frechet_distance, stats_from_features
from stages.common.models.encoders import resize_center_crop
from stages.common.synth_classifier import SynthVideoClassifier

DETECTOR = "synth-classifier"
REFERENCE_FILE = "reference.npz"  # the real clips' feature stats, written with the classifier


class SynthEvaluator:
    """Wraps a trained ``SynthVideoClassifier``; holds the reference (real) feature stats."""

    def __init__(self, model: SynthVideoClassifier, folder: str = "", sha256: str = "") -> None:
        self.model = model.eval().float()
        self.folder = folder
        self.sha256 = sha256
        self.frames = int(model.config.frames)
        self.size = int(model.config.size)
        self.num_classes = int(model.config.num_classes)
        self.reference: FeatureStats | None = None

    @classmethod
    def load(cls, folder: str | Path) -> SynthEvaluator:
        """Load a classifier folder (``trained_models()["classifier"]["folder"]``)."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder} holds no classifier (config.json missing); build it with `pipeline models build`"
            )
        recipe = folder / "recipe.json"
        sha = json.loads(recipe.read_text()).get("sha256", "") if recipe.is_file() else ""
        evaluator = cls(SynthVideoClassifier.from_pretrained(folder), str(folder), sha)
        if (folder / REFERENCE_FILE).is_file():
            evaluator.reference_stats(None, cache=folder / REFERENCE_FILE)
        return evaluator

    def _prepare(self, videos: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [N,T,H,W,3] -> the classifier's input (input rule in the module doc)."""
        x = torch.as_tensor(videos)
        if x.dtype != torch.uint8 or x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(f"videos must be uint8 [N, T, H, W, 3], got {x.dtype} {tuple(x.shape)}")
        n, t, h, w, _ = x.shape
        if t < self.frames:
            raise ValueError(
                f"videos have {t} frames; the synthetic evaluator needs at least {self.frames} (it uses the first {self.frames})"
            )
        x = x[:, : self.frames]
        if (h, w) != (self.size, self.size):
            flat = x.reshape(n * self.frames, h, w, 3).permute(0, 3, 1, 2).float()
            flat = resize_center_crop(flat, self.size, "bilinear").clamp(0, 255).round().to(torch.uint8)
            x = flat.permute(0, 2, 3, 1).reshape(n, self.frames, self.size, self.size, 3)
        return SynthVideoClassifier.prepare(x)

    @torch.no_grad()
    def _run(self, videos, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(penultimate features [N, D] float64, predicted classes [N])."""
        feats, preds = [], []
        for i in range(0, len(videos), batch):
            f = self.model.features(self._prepare(videos[i : i + batch]))
            feats.append(f.double().numpy())
            preds.append(self.model.head(f).argmax(1).numpy())
        return np.concatenate(feats), np.concatenate(preds)

    def _protocol(self, n: int) -> dict[str, Any]:
        return {"detector": DETECTOR, "weights_sha256": self.sha256, "frames": self.frames, "frame_stride": 1,
                "resolution": self.size, "count": n}  # fmt: skip

    def reference_stats(self, clips, cache: str | Path | None = None) -> FeatureStats:
        """Mean / covariance of real clips' features; kept as the reference. With ``cache`` (.npz),
        read it when it was made by this classifier, else compute and write it."""
        if cache is not None and Path(cache).is_file():
            stats = FeatureStats.load(cache)
            if (
                stats.protocol.get("weights_sha256") == self.sha256
                and stats.protocol.get("detector") == DETECTOR
            ):
                self.reference = stats
                return stats
        feats, _ = self._run(clips)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stats = stats_from_features(feats, self._protocol(len(feats)), source="synthetic reference clips")
        if cache is not None:
            stats.save(cache)
        self.reference = stats
        return stats

    def evaluate(self, videos, labels=None, reference: FeatureStats | None = None) -> dict[str, float | None]:
        """{"synth_class_acc": accuracy against ``labels`` (None without labels),
        "synth_frechet": Fréchet distance to the reference stats}."""
        reference = reference or self.reference
        if reference is None:
            raise ValueError(
                f"no reference stats: {self.folder} holds no {REFERENCE_FILE}; call reference_stats(real_clips) first"
            )
        feats, preds = self._run(videos)
        if len(feats) < 2:
            raise ValueError(f"the synthetic Fréchet distance needs at least 2 videos, got {len(feats)}")
        acc = None
        if labels is not None:
            y = np.asarray(labels).astype(np.int64).reshape(-1)
            if len(y) != len(preds) or y.min() < 0 or y.max() >= self.num_classes:
                raise ValueError(
                    f"labels must be {len(preds)} class indices in [0, {self.num_classes}), got {len(y)} in "
                    f"[{y.min()}, {y.max()}]"
                )
            acc = float((preds == y).mean())
        mu, sigma = feats.mean(0), np.cov(feats, rowvar=False, bias=True)
        return {
            "synth_class_acc": acc,
            "synth_frechet": frechet_distance(reference.mu, reference.sigma, mu, sigma),
        }


def default_evaluator_folder() -> str:
    """The classifier folder of the default recipe (built by `pipeline models build` if missing)."""
    from stages.common.trained import trained_models

    return trained_models(names=["classifier"])["classifier"]["folder"]
