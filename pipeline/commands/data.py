"""`pipeline data ...`: dataset utilities (the built-in synthetic set)."""

from __future__ import annotations

import time
from collections import Counter

import click

from stages.common.synth import BACKGROUNDS


@click.group(name="data")
def data() -> None:
    """Datasets: the built-in synthetic set (`data synth`), UCF-101 split manifests (`data ucf-split`)."""


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
@click.option(
    "--background",
    default=BACKGROUNDS[0],
    show_default=True,
    type=click.Choice(BACKGROUNDS),
    help="textured: noise fields or stripes; flat: a two-colour gradient (the demo's).",
)
@click.option(
    "--overwrite", is_flag=True, default=False, help="Replace a synthetic set in --out (its own files only)."
)
def synth(
    out: str,
    videos: int,
    classes: int,
    frames: int,
    size: int,
    seed: int,
    fps: int,
    background: str,
    overwrite: bool,
) -> None:
    """Write the synthetic dataset: H.264 mp4 files in class subfolders (UCF-101 layout),
    shapes moving with class-dependent motion over textured or flat backgrounds."""
    from pathlib import Path

    from stages.common.synth import make_synthetic

    if size % 2:
        raise click.BadParameter(f"must be even for H.264 yuv420p, got {size}", param_hint="--size")
    start = time.perf_counter()
    try:
        info = make_synthetic(
            out,
            videos=videos,
            classes=classes,
            frames=frames,
            size=size,
            seed=seed,
            fps=fps,
            background=background,
            overwrite=overwrite,
        )
    except ValueError as exc:  # includes a refused --out (cache_schema.OutputError)
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


@data.command(name="ucf-split")
@click.option("--split", "split_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="trainlist01.txt / testlist01.txt from UCF-101's official splits.")  # fmt: skip
@click.option(
    "--class-ind", required=True, type=click.Path(exists=True, dir_okay=False), help="classInd.txt."
)
@click.option(
    "--root", required=True, type=click.Path(exists=True, file_okay=False), help="The UCF-101 folder."
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CSV manifest to write.")
def ucf_split(split_file: str, class_ind: str, root: str, out: str) -> None:
    """Write a CSV manifest (path,label with class names) for one official UCF-101 split, to give
    `pipeline extract --data MANIFEST.csv` exactly the split's videos."""
    from pathlib import Path

    from stages.common.video import manifest_from_ucf_split

    if Path(out).exists():
        raise click.ClickException(f"--out {out} already exists; choose another file name")
    try:
        path = manifest_from_ucf_split(split_file, class_ind, root, out)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    rows = path.read_text().count("\n") - 1
    click.echo(f"{rows} videos -> {path}")
