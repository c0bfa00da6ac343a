"""`pipeline demo`: the whole chain on the built-in synthetic dataset, ending in a report."""

from __future__ import annotations

import click

from pipeline.commands.common import default
from pipeline.config import config_options
from pipeline.demo import DEMO_PRESETS, DemoConfig


def _d(name: str) -> str:
    value = default(DemoConfig, name)
    return ",".join(value) if isinstance(value, list) else str(value)


@click.command("demo")
@click.option("--out", type=str, help=f"Output folder [{_d('out')}].")
@click.option(
    "--preset",
    type=click.Choice(list(DEMO_PRESETS)),
    help="tiny (3,000 steps; about 8 minutes on 2 CPU cores) or small (6,000 steps; 22.6 minutes measured, clearly better samples).",
)
@click.option("--videos", type=int, help=f"Synthetic videos [{_d('videos')}].")
@click.option("--classes", type=int, help=f"Synthetic classes [{_d('classes')}].")
@click.option("--steps", type=int, help=f"Training steps per run [{_d('steps')}].")
@click.option("--batch-size", type=int, help=f"Training batch size [{_d('batch_size')}].")
@click.option(
    "--eval-every", type=int, help=f"Steps between evaluations during training [{_d('eval_every')}]."
)
@click.option("--eval-num", type=int, help=f"Videos per evaluation [{_d('eval_num')}].")
@click.option("--num-samples", type=int, help=f"Videos sampled per run at the end [{_d('num_samples')}].")
@click.option("--sample-steps", type=int, help=f"ODE steps per final sample [{_d('sample_steps')}].")
@click.option(
    "--encoders", type=str, help=f"Comma-separated encoders (trained tiny ones) [{_d('encoders')}]."
)
@click.option("--device", type=str, help=f"cpu | cuda [{_d('device')}].")
@click.option("--seed", type=int, help=f"Seed for data, training and sampling [{_d('seed')}].")
@config_options
def demo(config_file, overrides, **flags):
    """Synthesize videos, build the tiny trained models (once), extract in pixel space, pack,
    train a baseline and an aligned run (evaluated during training), sample both, score them with
    the synthetic-domain evaluator, and write DIR/report.md + report.html. Rerunning the same
    command resumes a killed demo."""
    from pipeline.commands.common import cli_errors, resolve_stage_config
    from pipeline.demo import run_demo
    from pipeline.report import write_report
    from stages.common.runtime import dump_config

    if flags.get("encoders") is not None:
        flags["encoders"] = [e.strip() for e in flags["encoders"].split(",") if e.strip()]
    base = dict(DEMO_PRESETS[flags.get("preset") or "tiny"])
    cfg = resolve_stage_config(DemoConfig, config_file, overrides, flags, base)
    with cli_errors():
        result = run_demo(cfg)
    dump_config(cfg, f"{cfg.out}/demo_config.yaml")
    write_report(result)
