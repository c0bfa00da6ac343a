"""`pipeline analyze`: IICR per encoder over a feature store, or straight from videos."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from stages.evaluate.iicr import VideoIICRConfig

_V = VideoIICRConfig()  # the --videos defaults shown in the help are the config's own

# integer VideoIICRConfig fields set by flags of the same name (used with --videos)
_CLIP_OPTIONS = {
    "frames": "Frames per clip (--videos).",
    "stride": "Frame stride (--videos).",
    "clips_per_video": "Clips per video (--videos).",
    "size": "Clip size in pixels (--videos).",
    "max_videos": "Analyse at most this many videos (--videos).",
    "batch_size": "Clips per encoder batch (--videos).",
}


def _clip_options(func):
    """Add one integer option per _CLIP_OPTIONS field, in that order, defaulting to the config's."""
    for name, text in reversed(_CLIP_OPTIONS.items()):
        default = getattr(_V, name)
        option = click.option(
            "--" + name.replace("_", "-"),
            type=int,
            default=default,
            show_default=default is not None,
            help=text,
        )
        func = option(func)
    return func


def _parse_models(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"expected NAME=ID_OR_PATH, got {item!r}", param_hint="--encoder-model")
        name, value = item.split("=", 1)
        out[name.strip()] = value.strip()
    return out


@click.command(
    help="IICR (intra/inter consistency ratio; n/a, with the reason, where the inter cosine is below 0.1) "
    "per encoder, and from a cache iREPA's spatial metrics (LDS, CDS, RMSC); writes iicr.json, "
    "spatial.json and a bar plot."
)
@click.option(
    "--cache",
    type=click.Path(exists=True),
    help="Feature store (zarr) from `pipeline extract`.",
)
@click.option("--videos", type=click.Path(exists=True), help="Video folder: run the encoders directly.")
@click.option("--encoders", help="Comma list (store: subset, default all; videos: required).")
@click.option("--preset", type=click.Choice(["tiny"]), help="Use the tiny random-initialised encoders.")
@click.option(
    "--encoder-model", "encoder_models", multiple=True, metavar="NAME=ID_OR_PATH", help="Weights per encoder."
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@_clip_options
@click.option("--block-clips", type=int, help="Clips per dask block (--cache; default: zarr chunk).")
@click.option("--device", default=_V.device, show_default=True, help="auto | cpu | cuda.")
@click.option("--no-per-position", is_flag=True, default=False, help="Skip the per-token-position figures.")
def analyze(
    cache: str | None,
    videos: str | None,
    encoders: str | None,
    preset: str | None,
    encoder_models: tuple[str, ...],
    out: str,
    block_clips: int | None,
    no_per_position: bool,
    **clip_options: Any,
) -> None:
    """`clip_options`: the VideoIICRConfig fields given by flags (frames, stride, clips_per_video,
    size, max_videos, batch_size, device), used with --videos."""
    from cache_schema import prepare_output
    from pipeline.commands.common import cli_errors
    from stages.evaluate import iicr

    if bool(cache) == bool(videos):
        raise click.UsageError("give exactly one of --cache STORE or --videos DIR")
    names = [n.strip() for n in encoders.split(",") if n.strip()] if encoders else None
    spatial = None
    with cli_errors():
        prepare_output(out, "analysis", inputs={"--cache": cache, "--videos": videos})
        if cache:
            from stages.evaluate.spatial import spatial_from_store

            result = iicr.iicr_from_store(
                cache, names, per_position=not no_per_position, block_clips=block_clips
            )
            spatial = spatial_from_store(cache, names, block_clips=block_clips)
        else:
            if not names:
                raise click.UsageError("--videos needs --encoders, e.g. --encoders dino,sam2")
            cfg = VideoIICRConfig(**clip_options, per_position=not no_per_position)
            result = _from_videos(videos, names, preset, _parse_models(encoder_models), cfg)
    out_dir = Path(out)
    (out_dir / "iicr.json").write_text(json.dumps(result, indent=2))
    plot = iicr.bar_plot(result, str(out_dir / "iicr.png"))
    click.echo(iicr.format_table(result))
    if spatial is not None:
        (out_dir / "spatial.json").write_text(json.dumps(spatial, indent=2))
        _spatial_table(spatial)
    click.echo(f"wrote {out_dir / 'iicr.json'}{' and spatial.json' if spatial else ''}, {plot}")


def _spatial_table(spatial: dict) -> None:
    from pipeline.summary import print_table

    def f(x) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    rows = [
        (n, f(r["lds"]), f(r["cds"]), f(r["rmsc"]), f(r["local_cos"])) for n, r in spatial["encoders"].items()
    ]
    click.echo("\niREPA spatial structure (higher LDS/CDS: more local structure)")
    print_table(["encoder", "LDS", "CDS", "RMSC", "cos(d=1)"], rows)


def _from_videos(videos: str, names: list[str], preset: str | None, models: dict[str, str], cfg) -> dict:
    from stages.common.models.encoders import load_encoder
    from stages.common.runtime import resolve_device
    from stages.evaluate import iicr

    dev = resolve_device(cfg.device)
    if preset == "tiny":
        from stages.common.presets import tiny_models

        tiny = tiny_models(names=[n for n in names if n not in models])
        models = {**tiny, **models}
    loaded = {n: load_encoder(n, models.get(n), dev) for n in names}
    result = iicr.iicr_from_videos(videos, loaded, cfg)
    result["encoder_ids"] = {n: enc.model_id for n, enc in loaded.items()}
    return result
