"""Linear probes on frozen encoder features: the standard check that features carry information.

Features come from the same loader and feature path the extract stage uses
(``stages.common.models.encoders.load_encoder(...).features``: uint8 clips -> patch tokens
[N, t, h, w, D]). Two tasks on in-memory synthetic clips drawn from seeds disjoint from the
demo's dataset (``synth.SEED_OFFSETS``):

- ``motion`` (a video task): the clip's motion class; features are the tokens mean-pooled over
  space per time step, concatenated over time ([N, t * D]).
- ``shape`` (a per-frame task suited to an image encoder): the shape of the one object in a
  ``render_shape_clip`` clip; features are each time step's tokens mean-pooled over space
  ([N * t, D]), every step of a clip labelled with its shape.

Splits are by video (every frame of a clip on the same side), seeded. The classifier is
multinomial logistic regression on standardised features, fitted full-batch with L-BFGS and a
small L2 penalty, so a figure depends only on the features and the seed. The IICR of the motion
set's features (``stages.evaluate.iicr``) is reported beside the probe.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from stages.common.synth import MOTIONS, SEED_OFFSETS, SHAPES, render_clips, render_shape_clips

TASKS = ("motion", "shape")


@dataclass
class ProbeConfig:
    clips: int = 384  # clips per task
    test_fraction: float = 0.25
    seed: int = 0
    motion_classes: int = len(MOTIONS)  # the built-in motions
    frames: int = 8
    size: int = 64
    weight_decay: float = 1e-3
    max_iter: int = 300


def recipe_probe(recipe: Any, clips: int = 384, seed: int = 0) -> tuple[ProbeConfig, Any]:
    """The probe config and motion-clip renderer for a `stages.common.trained.TrainedRecipe`: its clip
    size, stride and background, and the classes its classifier knows (the demo's four drifts)."""
    from stages.common.trained import recipe_render

    cfg = ProbeConfig(clips=clips, seed=seed, size=recipe.clip_size, motion_classes=recipe.classifier.classes)
    return cfg, recipe_render(recipe)


def probe_data(cfg: ProbeConfig, render=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The two tasks' clips and labels: {"motion": (clips, labels), "shape": (clips, shapes)}."""
    motion = render_clips(
        cfg.clips, cfg.seed, SEED_OFFSETS["probe"], cfg.motion_classes, cfg.frames, cfg.size, render
    )
    shape = render_shape_clips(cfg.clips, cfg.seed, SEED_OFFSETS["probe_shape"], cfg.frames, cfg.size)
    return {"motion": motion, "shape": shape}


def encoder_features(encoder: Any, clips: np.ndarray, batch: int = 32) -> np.ndarray:
    """Patch tokens float32 [N, t, h, w, D] of uint8 clips [N, T, H, W, 3] (``encoder.features``)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(clips), batch):
            out.append(encoder.features(torch.from_numpy(clips[i : i + batch])).float().cpu().numpy())
    return np.concatenate(out)


def split_by_video(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, test) clip indices; a clip is never on both sides."""
    order = np.random.default_rng([seed, 7]).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def logistic_probe(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, cfg: ProbeConfig
) -> dict[str, float]:
    """Multinomial logistic regression (L-BFGS, L2) on features standardised with train statistics."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xtr = torch.from_numpy((x_train - mean) / std).double()
    xte = torch.from_numpy((x_test - mean) / std).double()
    ytr, yte = torch.from_numpy(y_train).long(), torch.from_numpy(y_test).long()
    classes = int(max(y_train.max(), y_test.max())) + 1
    w = torch.zeros(xtr.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=cfg.max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + cfg.weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_acc = float(((xtr @ w + b).argmax(1) == ytr).double().mean())
        test_acc = float(((xte @ w + b).argmax(1) == yte).double().mean())
    return {"train_acc": round(train_acc, 4), "test_acc": round(test_acc, 4), "chance": round(1 / classes, 4)}


def task_features(task: str, feats: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(features, labels, samples per clip) of one task from tokens [N, t, h, w, D]."""
    pooled = feats.mean(axis=(2, 3))  # [N, t, D]
    n, t, d = pooled.shape
    if task == "motion":
        return pooled.reshape(n, t * d), labels, 1
    if task == "shape":
        return pooled.reshape(n * t, d), np.repeat(labels, t), t
    raise ValueError(f"unknown probe task {task!r}; choose from {list(TASKS)}")


def probe_task(task: str, feats: np.ndarray, labels: np.ndarray, cfg: ProbeConfig) -> dict[str, float]:
    """Held-out accuracy of one task on token features [N, t, h, w, D], split by clip."""
    x, y, per_clip = task_features(task, feats, labels)
    train, test = split_by_video(len(labels), cfg.test_fraction, cfg.seed)
    rows = lambda idx: (idx[:, None] * per_clip + np.arange(per_clip)).ravel()  # noqa: E731
    return logistic_probe(x[rows(train)], y[rows(train)], x[rows(test)], y[rows(test)], cfg)


def iicr_summary(feats: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """IICR (and its intra / inter parts) of token features with class labels."""
    from stages.evaluate.iicr import iicr_from_array

    r = iicr_from_array(feats, labels=labels, per_position=False)
    keys = ("intra", "inter_video", "inter_class", "iicr_video", "iicr_class")
    return {k: (None if r.get(k) is None else round(float(r[k]), 4)) for k in keys}


def probe_encoder(
    name: str, folder: str, cfg: ProbeConfig, data: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
) -> dict[str, Any]:
    """Both probes and the motion set's IICR for the encoder ``name`` saved at ``folder``."""
    from stages.common.models.encoders import load_encoder

    data = data or probe_data(cfg)
    encoder = load_encoder(name, folder)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"encoder": name, "folder": str(folder)}
    for task in TASKS:
        clips, labels = data[task]
        feats = encoder_features(encoder, clips)
        out[task] = probe_task(task, feats, labels, cfg)
        if task == "motion":
            out["iicr"] = iicr_summary(feats, labels)
    out["probe_s"] = round(time.perf_counter() - t0, 2)
    out["config"] = asdict(cfg)
    out["labels"] = {"motion": list(MOTIONS[: cfg.motion_classes]), "shape": list(SHAPES)}
    return out


def probe_models(
    records: dict[str, dict[str, Any]], cfg: ProbeConfig, cache: str | None = None, render=None
) -> dict[str, Any]:
    """Probe every encoder of ``stages.common.trained.trained_models()``'s records; with
    ``cache`` (a JSON file) results are reused while the config, the clip renderer and the
    weights' sha256 match. ``render`` draws the motion probe's clips (default ``render_video``)."""
    import json
    from pathlib import Path

    from stages.common.trained import ENCODER_KIND

    key = {
        "config": asdict(cfg),
        "render": getattr(render, "keywords", None),
        "sha256": {n: r["sha256"] for n, r in records.items() if n in ENCODER_KIND},
    }
    if cache and Path(cache).is_file():
        saved = json.loads(Path(cache).read_text())
        if saved.get("key") == key:
            return saved["results"]
    data = probe_data(cfg, render)
    results = {
        n: probe_encoder(ENCODER_KIND[n], r["folder"], cfg, data)
        for n, r in records.items()
        if n in ENCODER_KIND
    }
    if cache:
        tmp = Path(cache).with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "results": results}, indent=2) + "\n")
        tmp.replace(cache)
    return results
