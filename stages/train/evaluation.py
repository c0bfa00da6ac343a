"""Evaluation during training (`--eval-every N`): a fixed, seeded sample set from the EMA weights,
decoded with the run's autoencoder and scored by the configured metric.

Why here: researchers otherwise export samples by hand to see whether a run improves. Every N
steps (and at the last step) the EMA model generates `eval_num` videos with the same noise
(seed, i) and the same balanced labels each time, so the series is comparable across steps and
a resumed run (its EMA restored exactly) continues it exactly. The metrics go into the log row of
that step (`eval` in log.jsonl, `eval/<name>` in TensorBoard).

Metrics `fvd` / `cd-fvd`: StyleGAN-V's FVD or content-debiased FVD of the samples against the real
stats a `pipeline evaluate stats` run wrote (`--eval-real-stats`), under that file's protocol
(detector, frames, resolution, count) with the detector weights `--eval-detector-weights`. With
fewer samples than the detector's feature width the covariance is rank-deficient: compare runs at
one `--eval-num`, not with published FVDs.

Metric `synth` is the synthetic-domain evaluator (`stages/common/synth_eval.py`): the class
accuracy of class-conditional samples under a classifier trained on real synthetic clips, and a
Fréchet distance in that classifier's feature space. They are named `synth_class_acc` and
`synth_frechet` so that no one mistakes them for FVD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

EVAL_METRICS = ("synth", "fvd", "cd-fvd")


@dataclass
class EvalSettings:
    """What an evaluation pass needs from the training config."""

    every: int
    num: int
    steps: int
    cfg_scale: float
    metric: str
    evaluator: str | None
    real_stats: str | None
    detector_weights: str | None
    seed: int
    last_step: int

    def due(self, step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == self.last_step)


class PeriodicEval:
    """Generates the fixed sample set and scores it; one instance per run (rank 0)."""

    def __init__(self, settings: EvalSettings, vae: Any, device: torch.device, use_bf16: bool) -> None:
        if vae is None:
            raise ValueError("eval_every needs the run's autoencoder to decode samples: pass --vae")
        self.settings, self.vae, self.device, self.use_bf16 = settings, vae, device, use_bf16
        self.scorer = load_scorer(settings, device)

    def __call__(self, adapter: Any, ema: torch.nn.Module) -> dict[str, float]:
        """Scores of the samples of `ema` (the EMA copy of `adapter.module`)."""
        from stages.common.sampling import generate_latents

        s = self.settings
        cfg_scale = s.cfg_scale if adapter.conditioning.conditional else 1.0
        latents, labels = generate_latents(
            adapter, ema, s.num, steps=s.steps, seed=s.seed, cfg_scale=cfg_scale,
            device=self.device, autocast=self.use_bf16,
        )  # fmt: skip
        frames = self.vae.decode(latents.to(self.device)).numpy()
        return self.scorer(frames, labels)


def load_scorer(settings: EvalSettings, device: torch.device):
    """The metric as a function (uint8 videos [N, T, H, W, 3], labels [N]) -> {name: value}."""
    if settings.metric in ("fvd", "cd-fvd"):
        return _fvd_scorer(settings, device)
    if settings.metric == "synth":
        from stages.common.synth_eval import SynthEvaluator, default_evaluator_folder

        evaluator = SynthEvaluator.load(settings.evaluator or default_evaluator_folder())

        def score(frames: np.ndarray, labels: np.ndarray) -> dict[str, float]:
            return evaluator.evaluate(frames, labels)

        return score
    raise ValueError(f"eval_metric: {settings.metric!r} not in {EVAL_METRICS}")


def _fvd_scorer(settings: EvalSettings, device: torch.device):
    """FVD (I3D) or content-debiased FVD of the samples against the real stats file."""
    from stages.common import fvd

    if not settings.real_stats:
        raise ValueError(
            f"eval_metric {settings.metric} needs --eval-real-stats (a `pipeline evaluate stats` file)"
        )
    real = fvd.FeatureStats.load(settings.real_stats)
    cfg = fvd.config_of_protocol(real.protocol, settings.detector_weights, device=str(device), progress=False)
    detector = fvd.build_detector(cfg)
    fvd.check_same_protocol(real.protocol, fvd.make_protocol(detector, cfg))
    name = "cd-fvd" if real.protocol["detector"].startswith("videomae") else "fvd"
    if name != settings.metric:
        raise ValueError(f"eval_metric {settings.metric}: {settings.real_stats} holds {name} stats")

    def score(frames: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        fake = fvd.stats_from_features(fvd.array_features(detector, frames, cfg), real.protocol)
        return {name: fvd.frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)}

    return score
