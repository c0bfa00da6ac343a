"""`pipeline demo`: the whole chain on the built-in synthetic set, then a report.

synth -> extract (tiny dino, sam2, videomae) -> pack -> train with alignment and a baseline
without -> sample both -> FVD against the real clips (tiny I3D stand-in) -> IICR of the cache
-> DIR/report.md + report.html. Each step calls a stage's public function; this module only
orchestrates and writes the report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from pipeline.report import DemoResult
from stages.common.registry import DEFAULT_ENCODERS


@dataclass
class DemoConfig:
    out: str = "demo-out"
    preset: str = "tiny"
    videos: int = 32
    classes: int = 4
    frames: int = 16  # frames per synthetic video (clips take 8 with the tiny preset)
    size: int = 64
    seed: int = 0
    encoders: list[str] = field(default_factory=lambda: list(DEFAULT_ENCODERS))
    steps: int = 600
    batch_size: int = 8
    align_lambda: float = 0.5
    num_samples: int = 32
    sample_steps: int = 20
    fvd_frames: int = 8
    device: str = "cpu"
    # real default models on a GPU instead of the tiny ones (weights via flags / HF cache)
    vae: str | None = None
    dino_model: str | None = None
    sam2_model: str | None = None
    videomae_model: str | None = None
    detector: str = "i3d"
    detector_weights: str | None = None


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # more data, a bigger model, longer training: minutes on a GPU, far longer on a CPU
    "small": {
        "videos": 256,
        "classes": 8,
        "frames": 32,
        "size": 128,
        "steps": 5000,
        "batch_size": 32,
        "num_samples": 64,
        "sample_steps": 50,
    },
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
    from cache_schema import prepare_output

    out = Path(cfg.out)
    prepare_output(out, "demo")
    timer = Timer()
    with timer.step("synthesize videos"):
        data = _synth(cfg, out)
    with timer.step("extract (VAE + frozen encoders -> zarr)"):
        extracted = _extract(cfg, out, data)
    with timer.step("pack (zarr -> WebDataset shards)"):
        _pack(out)
    runs = {"aligned": cfg.align_lambda, "baseline": 0.0}
    for name, lam in runs.items():
        with timer.step(f"train {name} (lambda={lam})"):
            _train(cfg, out, name, lam)
    for name in runs:
        with timer.step(f"sample {name}"):
            _sample(cfg, out, name)
    with timer.step("evaluate (FVD)"):
        fvd = _fvd(cfg, out, data, runs)
    with timer.step("analyze (IICR of the cached targets)"):
        from stages.evaluate.iicr import iicr_from_store

        iicr = iicr_from_store(str(out / "cache.zarr"), progress=False)
        (out / "iicr.json").write_text(json.dumps(iicr, indent=2, default=str))
    from cache_schema import RunDir

    return DemoResult(
        out=out,
        preset=cfg.preset,
        videos=cfg.videos,
        classes=cfg.classes,
        steps=cfg.steps,
        encoders=list(cfg.encoders),
        clips=extracted.num_clips,
        target_format=extracted.layout["encoders"][0].get("format", "?"),
        fidelity=extracted.fidelity,
        logs={name: RunDir(out / "runs" / name).read_log() for name in runs},
        grids={name: out / "runs" / name / "samples" / "grid.gif" for name in runs},
        fvd=fvd,
        iicr=iicr,
        timings=timer.steps,
    )


def _synth(cfg: DemoConfig, out: Path) -> Path:
    from stages.common.synth import make_synthetic

    data = out / "data"
    if not (data / "synth.json").is_file():
        make_synthetic(
            data, videos=cfg.videos, classes=cfg.classes, frames=cfg.frames, size=cfg.size, seed=cfg.seed
        )
    return data


def _extract(cfg: DemoConfig, out: Path, data: Path):
    from stages.extract.config import ExtractConfig, preset_values
    from stages.extract.runner import run_extract

    values = preset_values("tiny")  # tiny models of the real classes, unless given below
    values.update({"data": str(data), "out": str(out / "cache.zarr"), "encoders": list(cfg.encoders),
                   "device": cfg.device, "size": cfg.size})  # fmt: skip
    for key in ("vae", "dino_model", "sam2_model", "videomae_model"):
        if getattr(cfg, key):
            values[key] = getattr(cfg, key)
    return run_extract(ExtractConfig(**values))


def _pack(out: Path) -> None:
    from stages.pack.packer import PackConfig, run_pack

    config = PackConfig(cache=str(out / "cache.zarr"), out=str(out / "shards"), samples_per_shard=8,
                        overwrite=True, progress=False)  # fmt: skip
    run_pack(config)


def _train(cfg: DemoConfig, out: Path, name: str, lam: float) -> None:
    from cache_schema import RunDir
    from stages.train.config import PRESETS as TRAIN_PRESETS
    from stages.train.config import TrainConfig
    from stages.train.loop import train

    run = out / "runs" / name
    values = {**TRAIN_PRESETS["tiny"], "shards": str(out / "shards"), "out": str(run), "align_lambda": lam,
              "steps": cfg.steps, "batch_size": cfg.batch_size, "seed": cfg.seed, "device": cfg.device,
              "log_every": max(1, cfg.steps // 60), "checkpoint_every": cfg.steps, "sample_every": 0,
              "resume": RunDir(run).exists()}  # fmt: skip
    train(TrainConfig(**values), progress=True)


def _sample(cfg: DemoConfig, out: Path, name: str) -> None:
    from stages.sample import SampleConfig, run_sample

    run = out / "runs" / name
    run_sample(SampleConfig(run=str(run), out=str(run / "samples"), num=cfg.num_samples, steps=cfg.sample_steps,
                            seed=cfg.seed, device=cfg.device, batch_size=8))  # fmt: skip


def _fvd(cfg: DemoConfig, out: Path, data: Path, runs: dict[str, float]) -> dict[str, Any]:
    from stages.evaluate.fvd import EvalConfig, compute_fvd
    from stages.evaluate.tiny import make_tiny_i3d

    weights = cfg.detector_weights or str(make_tiny_i3d(out / "detectors" / "tiny_i3d.pt"))
    eval_cfg = EvalConfig(detector=cfg.detector, detector_weights=weights, frames=cfg.fvd_frames,
                          resolution=cfg.size, num_videos=cfg.videos, batch_size=8, device=cfg.device,
                          cache_dir=str(out / "fvd-stats"), progress=False)  # fmt: skip
    fvd = {name: compute_fvd(data, out / "runs" / name / "samples" / "videos.npz", eval_cfg) for name in runs}
    (out / "metrics.json").write_text(json.dumps(fvd, indent=2, default=str))
    return fvd
