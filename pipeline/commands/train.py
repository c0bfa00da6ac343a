"""`pipeline train`: stage two, a VideoDiT trained (or a pretrained Wan fine-tuned) from shards alone
(imports no encoder code)."""

from __future__ import annotations

from functools import partial

import click

from pipeline.commands.common import help_default
from pipeline.config import config_options
from stages.common.registry import (
    ALIGN_SCHEDULES,
    DEFAULT_MODEL,
    DEVICE_HELP,
    LR_SCHEDULES,
    MODEL_SIZES,
    ON_CORRUPT,
    PREDICTIONS,
    PROJECTORS,
    REPORT_TO,
    TARGET_NORMS,
)
from stages.train.config import TIME_SCHEDULES, TRAIN_PRESETS, TrainConfig
from stages.train.evaluation import EVAL_METRICS

_d = partial(help_default, TrainConfig, none="never")


@click.command("train")
@click.option(
    "--shards", type=str, help="Shard folder written by `pipeline pack` (local path or fsspec URL)."
)
@click.option("--out", type=str, help="Run directory (config, log, TensorBoard, checkpoints, plots).")
@click.option(
    "--preset",
    type=click.Choice(list(TRAIN_PRESETS)),
    help="tiny: tiny model, batch 4, 20 steps (tests, CPU demo).",
)
@click.option("--model", type=click.Choice(list(MODEL_SIZES)), help=f"VideoDiT size [{DEFAULT_MODEL}].")
@click.option(
    "--base",
    type=str,
    help="Fine-tune this pretrained text-to-video model (diffusers pipeline folder or hub id, Wan) "
    "instead of training a fresh VideoDiT; needs --lora-rank R or --full-finetune.",
)
@click.option("--lora-rank", type=int, help="With --base: train LoRA adapters of this rank (peft).")
@click.option("--lora-alpha", type=float, help="With --base: LoRA alpha (scale alpha / rank) [the rank].")
@click.option(
    "--lora-targets",
    type=str,
    help="With --base: comma-separated module names that get LoRA [to_q,to_k,to_v,to_out.0].",
)
@click.option(
    "--full-finetune",
    is_flag=True,
    default=None,
    help="With --base: train every weight of the transformer (saved with save_pretrained).",
)
@click.option(
    "--fsdp/--no-fsdp",
    default=None,
    help="Under torchrun: shard the model over the ranks with FSDP2 instead of DDP (models that do not "
    "fit one GPU); checkpoints hold full weights as without it [off].",
)
@click.option("--steps", type=int, help=f"Optimizer steps [{_d('steps')}].")
@click.option("--batch-size", type=int, help=f"Clips per rank per micro-step [{_d('batch_size')}].")
@click.option("--grad-accum", type=int, help=f"Micro-steps per optimizer step [{_d('grad_accum')}].")
@click.option("--seed", type=int, help=f"Seed for init, noise and data order [{_d('seed')}].")
@click.option("--log-every", type=int, help=f"Steps between log.jsonl rows [{_d('log_every')}].")
@click.option("--checkpoint-every", type=int, help=f"Steps between checkpoints [{_d('checkpoint_every')}].")
@click.option("--keep-checkpoints", type=int, help="Keep only the newest N checkpoints [all].")
@click.option(
    "--lambda",
    "align_lambda",
    type=str,
    help=f"Alignment weight: one number for every encoder, or dino=0.5,sam2=0.25; 0 = off [{_d('align_lambda')}].",
)
@click.option(
    "--align-schedule",
    type=click.Choice(ALIGN_SCHEDULES),
    help=f"Weight over steps (CREPA shapes) [{_d('align_schedule')}].",
)
@click.option(
    "--align-until", type=int, help=f"Alignment ends for good after this step (HASTE) [{_d('align_until')}]."
)
@click.option(
    "--align-depth", type=int, help="Block whose output is aligned [8, or depth/3 for shallow models]."
)
@click.option("--encoders", type=str, help="Comma-separated subset of the cached encoders [all].")
@click.option(
    "--projector",
    type=click.Choice(PROJECTORS),
    help=f"REPA's MLP or iREPA's conv on the token grid [{_d('projector')}].",
)
@click.option("--projector-dim", type=int, help=f"MLP projector width [{_d('projector_dim')}].")
@click.option(
    "--projector-kernel",
    type=int,
    help=f"Conv projector kernel, odd (iREPA: 3 in its README and JiT code, 1 in its LDM script) "
    f"[{_d('projector_kernel')}].",
)
@click.option(
    "--target-norm",
    type=click.Choice(TARGET_NORMS),
    help=f"Targets as cached, or iREPA's spatial z-score [{_d('target_norm')}].",
)
@click.option(
    "--resume",
    is_flag=True,
    default=None,
    help="Continue RUN from its latest checkpoint, with its own config.",
)
@click.option(
    "--resume-from",
    type=str,
    help="Continue RUN from this checkpoint (step-XXXXXXX) instead of its latest, e.g. when the latest is damaged.",
)
@click.option("--lr", type=float, help=f"AdamW (peak) learning rate [{_d('lr')}].")
@click.option(
    "--lr-schedule",
    type=click.Choice(LR_SCHEDULES),
    help=f"Learning rate over steps, diffusers' get_scheduler shapes [{_d('lr_schedule')}].",
)
@click.option("--lr-warmup", type=int, help=f"Steps of linear warm-up from 0 [{_d('lr_warmup')}].")
@click.option("--weight-decay", type=float, help=f"AdamW weight decay [{_d('weight_decay')}].")
@click.option("--grad-clip", type=float, help=f"Gradient norm clip; 0 = off [{_d('grad_clip')}].")
@click.option(
    "--report-to",
    type=click.Choice(REPORT_TO),
    help=f"Where log rows also go (wandb: pip install 'align4gen[wandb]') [{_d('report_to')}].",
)
@click.option(
    "--compile/--no-compile",
    "compile_model",
    default=None,
    help="torch.compile the model's forward and the projectors [off].",
)
@click.option("--ema", type=float, help=f"EMA decay [{_d('ema')}].")
@click.option(
    "--ema-warmup/--no-ema-warmup",
    default=None,
    help=f"EMA decay min(ema, (1 + step) / (10 + step)) as diffusers' EMAModel [{_d('ema_warmup')}].",
)
@click.option("--num-workers", type=int, help=f"Loader worker processes per rank [{_d('num_workers')}].")
@click.option(
    "--on-corrupt",
    type=click.Choice(ON_CORRUPT),
    help=f"A sample failing its checksum: stop, or skip and log [{_d('on_corrupt')}].",
)
@click.option(
    "--time-schedule", type=click.Choice(TIME_SCHEDULES), help=f"Flow time sampling [{_d('time_schedule')}]."
)
@click.option("--time-mean", type=float, help=f"logit_normal: mean of logit(t) [{_d('time_mean')}].")
@click.option("--time-std", type=float, help=f"logit_normal: std of logit(t) [{_d('time_std')}].")
@click.option(
    "--prediction",
    type=click.Choice(PREDICTIONS),
    help=f"Network output: velocity (SiT/REPA) or the clean sample (JiT; pixel space) [{_d('prediction')}].",
)
@click.option(
    "--vae",
    type=str,
    help="VAE (hub id or folder) for periodic sample GIFs, e.g. the shards' VAE [none: no GIFs].",
)
@click.option(
    "--sample-every", type=int, help=f"Steps between sample GIF grids; 0 = never [{_d('sample_every')}]."
)
@click.option(
    "--eval-every",
    type=int,
    help=f"Steps between evaluations of the EMA model; 0 = never [{_d('eval_every')}].",
)
@click.option(
    "--eval-num", type=int, help=f"Videos per evaluation (fixed noise and labels) [{_d('eval_num')}]."
)
@click.option("--eval-steps", type=int, help=f"Sampler steps of the evaluation videos [{_d('eval_steps')}].")
@click.option("--eval-cfg", type=float, help=f"Guidance scale of the evaluation videos [{_d('eval_cfg')}].")
@click.option(
    "--eval-metric",
    type=click.Choice(EVAL_METRICS),
    help=f"synth: the synthetic-domain evaluator; fvd / cd-fvd against --eval-real-stats [{_d('eval_metric')}].",
)
@click.option(
    "--eval-evaluator", type=str, help="synth: evaluator folder [the one `pipeline models build` made]."
)
@click.option("--eval-real-stats", type=str, help="fvd / cd-fvd: real stats from `pipeline evaluate stats`.")
@click.option("--eval-detector-weights", type=str, help="fvd / cd-fvd: the detector's weights file.")
@click.option("--device", type=str, help=f"{DEVICE_HELP} [{_d('device')}].")
@config_options
def train(config_file, overrides, preset, **flags):
    """Train a VideoDiT with flow matching and alignment to cached encoder targets.

    Run under `torchrun --nproc_per_node N` for DDP (or FSDP2 with --fsdp). SIGTERM or Ctrl-C writes a checkpoint and
    exits (0, or 130 after Ctrl-C); `--resume` continues with the run's own config, so flags are
    needed only for what may change (steps, logging, workers, device, learning rate).
    """
    from pipeline.commands.common import cli_errors, resolve_stage_config
    from stages.train import train as run_train

    flags["compile"] = flags.pop("compile_model")
    for key in ("encoders", "lora_targets"):
        if flags.get(key) is not None:
            flags[key] = [e.strip() for e in flags[key].split(",") if e.strip()]
    base = TRAIN_PRESETS.get(preset or "", {})
    if flags.get("resume") or flags.get("resume_from"):
        base = _resume_base(flags.get("out"), config_file, overrides)
    cfg = resolve_stage_config(TrainConfig, config_file, overrides, flags, base)
    if cfg.resuming:
        _refuse_steps_below(cfg)
    with cli_errors():
        summary = run_train(cfg)
    _report(summary)


