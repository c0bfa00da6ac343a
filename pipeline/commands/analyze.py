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


@click.command(help="IICR (intra/inter consistency ratio) per encoder; writes iicr.json and a bar plot.")
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
    from stages.evaluate import iicr

    if bool(cache) == bool(videos):
        raise click.UsageError("give exactly one of --cache STORE or --videos DIR")
    names = [n.strip() for n in encoders.split(",") if n.strip()] if encoders else None
    try:
        if cache:
            result = iicr.iicr_from_store(
                cache, names, per_position=not no_per_position, block_clips=block_clips
            )
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
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "iicr.json").write_text(json.dumps(result, indent=2))
    plot = iicr.bar_plot(result, str(out_dir / "iicr.png"))
    click.echo(iicr.format_table(result))
    click.echo(f"wrote {out_dir / 'iicr.json'} and {plot}")


def _from_videos(videos: str, names: list[str], preset: str | None, models: dict[str, str], cfg) -> dict:
    import torch

    from stages.common.encoders import load_encoder
    from stages.evaluate import iicr

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if preset == "tiny":
        from stages.common.presets import tiny_models

        tiny = tiny_models(names=[n for n in names if n not in models])
        models = {**tiny, **models}
    loaded = {n: load_encoder(n, models.get(n), dev) for n in names}
    result = iicr.iicr_from_videos(videos, loaded, cfg)
    result["encoder_ids"] = {n: enc.model_id for n, enc in loaded.items()}
    return result
