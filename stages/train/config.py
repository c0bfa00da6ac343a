"""The training config: one dataclass whose keys are the CLI flags and the YAML keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stages.common.registry import (
    ALIGN_SCHEDULES,
    DEFAULT_MODEL,
    LR_SCHEDULES,
    MODEL_SIZES,
    ON_CORRUPT,
    PREDICTIONS,
    PROJECTORS,
    REPORT_TO,
    TARGET_NORMS,
)
from stages.common.runtime import check_device

from .evaluation import EVAL_METRICS

TIME_SCHEDULES = ("uniform", "logit_normal")
PRECISIONS = ("bf16", "fp32")

# What a resumed run must keep: the weights, the optimizer state or the data order depend on it.
# Everything else (steps, logging, workers, device, lr, ...) may change on --resume. The global
# batch (batch_size x ranks) is kept too, by resume_batch_size: the number of ranks may change.
RESUME_FIXED = (
    "model",
    "class_dropout",
    "align_lambda",
    "align_depth",
    "align_schedule",
    "align_until",
    "encoders",
    "projector",
    "projector_dim",
    "projector_kernel",
    "target_norm",
    "time_schedule",
    "time_mean",
    "time_std",
    "prediction",
    "grad_accum",
    "seed",
    "shuffle_buffer",
    "expect_fingerprint",
    "eval_every",
    "eval_num",
    "eval_steps",
    "eval_cfg",
    "eval_metric",
    "lr_schedule",
    "lr_warmup",
    "base",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "full_finetune",
)
# A schedule that decays over the run's steps (lr.py) also fixes the number of steps.
STEPS_FIXED_BY = ("linear", "cosine")


@dataclass
class TrainConfig:
    """Everything a training run depends on; written resolved to RUN/config.yaml."""

    shards: str = ""
    out: str = ""
    # model
    model: str = DEFAULT_MODEL
    class_dropout: float = 0.1
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model's forward and the projectors (compiled.py)
    # under torchrun: FSDP2-shard the model (stages/common/models/fsdp.py) instead of DDP; checkpoints
    # stay full. One process: nothing to shard (a note says so)
    fsdp: bool = False
    # fine-tuning a pretrained text-to-video model (finetune.py): a diffusers pipeline folder or hub
    # id (Wan), trained as LoRA (lora_rank) or in full (full_finetune); None: a fresh model (MODEL_FAMILY)
    base: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None  # None: the rank (scale 1, as diffusers' scripts)
    lora_targets: list[str] = field(default_factory=list)  # module name suffixes; empty: the family's default
    full_finetune: bool = False
    # alignment (REPA; schedules after HASTE/CREPA; target norm and conv projector after iREPA)
    align_lambda: float | str = 0.5  # CLI --lambda: one number, or "dino=0.5,sam2=0.25"; 0 = off
    align_schedule: str = "constant"
    align_until: int | None = None  # alignment ends for good after this step (HASTE)
    align_depth: int | None = None  # None: the model adapter's default_align_block()
    encoders: list[str] = field(default_factory=list)  # empty: every cached encoder
    projector: str = "mlp"
    projector_dim: int = 2048
    # conv projector's kernel: 3 as iREPA's README ("kernel_size=3, padding=1") and its JiT script
    # (jit/main_jit.py --proj_kwargs_kernel_size 3); its LDM script defaults to 1 (ldm/train.py)
    projector_kernel: int = 3
    target_norm: str = "token"
    # flow matching: what the network predicts; t ~ uniform or sigmoid(N(time_mean, time_std^2))
    prediction: str = "velocity"
    time_schedule: str = "uniform"
    time_mean: float = 0.0
    time_std: float = 1.0
    # optimisation
    steps: int = 400_000
    batch_size: int = 32  # per rank, per micro-step
    grad_accum: int = 1
    lr: float = 1e-4  # the peak: lr_schedule scales it (diffusers' get_scheduler)
    lr_schedule: str = "constant"
    lr_warmup: int = 0  # optimizer steps of linear warm-up from 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 = off
    ema: float = 0.9999
    ema_warmup: bool = False  # diffusers' EMAModel warm-up: decay min(ema, (1 + step) / (10 + step))
    seed: int = 0
    # data
    num_workers: int = 4
    shuffle_buffer: int = 1000  # samples shuffled together: windows of each epoch's shard-permuted order
    on_corrupt: str = "stop"
    # bookkeeping
    log_every: int = 100
    report_to: str = "tensorboard"  # every log.jsonl row also goes here (trackers.py)
    checkpoint_every: int = 5000
    keep_checkpoints: int | None = None  # None: keep every checkpoint
    sample_every: int = 5000
    sample_steps: int = 25
    num_samples: int = 8
    # evaluation during training (stages/train/evaluation.py): every N steps and at the last; 0 = off
    eval_every: int = 0
    eval_num: int = 32  # videos per evaluation (fixed noise and labels)
    eval_steps: int = 20  # sampler steps (Euler, REPA's grid)
    eval_cfg: float = 1.0  # classifier-free guidance scale of the evaluation samples
    eval_metric: str = "synth"
    eval_evaluator: str | None = None  # synth: evaluator folder (None: the one `pipeline models build` made)
    eval_real_stats: str | None = None  # fvd / cd-fvd: real stats from `pipeline evaluate stats`
    eval_detector_weights: str | None = None  # fvd / cd-fvd: the detector's weights (as `pipeline evaluate`)
    resume: bool = False
    resume_from: str | None = None  # a step folder of RUN/checkpoints instead of `latest` (implies resume)
    device: str = "auto"
    precision: str = "bf16"  # bf16 autocast on CUDA; CPU always runs fp32
    # what the cache must be; None = whatever the shards hold (config.yaml records the value used)
    expect_fingerprint: str | None = None
    vae: str | None = None  # VAE (id or folder) for periodic sample GIFs; None: no GIFs. Kind and
    # scale come from the shards' VAE spec

    @property
    def resuming(self) -> bool:
        return bool(self.resume or self.resume_from)

    def validate(self) -> None:
        """Raise ValueError on values no run can use, naming the key and the allowed range."""
        checks: list[tuple[bool, str]] = [
            (bool(self.shards), "shards: a shard folder (written by `pipeline pack`) is required"),
            (bool(self.out), "out: a run directory is required"),
            (self.model in MODEL_SIZES, f"model: {self.model!r} is not one of {', '.join(MODEL_SIZES)}"),
            (0.0 <= self.class_dropout < 1.0, f"class_dropout must be in [0, 1), got {self.class_dropout}"),
            (
                self.align_schedule in ALIGN_SCHEDULES,
                f"align_schedule: {self.align_schedule!r} not in {ALIGN_SCHEDULES}",
            ),
            (
                self.align_until is None or self.align_until >= 1,
                f"align_until must be >= 1, got {self.align_until}",
            ),
            (self.align_depth is None or self.align_depth >= 1, "align_depth must be >= 1"),
            (len(set(self.encoders)) == len(self.encoders), f"encoders: {self.encoders} names one twice"),
            (self.projector in PROJECTORS, f"projector: {self.projector!r} not in {PROJECTORS}"),
            (self.projector_dim >= 1, "projector_dim must be >= 1"),
            (
                self.projector_kernel >= 1 and self.projector_kernel % 2 == 1,
                f"projector_kernel must be odd and >= 1 (it keeps the token grid), got {self.projector_kernel}",
            ),
            (self.target_norm in TARGET_NORMS, f"target_norm: {self.target_norm!r} not in {TARGET_NORMS}"),
            (
                self.time_schedule in TIME_SCHEDULES,
                f"time_schedule: {self.time_schedule!r} not in {TIME_SCHEDULES}",
            ),
            (self.prediction in PREDICTIONS, f"prediction: {self.prediction!r} not in {PREDICTIONS}"),
            (self.time_std > 0, f"time_std must be > 0, got {self.time_std}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"lr_schedule: {self.lr_schedule!r} is not one of {' | '.join(LR_SCHEDULES)}",
            ),
            (self.lr_warmup >= 0, f"lr_warmup must be >= 0, got {self.lr_warmup}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}"),
            (0.0 <= self.ema < 1.0, f"ema must be in [0, 1), got {self.ema}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.shuffle_buffer >= 1, f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}"),
            (self.on_corrupt in ON_CORRUPT, f"on_corrupt: {self.on_corrupt!r} not in {ON_CORRUPT}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (
                self.report_to in REPORT_TO,
                f"report_to: {self.report_to!r} is not one of {' | '.join(REPORT_TO)}",
            ),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.keep_checkpoints is None or self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.sample_every >= 0, f"sample_every must be >= 0 (0 = never), got {self.sample_every}"),
            (self.sample_steps >= 1 and self.num_samples >= 1, "sample_steps and num_samples must be >= 1"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.eval_every >= 0, f"eval_every must be >= 0 (0 = never), got {self.eval_every}"),
            (self.eval_num >= 1 and self.eval_steps >= 1, "eval_num and eval_steps must be >= 1"),
            (self.eval_cfg >= 1.0, f"eval_cfg must be >= 1 (1 = no guidance), got {self.eval_cfg}"),
            (self.eval_metric in EVAL_METRICS, f"eval_metric: {self.eval_metric!r} not in {EVAL_METRICS}"),
            (
                self.resume_from is None or _is_step_name(self.resume_from),
                f"resume_from: {self.resume_from!r} is not a checkpoint name like step-0001000",
            ),
        ]
        for ok, message in checks + self._finetune_checks() + self._fsdp_checks():
            if not ok:
                raise ValueError(message)
        check_device(self.device)
        from .trackers import check_tracker

        check_tracker(self.report_to)
        from .align import parse_lambdas

        parse_lambdas(self.align_lambda, list(self.encoders) or _names_in(self.align_lambda))

    def _finetune_checks(self) -> list[tuple[bool, str]]:
        """--base needs exactly one of --lora-rank R and --full-finetune, and they need --base."""
        lora, full = self.lora_rank is not None, self.full_finetune
        return [
            (
                not (lora and full),
                "lora_rank / full_finetune: pass --lora-rank R (LoRA) or --full-finetune, not both",
            ),
            (
                not self.base or lora or full,
                f"base: --base {self.base} needs --lora-rank R (LoRA, e.g. 32) or --full-finetune",
            ),
            (
                bool(self.base) or not (lora or full or self.lora_targets or self.lora_alpha is not None),
                "base: --lora-rank, --lora-alpha, --lora-targets and --full-finetune fine-tune a pretrained "
                "model; pass --base PIPELINE (a diffusers pipeline folder or hub id)",
            ),
            (self.lora_rank is None or self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank}"),
            (
                self.lora_alpha is None or self.lora_alpha > 0,
                f"lora_alpha must be > 0, got {self.lora_alpha}",
            ),
            (
                not self.base or (self.eval_every == 0 and not self.vae),
                "base: sample GIFs (--vae) and --eval-every during training are for class-conditioned "
                "runs; sample a fine-tuned model with `pipeline sample --run RUN --prompt TEXT`",
            ),
        ]

    def _fsdp_checks(self) -> list[tuple[bool, str]]:
        """What --fsdp cannot be combined with yet (a sharded model runs only inside the step)."""
        return [
            (
                not (self.fsdp and self.compile),
                "fsdp: --fsdp with --compile is not supported yet; drop one of them",
            ),
            (
                not self.fsdp or (self.eval_every == 0 and not self.vae),
                "fsdp: sample GIFs (--vae) and --eval-every run the EMA model on rank 0, which holds only "
                "its shard under --fsdp; drop them and sample a checkpoint with `pipeline sample --run RUN`",
            ),
        ]


def _is_step_name(name: str) -> bool:
    return name.startswith("step-") and name[5:].isdigit()


def steps_below_resume(steps: int, start: int) -> str | None:
    """The refusal of a resume whose --steps lies below the checkpoint's step (None: fine)."""
    if steps >= start:
        return None
    return (
        f"steps: --steps {steps} is below the run's current step {start}; a resume trains up to --steps, "
        f"so pass --steps {start} or more (the run was not changed)"
    )


