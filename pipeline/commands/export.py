"""`pipeline export`: a trained run's checkpoint as a diffusers pipeline folder."""

from __future__ import annotations

import click

from pipeline.config import config_options


@click.command("export")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--checkpoint", type=str, default=None, help="step-XXXXXXX inside RUN [latest].")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="The pipeline folder to write.")
@click.option(
    "--weights", type=click.Choice(["ema", "model"]), default=None, help="EMA or raw model weights [ema]."
)
@click.option("--vae", type=str, default=None, help="VAE hub id or folder to ship [the run's VAE].")
@click.option("--overwrite", is_flag=True, default=None, help="Replace a folder this command wrote.")
@config_options
def export(config_file, overrides, run, **flags):
    """Write RUN's checkpoint as a folder that `DiffusionPipeline.from_pretrained(DIR,
    trust_remote_code=True)` loads without align4gen: the VideoDiT (EMA by default) with its own
    module, the VAE, a flow-matching Euler scheduler and the pipeline class. It generates the
    videos `pipeline sample --sampler euler` does with the same seed. Upload: hf upload USER/REPO DIR .
    """
    from pipeline.commands.common import cli_errors, resolve_stage_config
    from stages.export import ExportConfig, export_pipeline

    flags["run"] = run
    cfg = resolve_stage_config(ExportConfig, config_file, overrides, flags)
    with cli_errors():
        summary = export_pipeline(cfg)
    click.echo(
        f"exported {summary['checkpoint']} ({summary['weights']} weights) of {summary['run']} with VAE "
        f"{summary['vae']} to {summary['out']}"
    )
    click.echo(f"load: DiffusionPipeline.from_pretrained({summary['out']!r}, trust_remote_code=True)")
