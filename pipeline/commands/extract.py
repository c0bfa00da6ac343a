"""`pipeline extract`: run the VAE and the frozen encoders once, write the zarr feature store."""

from __future__ import annotations

import click

from pipeline.config import config_options
from pipeline.summary import human_bytes, print_table


@click.command("extract")
@click.option(
    "--data", type=str, help="Video folder (UCF-101 or frame-folder layout) or a CSV/JSONL manifest."
)
@click.option("--out", type=str, help="Output zarr store (a folder or an fsspec URL).")
@click.option("--encoders", type=str, help="Comma-separated subset and order of dino,sam2,videomae.")
@click.option(
    "--preset",
    type=click.Choice(["tiny", "random-full"]),
    help="tiny: tiny random models, 8x64x64 clips; random-full: real architectures with random weights "
    "(GPU throughput checks without downloads).",
)
@click.option("--frames", type=int, help="Frames per clip [16].")
@click.option("--stride", type=int, help="Frame stride [3].")
@click.option("--clips-per-video", type=int, help="Clips per video, evenly spaced [1].")
@click.option("--size", type=int, help="Resize shorter side then center-crop to SIZE [256].")
@click.option("--vae", type=str, help="VAE hub id or local folder [stabilityai/sd-vae-ft-ema].")
@click.option(
    "--vae-kind",
    type=click.Choice(["image", "video"]),
    help="image: frame by frame; video: temporal compression.",
)
@click.option(
    "--latent-scale", type=float, help="Latent scale factor [0.18215 for the SD VAE; a video VAE's own]."
)
@click.option("--dino-model", type=str, help="DINOv2 hub id or local folder [facebook/dinov2-base].")
@click.option(
    "--sam2-model", type=str, help="SAM2.1 hub id or local folder [facebook/sam2.1-hiera-base-plus]."
)
@click.option("--videomae-model", type=str, help="VideoMAE hub id or local folder [MCG-NJU/videomae-base].")
@click.option("--block-size", type=int, help="Clips per block = per zarr shard = unit of resume [16].")
@click.option("--codec", type=click.Choice(["zstd", "blosc", "none"]), help="Compression [zstd].")
@click.option("--batch-size", type=int, help="Clips per model batch [4].")
@click.option("--num-workers", type=int, help="Decoding worker processes [4].")
@click.option("--device", type=str, help="auto | cpu | cuda | cuda:N [auto].")
@click.option(
    "--dry-run", is_flag=True, default=None, help="Print clips, projected size and layout; write nothing."
)
@click.option("--overwrite", is_flag=True, default=None, help="Replace a store made with a different config.")
@config_options
def extract(config_file, overrides, **flags):
    """Decode videos, run the VAE and frozen encoders, resample to the DiT grid, fuse, write zarr.

    Rerunning the same command resumes a killed run; under torchrun the ranks split the blocks.
    """
    from pipeline.config import resolve_config, save_config
    from stages.extract.config import ExtractConfig, preset_values

    if flags.get("encoders") is not None:
        flags["encoders"] = [e.strip() for e in flags["encoders"].split(",") if e.strip()]
    cfg = resolve_config(
        ExtractConfig, config_file, overrides, flags, base=preset_values(flags.get("preset"))
    )

    from stages.common.encoders import WeightsNotFoundError
    from stages.extract.runner import ExtractError, run_extract

    try:
        result = run_extract(cfg)
    except (ExtractError, WeightsNotFoundError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    rows = [(e["name"], e["dim"], f"[{e['start']}:{e['stop']}]") for e in result.layout["encoders"]]
    click.echo(
        f"clips: {result.num_clips}   blocks: {result.blocks_total}   "
        f"grid (T,H,W): {tuple(result.layout['grid'])}   latent: {tuple(result.layout['latent_shape'])}"
    )
    print_table(["encoder", "dim", "target channels"], rows)
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} video(s):")
        for s in result.skipped[:10]:
            click.echo(f"  {s['path']}: {s['reason']}")
        if len(result.skipped) > 10:
            click.echo(f"  ... and {len(result.skipped) - 10} more (see report.json)")
    if result.dry_run:
        click.echo(
            f"dry run: {human_bytes(result.timings['bytes_per_clip'])} per clip with --codec {cfg.codec} "
            f"(measured on one clip), projected store size {human_bytes(result.timings['projected_bytes'])}; "
            "nothing written"
        )
        return
    if result.invalid_clips:
        click.echo(
            f"{len(result.invalid_clips)} clip(s) failed to decode and are marked invalid (see report.json)"
        )
    save_config(cfg, _config_path(cfg.out))
    t = result.timings
    if result.invalid_clips or result.skipped:
        click.echo(f"report: {cfg.out.rstrip('/')}/report.json")
    if result.blocks_computed:
        click.echo(
            f"done: {result.blocks_done}/{result.blocks_total} blocks, {t['total']:.1f}s "
            f"(vae {t.get('vae', 0):.1f}s, write {t.get('write', 0):.1f}s, decode wait {t.get('decode_wait', 0):.1f}s)"
        )
    else:
        click.echo(f"store complete: {result.blocks_total} blocks already done, nothing to do")
    click.echo(f"store: {cfg.out}")


def _config_path(out: str) -> str:
    return f"{out.rstrip('/')}/extract_config.yaml" if "://" not in out else "extract_config.yaml"