def _resume_base(out: str | None, config_file, overrides) -> dict:
    """--resume: the run's own resolved config is the base the flags change."""
    from cache_schema import RunDir
    from pipeline.commands.common import cli_errors
    from pipeline.config import load_yaml, parse_overrides

    if not out:
        out = _configured_out(load_yaml(config_file) if config_file else {}, parse_overrides(overrides))
    if not out:
        raise click.UsageError("--resume needs --out RUN (the run directory to continue)")
    with cli_errors():
        previous = RunDir(out).require().read_config()
    previous.pop("vae_spec", None)
    previous.pop("model_family", None)  # recorded from the model built, not a setting
    previous.pop("shards_index", None)  # what the run read last: compared on resume, not a setting
    previous.pop("world_size", None)  # the ranks batch_size was per: compared on resume, not a setting
    previous.pop("latent_shape", None)  # a fine-tune's record of its shards, for `pipeline sample`
    previous.pop("text_spec", None)
    return previous


def _configured_out(yaml_tree: dict, overrides: dict) -> str | None:
    """`out` as the config resolves it (--set over the YAML, `${...}` interpolations resolved)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    tree = OmegaConf.merge(OmegaConf.create(yaml_tree), OmegaConf.create(overrides))
    try:
        out = OmegaConf.select(tree, "out")
    except OmegaConfBaseException as exc:
        raise click.BadParameter(
            f"out: {OmegaConf.to_container(tree)['out']!r} does not resolve ({exc})"
        ) from None
    return None if out is None else str(out)


def _refuse_steps_below(cfg: TrainConfig) -> None:
    """A resume to fewer steps than the run has is a bad value (exit 2), refused before anything runs."""
    from pipeline.commands.common import cli_errors
    from pipeline.config import ConfigError
    from stages.train.config import steps_below_resume
    from stages.train.loop import checkpoint_step, resume_checkpoint

    with cli_errors():
        start = checkpoint_step(resume_checkpoint(cfg))
    message = steps_below_resume(cfg.steps, start)
    if message:
        raise ConfigError(message)


def _report(summary: dict) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    for note in summary.get("notes", []):
        click.echo(f"note: {note}")
    row = summary["last_log"]
    if row:
        cos = "  ".join(f"cos[{k}] {v:.3f}" for k, v in row["cos_sim"].items())
        click.echo(
            f"step {row['step']}  loss {row['loss']:.4f}  flow {row['flow_loss']:.4f}  "
            f"align {row['align_loss']:.4f}  {cos}  {row['samples_per_s']:.1f} samples/s"
        )
    if summary.get("skipped"):
        click.echo(f"skipped {summary['skipped']} corrupt sample(s); their keys are in log.jsonl")
    if summary["checkpoint"]:
        click.echo(f"checkpoint: {summary['checkpoint']}")
    click.echo(f"run: {summary['run_dir']}")
    if summary["interrupted"]:
        click.echo(f"stopped by {summary['interrupted']} at step {summary['step']}; continue with --resume")
        if summary["interrupted"] == "SIGINT":
            raise SystemExit(130)
