"""`pipeline demo`: the whole chain on the built-in synthetic set, then a report.

synth (flat backgrounds, the four drifts) -> the tiny trained models (the alignment target and
the synthetic-domain evaluator, built once and cached) -> extract (exact pixel-space patchify,
the weight-free HOG + normal-flow target, stages.common.models.hog) -> pack -> train a baseline and an aligned run on the same seed and
batches, evaluating both during training -> sample both -> score the samples -> IICR of the
cache -> DIR/report.md + report.html. Each step calls a stage's public function; this module
only orchestrates. The report is written by `pipeline.report`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from pipeline.report import DemoResult

DEMO_ENCODERS = ("hog",)  # the weight-free HOG + normal-flow target (stages.common.models.hog); see README


@dataclass
class DemoConfig:
    out: str = "demo-out"
    preset: str = "tiny"
    videos: int = 64
    classes: int = 4  # the four drifts
    frames: int = 24  # frames per synthetic video (clips take 8 of them)
    size: int = 32
    stride: int = 3  # clips take every third frame: an object moves about 2.3 px a frame
    background: str = "flat"
    # one object per video, twice the default radius (5-10 px at 32 px): with 2-3 small objects a
    # CPU-minute model drew blurs that barely moved (BENCHMARKS.md "The demo's data")
    objects: tuple[int, int] = (1, 1)  # fewest and most objects per video
    object_scale: float = 2.0  # radius factor of the objects
    seed: int = 0
    encoders: list[str] = field(default_factory=lambda: list(DEMO_ENCODERS))
    model: str = "mini/4"
    steps: int = 3000
    batch_size: int = 8
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # decays to 0 by the last step: steadier final samples than constant
    align_lambda: float = 0.5
    eval_every: int = 750
    eval_num: int = 32
    eval_steps: int = 20
    cfg: float = 2.0  # guidance of the evaluation and final samples
    num_samples: int = 16
    sample_steps: int = 30
    device: str = "cpu"


# Presets of `pipeline demo --preset` (the demo's own sizes; the stages' presets are others).
DEMO_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # the same 64 videos, trained 2x longer (the cosine schedule stretches with the steps): 22.6 minutes
    # on 2 CPU cores with the test suite alongside, class accuracy 0.97 / 0.88 (BENCHMARKS.md)
    "small": {"steps": 6000, "eval_every": 1500, "num_samples": 32},
}


class Timer:
    """Collects each step's wall time for the summary."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []

    def step(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                click.secho(f"\n== {name} ==", bold=True)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.steps.append((name, time.perf_counter() - self.t0))
                return False

        return _Ctx()


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run every stage on the synthetic set; returns what the report renders (resumes a killed demo)."""
    from cache_schema import RunDir, prepare_output

    out = Path(cfg.out)
    prepare_output(out, "demo")
    timer = Timer()
    with timer.step("synthesize videos"):
        data = _synth(cfg, out)
    with timer.step("tiny trained models (built once, cached)"):
        models = _models(cfg)
    with timer.step("extract (pixel patchify + trained encoders -> zarr)"):
        extracted = _extract(cfg, out, data, models)
    with timer.step("pack (zarr -> WebDataset shards)"):
        _pack(out)
    runs = {"baseline": 0.0, "aligned": cfg.align_lambda}
    with timer.step(f"train {' and '.join(runs)} side by side (lambda {', '.join(map(str, runs.values()))})"):
        _train_side_by_side(cfg, out, runs, models["classifier"]["folder"])
    scores = {}
    for name in runs:
        with timer.step(f"sample {name}"):
            scores[name] = _sample_and_score(cfg, out, name, models["classifier"]["folder"])
    with timer.step("analyze (IICR of the cached targets)"):
        from stages.evaluate.iicr import iicr_from_store

        iicr = iicr_from_store(str(out / "cache.zarr"), progress=False)
        (out / "iicr.json").write_text(json.dumps(iicr, indent=2, default=str))
    return DemoResult(
        out=out,
        config=cfg,
        clips=extracted.num_clips,
        target_format=extracted.encoders[0].format,
        fidelity=extracted.fidelity,
        models={name: _model_summary(record) for name, record in models.items()},
        logs={name: RunDir(out / "runs" / name).read_log() for name in runs},
        samples={name: out / "runs" / name / "samples" for name in runs},
        scores=scores,
        iicr=iicr,
        timings=timer.steps,
    )


def _synth(cfg: DemoConfig, out: Path) -> Path:
    from stages.common.synth import make_synthetic

    data = out / "data"
    if not (data / "synth.json").is_file():
        make_synthetic(data, videos=cfg.videos, classes=cfg.classes, frames=cfg.frames, size=cfg.size,
                       seed=cfg.seed, background=cfg.background, objects=cfg.objects,
                       object_scale=cfg.object_scale)  # fmt: skip
    return data


def trained_recipe(cfg: DemoConfig):
    """The recipe of the tiny trained models for the demo's data (clip size, stride, background)."""
    from stages.common.trained import TrainedRecipe

    render = {"background": cfg.background, "objects": list(cfg.objects), "object_scale": cfg.object_scale}
    return TrainedRecipe(clip_size=cfg.size, clip_stride=cfg.stride, render_kwargs=render)


def _models(cfg: DemoConfig) -> dict[str, dict[str, Any]]:
    """The trained tiny encoders (the demo's alignment targets) and the evaluator, for the demo's data."""
    from stages.common.trained import trained_models

    return trained_models(recipe=trained_recipe(cfg), names=[*cfg.encoders, "classifier"])


def _model_summary(record: dict[str, Any]) -> dict[str, Any]:
    keep = ("objective", "steps", "wall_s", "sha256", "heldout_acc", "folder")
    return {k: record[k] for k in keep if k in record}


def extract_config(cfg: DemoConfig, data: Path, store: Path, encoder_folders: dict[str, str]):
    """The demo's extraction: 8-frame clips (stride `cfg.stride`) of `cfg.size` px in exact
    patchify-8 latents, tokens for a patch-4 DiT (one per frame at 32 px), the given encoders.
    bench/convergence.py uses the same settings."""
    from stages.common.models.dit_sizes import size_patch
    from stages.extract.config import ExtractConfig, preset_values

    values = preset_values("tiny")  # 8-frame clips, CPU block and batch sizes
    values.update({"data": str(data), "out": str(store), "encoders": list(encoder_folders), "device": cfg.device,
                   "size": cfg.size, "stride": cfg.stride, "vae_kind": "pixel", "vae": "patchify-8",
                   "patch_size": size_patch(cfg.model), "progress": False})  # fmt: skip
    values.update({f"{name}_model": folder for name, folder in encoder_folders.items()})
    return ExtractConfig(**values)


def _extract(cfg: DemoConfig, out: Path, data: Path, models: dict[str, dict[str, Any]]):
    from stages.extract.runner import run_extract

    folders = {name: models[name]["folder"] for name in cfg.encoders}
    return run_extract(extract_config(cfg, data, out / "cache.zarr", folders))


def _pack(out: Path) -> None:
    from stages.pack.packer import PackConfig, run_pack

    config = PackConfig(cache=str(out / "cache.zarr"), out=str(out / "shards"), samples_per_shard=16,
                        overwrite=True, progress=False)  # fmt: skip
    run_pack(config)


def train_config(
    cfg: DemoConfig, shards: Path, run: Path, lam: float, evaluator: str, seed: int | None = None
):
    """The demo's training recipe (bench/convergence.py uses it too): JiT's clean-sample prediction
    and time distribution in pixel space, EMA with diffusers' warm-up, evaluation every
    `cfg.eval_every` steps with the synthetic-domain evaluator."""
    from cache_schema import RunDir
    from stages.train.config import TrainConfig

    return TrainConfig(
        shards=str(shards), out=str(run), model=cfg.model, align_lambda=lam, steps=cfg.steps,
        batch_size=cfg.batch_size, lr=cfg.lr, lr_schedule=cfg.lr_schedule, seed=cfg.seed if seed is None else seed, device=cfg.device,
        prediction="sample", time_schedule="logit_normal", time_mean=0.8, time_std=0.8, ema=0.999,
        ema_warmup=True, projector_dim=256, num_workers=0, shuffle_buffer=64,
        log_every=max(1, cfg.steps // 50), checkpoint_every=cfg.steps, sample_every=0,
        eval_every=min(cfg.eval_every, cfg.steps), eval_num=cfg.eval_num, eval_steps=cfg.eval_steps,
        eval_cfg=cfg.cfg, eval_evaluator=evaluator, resume=RunDir(run).latest_checkpoint() is not None,
    )  # fmt: skip


def _train_one(cfg: DemoConfig, out: Path, name: str, lam: float, evaluator: str, threads: int) -> str:
    import torch

    from stages.train.loop import train

    torch.set_num_threads(threads)
    summary = train(train_config(cfg, out / "shards", out / "runs" / name, lam, evaluator), progress=False)
    row = summary["last_log"] or {}
    scores = ", ".join(f"{k} {v:.3f}" for k, v in (row.get("eval") or {}).items() if v is not None)
    return f"{name}: step {summary['step']}, flow loss {row.get('flow_loss', float('nan')):.4f}; {scores}"


def _train_side_by_side(cfg: DemoConfig, out: Path, runs: dict[str, float], evaluator: str) -> None:
    """Both runs at once, one process and one thread each on the CPU (the tiny model is overhead-
    bound: two one-thread runs finish sooner than two two-thread runs in turn); in turn on a GPU."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    if cfg.device != "cpu":
        for name, lam in runs.items():
            click.echo(_train_one(cfg, out, name, lam, evaluator, os.cpu_count() or 1))
        return
    threads = max(1, (os.cpu_count() or 2) // len(runs))
    click.echo(f"{len(runs)} processes x {threads} thread(s); logs: {out / 'runs'}/<run>/log.jsonl")
    with ProcessPoolExecutor(len(runs), mp_context=get_context("spawn")) as pool:
        jobs = [
            pool.submit(_train_one, cfg, out, name, lam, evaluator, threads) for name, lam in runs.items()
        ]
        for job in jobs:
            click.echo(job.result())


def _sample_and_score(cfg: DemoConfig, out: Path, name: str, evaluator: str) -> dict[str, float]:
    """`pipeline sample --run` (decoded with the run's own autoencoder), then the synthetic-domain
    evaluator on the videos it wrote."""
    import numpy as np

    from stages.common.synth_eval import SynthEvaluator
    from stages.sample import SampleConfig, run_sample

    run = out / "runs" / name
    samples = run / "samples"
    if not (samples / "videos.npz").is_file():
        run_sample(SampleConfig(run=str(run), out=str(samples), num=cfg.num_samples, steps=cfg.sample_steps,
                                seed=cfg.seed, device=cfg.device, batch_size=8, cfg=cfg.cfg))  # fmt: skip
    with np.load(samples / "videos.npz") as npz:
        videos, labels = npz["videos"], npz["labels"]
    return SynthEvaluator.load(evaluator).evaluate(videos, labels)
