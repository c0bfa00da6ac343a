"""`pipeline data ...`: dataset utilities (the built-in synthetic set)."""

from __future__ import annotations

import time
from collections import Counter

import click


@click.group(name="data")
def data() -> None:
    """Datasets: generate the built-in synthetic set (`data synth`)."""


@data.command(name="synth")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--videos", default=24, show_default=True, type=click.IntRange(min=1), help="Number of videos.")
@click.option(
    "--classes", default=4, show_default=True, type=click.IntRange(min=1), help="Number of motion classes."
)
@click.option("--frames", default=24, show_default=True, type=click.IntRange(min=1), help="Frames per video.")
@click.option("--size", default=64, show_default=True, type=click.IntRange(min=16), help="Frame size (even).")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same pixels).")
@click.option("--fps", default=8, show_default=True, type=click.IntRange(min=1), help="Frames per second.")
def synth(out: str, videos: int, classes: int, frames: int, size: int, seed: int, fps: int) -> None:
    """Write the synthetic dataset: H.264 mp4 files in class subfolders (UCF-101 layout),
    shapes moving with class-dependent motion over textured backgrounds."""
    from pathlib import Path

    from stages.common.synth import make_synthetic

    if size % 2:
        raise click.BadParameter(f"must be even for H.264 yuv420p, got {size}", param_hint="--size")
    start = time.perf_counter()
    try:
        info = make_synthetic(
            out, videos=videos, classes=classes, frames=frames, size=size, seed=seed, fps=fps
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    elapsed = time.perf_counter() - start
    total_bytes = sum(Path(p).stat().st_size for p in info.paths)
    counts = Counter(info.labels)
    click.echo(f"synthetic dataset: {info.root}")
    click.echo(f"  videos  {len(info.paths)} x {frames} frames, {size}x{size}, {fps} fps, H.264 mp4")
    click.echo(f"  seed    {seed}")
    click.echo(f"  size    {total_bytes / 1e6:.2f} MB written in {elapsed:.1f} s")
    click.echo(f"  classes {classes}:")
    for k, name in enumerate(info.class_names):
        click.echo(f"    {k:>3}  {name:<28} {counts.get(k, 0)} videos")
