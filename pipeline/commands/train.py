"""`pipeline train`: stage two, a VideoDiT trained from shards alone (imports no encoder code)."""

from __future__ import annotations

import click

from pipeline.config import config_options

MODELS = ["tiny", "S/2", "B/2", "L/2", "XL/2"]


@click.command("train")
@click.option(
    "--shards", type=str, help="Shard folder written by `pipeline pack` (local path or fsspec URL)."
)
@click.option("--out", type=str, help="Run directory (config, log, TensorBoard, checkpoints, plots).")
@click.option(
    "--preset", type=click.Choice(["tiny"]), help="tiny: tiny model, batch 4, 20 steps (tests, CPU demo)."
)
@click.option("--model", type=click.Choice(MODELS), help="VideoDiT size [XL/2].")
@click.option("--steps", type=int, help="Optimizer steps [400000].")
@click.option("--batch-size", type=int, help="Clips per rank per micro-step [32].")
@click.option("--grad-accum", type=int, help="Micro-steps per optimizer step [1].")
@click.option("--seed", type=int, help="Seed for init, noise and data order [0].")
@click.option("--log-every", type=int, help="Steps between log.jsonl rows [100].")
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints [5000].")
@click.option(
    "--lambda", "align_lambda", type=float, help="Alignment loss weight; 0 turns alignment off [0.5]."
)
@click.option(
    "--align-depth", type=int, help="Block whose output is aligned [8, or depth/3 for shallow models]."
)
@click.option("--encoders", type=str, help="Comma-separated subset of the cached encoders [all].")
@click.option("--projector-dim", type=int, help="Projector MLP width [2048].")
@click.option("--resume", is_flag=True, default=None, help="Continue from RUN/checkpoints/latest.")
@click.option("--lr", type=float, help="AdamW learning rate [1e-4].")
@click.option("--weight-decay", type=float, help="AdamW weight decay [0].")
@click.option("--grad-clip", type=float, help="Gradient norm clip; 0 = off [1.0].")
@click.option("--ema", type=float, help="EMA decay [0.9999].")
@click.option("--num-workers", type=int, help="Loader worker processes per rank [4].")
@click.option(
    "--time-schedule", type=click.Choice(["uniform", "logit_normal"]), help="Flow time sampling [uniform]."
)
@click.option("--vae", type=str, help="VAE (hub id or folder) for periodic sample GIFs; none = no sampling.")
@click.option("--sample-every", type=int, help="Steps between sample GIF grids (needs --vae) [5000].")
@click.option("--device", type=str, help="auto | cpu | cuda [auto].")
@config_options
def train(config_file, overrides, preset, **flags):
    """Train a VideoDiT with flow matching and alignment to cached encoder targets.

    Run under `torchrun --nproc_per_node N` for DDP. SIGTERM writes a checkpoint and exits 0;
    rerun with --resume to continue.
    """
    from pipeline.config import resolve_config
    from stages.train import PRESETS, NonFiniteLoss, TrainConfig
    from stages.train import train as run_train

    if flags.get("encoders") is not None:
        flags["encoders"] = [e.strip() for e in flags["encoders"].split(",") if e.strip()]
    cfg = resolve_config(TrainConfig, config_file, overrides, flags, base=PRESETS.get(preset or "", {}))
    if not cfg.shards:
        raise click.UsageError("--shards is required (a folder written by `pipeline pack`)")
    if not cfg.out:
        raise click.UsageError("--out is required (the run directory)")

    import cache_schema
    from stages.common.vae import WeightsNotFoundError

    try:
        summary = run_train(cfg)
    except (
        cache_schema.CacheError,
        NonFiniteLoss,
        WeightsNotFoundError,
        ValueError,
        FileExistsError,
        FileNotFoundError,
    ) as exc:
        raise click.ClickException(str(exc)) from None
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    row = summary["last_log"]
    if summary["interrupted"]:
        click.echo(f"stopped by SIGTERM at step {summary['step']}; resume with --resume")
    if row:
        cos = "  ".join(f"cos[{k}] {v:.3f}" for k, v in row["cos_sim"].items())
        click.echo(
            f"step {row['step']}  loss {row['loss']:.4f}  flow {row['flow_loss']:.4f}  "
            f"align {row['align_loss']:.4f}  {cos}  {row['samples_per_s']:.1f} samples/s"
        )
    if summary["checkpoint"]:
        click.echo(f"checkpoint: {summary['checkpoint']}")
    click.echo(f"run: {summary['run_dir']}")
