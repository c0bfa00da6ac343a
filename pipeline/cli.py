"""The `pipeline` command: a thin click group whose subcommands load lazily.

Lazy loading matters: `pipeline train` must never import encoder code, so a subcommand's
module (and the stage it calls) is imported only when that subcommand runs.
"""

from __future__ import annotations

import importlib
import warnings

import click

# Our report.json and config files live beside the zarr arrays; zarr warns about them on open.
warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy.*")
# The FVD protocol's I3D ships as TorchScript; torch's deprecation notice is not actionable for users.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated.*", category=FutureWarning)

# name -> (module path, attribute, one-line help shown in `pipeline --help`)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "data": (
        "pipeline.commands.data",
        "data",
        "Datasets: the built-in synthetic set (`data synth`), UCF-101 split manifests (`data ucf-split`).",
    ),
    "extract": (
        "pipeline.commands.extract",
        "extract",
        "Stage one: videos -> VAE latents + per-encoder targets (zarr).",
    ),
    "pack": ("pipeline.commands.pack", "pack", "Turn a zarr feature store into WebDataset tar shards."),
    "train": (
        "pipeline.commands.train",
        "train",
        "Stage two: train a VideoDiT from shards alone (no encoders).",
    ),
    "sample": ("pipeline.commands.sample", "sample", "Generate videos from a trained run or checkpoint."),
    "export": (
        "pipeline.commands.export",
        "export",
        "A run's checkpoint as a diffusers pipeline folder (loads without align4gen).",
    ),
    "evaluate": (
        "pipeline.commands.evaluate",
        "evaluate",
        "FVD and content-debiased FVD (stats, features, fvd).",
    ),
    "analyze": (
        "pipeline.commands.analyze",
        "analyze",
        "IICR encoder analysis over a cache or straight from videos.",
    ),
    "models": (
        "pipeline.commands.models",
        "models",
        "Locally trained tiny encoders, their random twins and the synthetic classifier (`models build`).",
    ),
    "info": ("pipeline.commands.info", "info", "One-screen summary of a store, a shard folder or a run."),
    "demo": (
        "pipeline.commands.demo",
        "demo",
        "The whole chain on the built-in synthetic dataset (CPU, tiny preset).",
    ),
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when it is invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in SUBCOMMANDS:
            return None
        module_name, attr, _ = SUBCOMMANDS[cmd_name]
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Use the static help so `pipeline --help` stays fast and imports nothing heavy.
        rows = [(name, help_text) for name, (_, _, help_text) in SUBCOMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="align4gen")
def main() -> None:
    """Train video diffusion transformers with representation alignment, in two stages.

    Stage one (`extract`, `pack`) runs the VAE and the frozen encoders once and caches
    latents and per-encoder alignment targets; stage two (`train`) trains from the cache alone.
    """


if __name__ == "__main__":
    main()
