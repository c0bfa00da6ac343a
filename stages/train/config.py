"""The training config: one dataclass whose keys are the CLI flags and the YAML keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MODEL_NAMES = ("tiny", "S/2", "B/2", "L/2", "XL/2")
TIME_SCHEDULES = ("uniform", "logit_normal")


@dataclass
class TrainConfig:
    """Everything a training run depends on; written resolved to RUN/config.yaml."""

    shards: str = ""
    out: str = ""
    # model
    model: str = "XL/2"
    class_dropout: float = 0.1
    gradient_checkpointing: bool = False
    # alignment
    align_lambda: float = 0.5  # CLI: --lambda; 0 turns alignment off
    align_depth: int | None = None  # None: stages.common.dit.default_align_depth(depth)
    encoders: list[str] = field(default_factory=list)  # empty: every cached encoder
    projector_dim: int = 2048
    # flow matching
    time_schedule: str = "uniform"
    # optimisation
    steps: int = 400_000
    batch_size: int = 32  # per rank, per micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.9999
    seed: int = 0
    # data
    num_workers: int = 4
    shuffle_buffer: int = 1000
    # bookkeeping
    log_every: int = 100
    checkpoint_every: int = 5000
    sample_every: int = 5000
    sample_steps: int = 25
    num_samples: int = 8
    resume: bool = False
    device: str = "auto"
    precision: str = "bf16"  # bf16 autocast on CUDA; CPU always runs fp32
    # what the cache must be; None = whatever the shards hold (config.yaml records the value used)
    expect_fingerprint: str | None = None
    vae: str | None = None  # VAE for periodic sample GIFs; config.yaml records the cache's VAE id
    latent_scale: float | None = None  # filled from the shards' spec

    def validate(self) -> None:
        """Raise ValueError on values no run can use, naming the key."""
        checks: list[tuple[bool, str]] = [
            (bool(self.shards), "shards: a shard folder (written by `pipeline pack`) is required"),
            (bool(self.out), "out: a run directory is required"),
            (self.model in MODEL_NAMES, f"model: {self.model!r} is not one of {', '.join(MODEL_NAMES)}"),
            (
                self.time_schedule in TIME_SCHEDULES,
                f"time_schedule: {self.time_schedule!r} not in {TIME_SCHEDULES}",
            ),
            (self.steps >= 1, "steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.align_lambda >= 0, "lambda (align_lambda) must be >= 0"),
            (self.align_depth is None or self.align_depth >= 1, "align_depth must be >= 1"),
            (0.0 <= self.ema < 1.0, "ema must be in [0, 1)"),
            (self.lr > 0, "lr must be > 0"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.projector_dim >= 1, "projector_dim must be >= 1"),
            (self.precision in ("bf16", "fp32"), "precision must be bf16 or fp32"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# Small values for tests and the CPU demo: every path runs in seconds.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": "tiny",
        "batch_size": 4,
        "steps": 20,
        "log_every": 1,
        "checkpoint_every": 10,
        "sample_every": 10,
        "sample_steps": 4,
        "num_samples": 4,
        "ema": 0.99,
        "lr": 1e-3,
        "num_workers": 0,
        "shuffle_buffer": 16,
        "projector_dim": 64,
    },
}