def resume_batch_size(previous: dict[str, Any], batch_size: int, world_size: int) -> int:
    """The per-rank batch of a resume on `world_size` ranks: the run's global batch (its batch_size
    x the ranks it ran on; a config without `world_size` predates elastic resume and keeps its
    per-rank batch) divided by the ranks now. `batch_size` is the value asked for now (the run's
    own unless a flag changed it): a value that keeps the global batch is taken as it is."""
    old = int(previous.get("batch_size", batch_size))
    old_world = int(previous.get("world_size", world_size))
    total = old * old_world
    if batch_size * world_size == total:
        return batch_size
    run = f"run: batch_size {old} x {old_world} rank(s) = {total}"
    if batch_size != old:
        fits = f"omit --batch-size to train {total // world_size} per rank" if total % world_size == 0 else ""
        raise ValueError(
            f"--resume cannot change the global batch ({run}, now: batch_size {batch_size} x {world_size} "
            f"rank(s) = {batch_size * world_size}): the data order depends on it. "
            + (fits.capitalize() if fits else f"Resume on a number of ranks that divides {total}")
        )
    if total % world_size:
        ranks = [n for n in range(1, total + 1) if total % n == 0]
        raise ValueError(
            f"--resume on {world_size} rank(s) cannot keep the run's global batch of {total} samples "
            f"({run}): {total} does not divide by {world_size}. Resume on a number of ranks that divides "
            f"it ({', '.join(map(str, ranks[:8]))}{', ...' if len(ranks) > 8 else ''})"
        )
    return total // world_size


def _names_in(value: float | str) -> list[str]:
    """Encoder names a per-encoder lambda mentions (to validate it before the cache is read)."""
    if isinstance(value, str) and "=" in value:
        return [part.split("=", 1)[0].strip() for part in value.split(",") if part.strip()]
    return ["any"]


def resume_changes(previous: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The RESUME_FIXED fields whose value differs from the run being resumed."""
    from dataclasses import asdict

    now = asdict(cfg)
    changed = []
    for key in RESUME_FIXED:
        if key not in previous or now.get(key) is None:
            continue
        old, new = previous[key], now[key]
        if isinstance(old, (list, tuple)) or isinstance(new, (list, tuple)):
            old, new = list(old or []), list(new or [])
        if str(old) != str(new):
            changed.append(f"{key} (run: {previous[key]!r}, now: {now[key]!r})")
    if cfg.lr_schedule in STEPS_FIXED_BY and "steps" in previous and int(previous["steps"]) != cfg.steps:
        changed.append(
            f"steps (run: {previous['steps']}, now: {cfg.steps}; the {cfg.lr_schedule} learning-rate "
            "schedule decays over them)"
        )
    return changed


# Small values for tests and the CPU demo: every path runs in seconds.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
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
