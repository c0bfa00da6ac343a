"""`pipeline demo`: the whole chain on the built-in synthetic dataset, ending in a report."""

from __future__ import annotations

import click

from pipeline.config import config_options
from pipeline.demo import PRESETS


@click.command("demo")
@click.option("--out", type=str, help="Output folder [demo-out].")
@click.option(
    "--preset", type=click.Choice(list(PRESETS)), help="tiny (CPU, minutes) or small (bigger data, longer)."
)
@click.option("--videos", type=int, help="Synthetic videos [32].")
@click.option("--classes", type=int, help="Synthetic classes [4].")
@click.option("--steps", type=int, help="Training steps per run [600].")
@click.option("--batch-size", type=int, help="Training batch size [8].")
@click.option("--num-samples", type=int, help="Videos sampled per run [32].")
@click.option("--sample-steps", type=int, help="ODE steps per sample [20].")
@click.option("--encoders", type=str, help="Comma-separated encoders [dino,sam2,videomae].")
@click.option("--device", type=str, help="cpu | cuda [cpu].")
@click.option("--seed", type=int, help="Seed for data, training and sampling [0].")
@config_options
def demo(config_file, overrides, **flags):
    """Synthesize videos, extract, pack, train with and without alignment, sample, evaluate
    (FVD with a tiny detector), analyze (IICR), and write DIR/report.md + report.html.
    Rerunning the same command resumes a killed demo."""
    from pipeline.commands.common import cli_errors, resolve_stage_config
    from pipeline.demo import DemoConfig, run_demo
    from pipeline.report import write_report
    from stages.common.runtime import dump_config

    if flags.get("encoders") is not None:
        flags["encoders"] = [e.strip() for e in flags["encoders"].split(",") if e.strip()]
    base = dict(PRESETS[flags.get("preset") or "tiny"])
    cfg = resolve_stage_config(DemoConfig, config_file, overrides, flags, base)
    with cli_errors():
        result = run_demo(cfg)
    dump_config(cfg, f"{cfg.out}/demo_config.yaml")
    write_report(result)
