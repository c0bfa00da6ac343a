"""`pipeline evaluate`: FVD (I3D) and content-debiased FVD (VideoMAE-v2) under a pinned protocol."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import click

from pipeline.config import config_options


def _common(func):
    options = [
        click.option(
            "--detector", type=click.Choice(["i3d", "videomae-v2"]), default=None, help="Feature detector."
        ),
        click.option(
            "--detector-weights",
            type=click.Path(dir_okay=False),
            default=None,
            help="Local weights: i3d_torchscript.pt (i3d) or vit_g_hybrid_pt_1200e_ssv2_ft.pth (videomae-v2).",
        ),
        click.option("--frames", type=int, default=None, help="Frames per video (protocol; default 16)."),
        click.option(
            "--frame-stride", type=int, default=None, help="Stride between frames (protocol; default 1)."
        ),
        click.option(
            "--resolution",
            type=int,
            default=None,
            help="Resize + center-crop size first (protocol; default 256).",
        ),
        click.option("--num-videos", type=int, default=None, help="Videos per set (protocol; default 2048)."),
        click.option(
            "--real-subset",
            type=click.Choice(["first", "random"]),
            default=None,
            help="Which videos of a larger set: first in sorted order (StyleGAN-V) or a seeded uniform "
            "sample (protocol; default first).",
        ),
        click.option(
            "--subset-seed", type=int, default=None, help="Seed of --real-subset random (protocol; 0)."
        ),
        click.option("--batch-size", type=int, default=None, help="Videos per detector batch."),
        click.option("--num-workers", type=int, default=None, help="Decoding workers for video folders."),
        click.option("--device", default=None, help="auto | cpu | cuda | cuda:N."),
        click.option(
            "--cache-dir", type=click.Path(file_okay=False), default=None, help="Real-stats cache folder."
        ),
        config_options,
    ]
    for opt in reversed(options):
        func = opt(func)
    return func


def _config(config_file, overrides, **flags: Any):
    from pipeline.commands.common import resolve_stage_config
    from stages.common.fvd import EvalConfig

    return resolve_stage_config(EvalConfig, config_file, overrides, flags)


def _file_out(out: str, overwrite: bool) -> None:
    """A stats or features file is written only where no file is, or with --overwrite."""
    target = Path(out)
    if target.is_dir():
        raise click.ClickException(
            f"--out {out} is a folder; give a file name such as {out.rstrip('/')}/stats.npz"
        )
    if target.exists() and not overwrite:
        raise click.ClickException(f"--out {out} already exists; pass --overwrite to replace it")


def _videos_and_out(func):
    func = click.option("--overwrite", is_flag=True, default=False, help="Replace an existing --out file.")(
        func
    )
    func = click.option("--out", required=True, type=click.Path(), help="File (.npz) to write.")(func)
    return click.option(
        "--videos", required=True, type=click.Path(exists=True), help="Video folder, manifest or .npz/.npy."
    )(func)


@click.group(help="FVD and content-debiased FVD: `stats`, `features`, `fvd`.")
def evaluate() -> None:
    pass


@evaluate.command(help="Feature mean/covariance of a video folder or .npz of videos, with its protocol.")
@_videos_and_out
@_common
def stats(videos: str, out: str, overwrite: bool, config_file, overrides, **flags: Any) -> None:
    from pipeline.commands.common import cli_errors
    from stages.common import fvd

    cfg = _config(config_file, overrides, **flags)
    _file_out(out, overwrite)
    with cli_errors():
        st = fvd.compute_stats(fvd.build_detector(cfg), videos, cfg, cache=False)
    path = st.save(out)
    click.echo(f"{st.n} videos -> {path} (protocol {st.fingerprint[:12]}: {json.dumps(st.protocol)})")
    for w in st.warnings:
        click.echo(f"warning: {w}", err=True)


@evaluate.command(help="Raw detector features [n, D] of a video folder or .npz of videos.")
@_videos_and_out
@_common
def features(videos: str, out: str, overwrite: bool, config_file, overrides, **flags: Any) -> None:
    from pipeline.commands.common import cli_errors
    from stages.common import fvd

    cfg = _config(config_file, overrides, **flags)
    _file_out(out, overwrite)
    with cli_errors():
        det = fvd.build_detector(cfg)
        feats, skipped = fvd.extract_features(det, videos, cfg)
    path = fvd.save_features(out, feats, fvd.make_protocol(det, cfg), videos)
    click.echo(f"features {feats.shape} -> {path}")
    for s in skipped:
        click.echo(f"skipped: {s}", err=True)


@evaluate.command(
    "fvd", help="Frechet distance between --real and --fake (video folder, .npz of videos, or stats)."
)
@click.option("--real", required=True, type=click.Path(exists=True), help="Real videos or their stats file.")
@click.option(
    "--fake", required=True, type=click.Path(exists=True), help="Generated videos or their stats file."
)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder for metrics.json.")
@click.option("--no-cache", is_flag=True, default=False, help="Recompute real stats even if cached.")
@_common
def fvd_cmd(
    real: str, fake: str, out: str | None, no_cache: bool, config_file, overrides, **flags: Any
) -> None:
    from cache_schema import prepare_output
    from pipeline.commands.common import cli_errors
    from stages.common import fvd
    from stages.common.runtime import config_to_dict

    cfg = _config(config_file, overrides, **flags)
    if out:
        with cli_errors():
            prepare_output(out, "evaluation", inputs={"--real": real, "--fake": fake})
    if no_cache:
        cfg.use_cache = False
    with warnings.catch_warnings(), cli_errors():
        warnings.simplefilter("ignore")  # collected into metrics["warnings"] and printed below
        metrics = fvd.compute_fvd(real, fake, cfg)
    metrics["config"] = config_to_dict(cfg)
    rows = [
        (metrics["metric"].upper(), f"{metrics['value']:.3f}"),
        ("detector", metrics["protocol"]["detector"]),
        ("weights sha256", metrics["protocol"]["weights_sha256"][:16]),
        ("frames x stride", f"{metrics['protocol']['frames']} x {metrics['protocol']['frame_stride']}"),
        ("resolution", str(metrics["protocol"]["resolution"])),
        (
            "videos real / fake",
            f"{metrics['n_real']} / {metrics['n_fake']} (protocol {metrics['protocol']['count']})",
        ),
        ("protocol", metrics["fingerprint"][:16]),
    ]
    width = max(len(k) for k, _ in rows)
    click.echo("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    for w in metrics["warnings"]:
        click.echo(f"warning: {w}", err=True)
    if out:
        target = Path(out) / "metrics.json"
        target.write_text(json.dumps(metrics, indent=2))
        click.echo(f"wrote {target}")
