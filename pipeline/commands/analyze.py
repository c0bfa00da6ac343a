"""`pipeline analyze`: IICR per encoder over a feature store, or straight from videos."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _parse_models(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"expected NAME=ID_OR_PATH, got {item!r}", param_hint="--encoder-model")
        name, value = item.split("=", 1)
        out[name.strip()] = value.strip()
    return out


@click.command(
    help="IICR (intra/inter consistency ratio) per encoder, and from a cache iREPA's spatial metrics "
    "(LDS, CDS, RMSC); writes iicr.json, spatial.json and a bar plot."
)
@click.option(
    "--cache",
    type=click.Path(exists=True),
    default=None,
    help="Feature store (zarr) from `pipeline extract`.",
)
@click.option(
    "--videos", type=click.Path(exists=True), default=None, help="Video folder: run the encoders directly."
)
@click.option("--encoders", default=None, help="Comma list (store: subset, default all; videos: required).")
@click.option(
    "--preset", type=click.Choice(["tiny"]), default=None, help="Use the tiny random-initialised encoders."
)
@click.option(
    "--encoder-model", "encoder_models", multiple=True, metavar="NAME=ID_OR_PATH", help="Weights per encoder."
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--frames", type=int, default=16, show_default=True, help="Frames per clip (--videos).")
@click.option("--stride", type=int, default=3, show_default=True, help="Frame stride (--videos).")
@click.option("--clips-per-video", type=int, default=2, show_default=True, help="Clips per video (--videos).")
@click.option("--size", type=int, default=256, show_default=True, help="Clip size in pixels (--videos).")
@click.option("--max-videos", type=int, default=None, help="Analyse at most this many videos (--videos).")
@click.option(
    "--batch-size", type=int, default=4, show_default=True, help="Clips per encoder batch (--videos)."
)
@click.option(
    "--block-clips", type=int, default=None, help="Clips per dask block (--cache; default: zarr chunk)."
)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda.")
@click.option("--no-per-position", is_flag=True, default=False, help="Skip the per-token-position figures.")
def analyze(
    cache: str | None,
    videos: str | None,
    encoders: str | None,
    preset: str | None,
    encoder_models: tuple[str, ...],
    out: str,
    frames: int,
    stride: int,
    clips_per_video: int,
    size: int,
    max_videos: int | None,
    batch_size: int,
    block_clips: int | None,
    device: str,
    no_per_position: bool,
) -> None:
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
            cfg = iicr.VideoIICRConfig(
                frames=frames,
                stride=stride,
                clips_per_video=clips_per_video,
                size=size,
                batch_size=batch_size,
                max_videos=max_videos,
                device=device,
                per_position=not no_per_position,
            )
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
    from stages.common.encoders import load_encoder
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
