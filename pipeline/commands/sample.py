"""`pipeline sample`: generate videos from a trained run or checkpoint."""

from __future__ import annotations

from functools import partial

import click

from pipeline.commands.common import help_default
from pipeline.config import config_options
from stages.common.registry import (
    DEFAULT_SAMPLER,
    DEFAULT_SAMPLER_CONVENTION,
    DEVICE_HELP,
    SAMPLER_CONVENTIONS,
    SAMPLER_NAMES,
)
from stages.sample.config import SampleConfig

_d = partial(help_default, SampleConfig)


@click.command("sample")
@click.option(
    "--run",
    type=click.Path(file_okay=False),
    default=None,
    help="Train run directory (its latest checkpoint; --checkpoint step-XXXXXXX picks another).",
)
@click.option(
    "--checkpoint",
    type=click.Path(),
    default=None,
    help="A step folder (model/ + ema/) or a save_pretrained folder.",
)
@click.option("--num", type=int, default=None, help=f"Number of videos [{_d('num')}].")
@click.option("--prompt", type=str, default=None, help="A text-to-video run (train --base): the prompt.")
@click.option(
    "--prompts",
    type=click.Path(dir_okay=False),
    default=None,
    help="A text-to-video run: a file of prompts, one per line (video i gets prompt i mod their number).",
)
@click.option(
    "--out", type=click.Path(file_okay=False), default=None, help="Output folder [RUN/samples/<checkpoint>]."
)
@click.option(
    "--sampler",
    type=click.Choice(SAMPLER_NAMES),
    default=None,
    help=f"ODE (euler, heun) or SDE (euler-maruyama) [{DEFAULT_SAMPLER}].",
)
@click.option(
    "--sampler-convention",
    type=click.Choice(SAMPLER_CONVENTIONS),
    default=None,
    help="repa: REPA's samplers.py (Heun skips its last corrector, Euler-Maruyama stops the noise at "
    f"t=0.04 then takes one mean step); uniform: uniform grid, corrector on every step [{DEFAULT_SAMPLER_CONVENTION}].",
)
@click.option("--steps", type=int, default=None, help=f"Integration steps [{_d('steps')}].")
@click.option(
    "--cfg",
    "cfg_scale",
    type=float,
    default=None,
    help=f"Classifier-free guidance scale; 1 = none [{_d('cfg')}].",
)
@click.option(
    "--guidance-interval",
    default=None,
    metavar="T_LO,T_HI",
    help="Guide only for t in [T_LO, T_HI] (t=1 is noise).",
)
@click.option(
    "--class", "class_", type=int, default=None, help="Sample this class only [balanced over classes]."
)
@click.option("--batch-size", type=int, default=None, help=f"Videos per batch [{_d('batch_size')}].")
@click.option(
    "--seed", type=int, default=None, help=f"Seed; video i's noise depends only on (seed, i) [{_d('seed')}]."
)
@click.option("--no-ema", is_flag=True, default=False, help="Use the raw model weights instead of the EMA.")
@click.option("--vae", default=None, help="VAE hub id or local folder [the run's VAE]; none: latents only.")
@click.option("--device", default=None, help=f"{DEVICE_HELP} [{_d('device')}].")
@click.option(
    "--overwrite",
    is_flag=True,
    default=None,
    help="Replace samples already in --out (this tool's own files only).",
)
@config_options
def sample(
    config_file: str | None, overrides: tuple[str, ...], cfg_scale: float | None, no_ema: bool, **flags
) -> None:
    """Generate videos: one mp4 each, a GIF grid, and videos.npz (uint8) for `pipeline evaluate`."""
    from pipeline.commands.common import cli_errors, resolve_stage_config
    from stages.sample import SampleConfig, run_sample

    flags["cfg"] = cfg_scale
    flags["ema"] = False if no_ema else None
    cfg = resolve_stage_config(SampleConfig, config_file, overrides, flags)
    _refuse_missing_prompt(cfg)
    with cli_errors():
        summary = run_sample(cfg)
    outputs = summary["outputs"]
    click.echo(
        f"sampled {summary['num']} videos ({summary['weights']} weights, {summary['sampler']} "
        f"({summary['sampler_convention']}), {summary['steps']} steps, "
        f"cfg {summary['cfg']}) in {summary['seconds']:.1f}s on {summary['device']}"
    )
    if not summary["decoded"]:
        click.echo("no VAE configured: wrote latents only (give --vae to decode videos)")
    for key, path in outputs.items():
        click.echo(f"  {key:8s} {path}")


def _refuse_missing_prompt(cfg) -> None:
    """A text-to-video run (train --base) samples prompts: none given is a bad value (exit 2),
    refused before any model loads."""
    from cache_schema import RunDir
    from pipeline.commands.common import cli_errors
    from pipeline.config import ConfigError
    from stages.sample.prompts import PROMPT_NEEDED

    if not cfg.run or cfg.prompt is not None or cfg.prompts is not None:
        return
    with cli_errors():
        base = RunDir(cfg.run).require().read_config().get("base")
    if base:
        raise ConfigError(PROMPT_NEEDED)
