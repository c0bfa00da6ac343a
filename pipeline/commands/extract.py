"""`pipeline extract`: run the VAE and the frozen encoders once, write the zarr feature store.

Choices and defaults come from `stages.common.registry`, `cache_schema.formats` and
`ExtractConfig`, so the help text always shows what a run really uses.
"""

from __future__ import annotations

import click

from cache_schema.formats import TARGET_FORMATS
from pipeline.config import config_options
from pipeline.summary import human_bytes, print_table
from stages.common import registry as R
from stages.extract.config import CODEC_NAMES, EXTRACT_PRESETS, TIME_GRIDS, ExtractConfig

_D = ExtractConfig()
_FORMATS_HELP = "; ".join(f"{name}: {spec.description}" for name, spec in TARGET_FORMATS.items())


@click.command("extract")
@click.option(
    "--data", type=str, help="Video folder (UCF-101 or frame-folder layout) or a CSV/JSONL manifest."
)
@click.option("--out", type=str, help="Output zarr store (a folder or an fsspec URL).")
@click.option(
    "--encoders", type=str, help=f"Comma-separated subset and order of encoders [{','.join(_D.encoders)}]."
)
@click.option(
    "--preset",
    type=click.Choice(list(EXTRACT_PRESETS)),
    help="tiny: tiny random models, 8x64x64 clips; random-full: real architectures with random weights "
    "(GPU throughput checks without downloads).",
)
@click.option("--frames", type=int, help=f"Frames per clip [{_D.frames}].")
@click.option("--stride", type=int, help=f"Frame stride [{_D.stride}].")
@click.option(
    "--clips-per-video", type=int, help=f"Clips per video; every clip is a store row [{_D.clips_per_video}]."
)
@click.option(
    "--clip-placement",
    type=click.Choice(list(R.CLIP_PLACEMENTS)),
    help=f"even: evenly spaced; random: seeded by --seed and the video [{_D.clip_placement}].",
)
@click.option("--hflip", is_flag=True, default=None, help="Add a mirrored copy of every clip (its own row).")
@click.option(
    "--seed", type=int, help=f"Seed of random placement and of the PCA/fidelity samples [{_D.seed}]."
)
@click.option(
    "--size",
    type=str,
    help="Clip size in px: SIDE (square) or HEIGHTxWIDTH, e.g. 480x832; frames are resized, aspect kept, "
    f"to cover it, then center-cropped [{_D.size}].",
)
@click.option(
    "--patch-size", type=int, help=f"The DiT's patch: token grid = latent grid / PATCH [{_D.patch_size}]."
)
@click.option(
    "--vae",
    type=str,
    help=f"VAE hub id or local folder [{R.DEFAULT_VAE['image']}; video: {R.DEFAULT_VAE['video']}].",
)
@click.option(
    "--vae-kind",
    type=click.Choice(list(R.VAE_KINDS)),
    help=f"image: per frame; video: temporal compression [{_D.vae_kind}].",
)
@click.option(
    "--latent-scale",
    type=float,
    help=f"Latent scale [{R.SD_LATENT_SCALE} for image VAEs; a video VAE's own].",
)
@click.option(
    "--base",
    type=str,
    help="A diffusers pipeline (folder or hub id): its text encoder embeds each video's `caption` "
    "(CSV/JSONL manifest column); clips without one are skipped and reported.",
)
@click.option("--text-max-length", type=int, help=f"Prompt tokens, padded/truncated [{_D.text_max_length}].")
@click.option("--dino-model", type=str, help=f"DINOv2 hub id or local folder [{R.ENCODERS['dino'].hub_id}].")
@click.option("--sam2-model", type=str, help=f"SAM2.1 hub id or local folder [{R.ENCODERS['sam2'].hub_id}].")
@click.option(
    "--videomae-model", type=str, help=f"VideoMAE hub id or local folder [{R.ENCODERS['videomae'].hub_id}]."
)
@click.option(
    "--hog-model",
    type=str,
    help=f"HOG target: '{R.ENCODERS['hog'].hub_id}' (built in, no weights) or a HogFlow folder (random-hog).",
)
@click.option(
    "--dino-size", type=int, help="DINOv2 input px [DiT grid side x its patch: 224 for 256 px clips]."
)
@click.option(
    "--target-format", type=click.Choice(list(TARGET_FORMATS)), help=f"{_FORMATS_HELP} [{_D.target_format}]."
)
@click.option(
    "--time-grid",
    type=click.Choice(list(TIME_GRIDS)),
    help="native: an encoder with a coarser time grid (VideoMAE) is stored on it and interpolated on the "
    f"trainer's device (exact); dit: everything on the DiT grid [{_D.time_grid}].",
)
@click.option(
    "--pca-dims",
    type=str,
    help="PCA dims for every encoder (N) or per encoder (dino=256,videomae=256) [none].",
)
@click.option("--pca-fit-clips", type=int, help=f"Clips the PCA bases are fitted on [{_D.pca_fit_clips}].")
@click.option(
    "--fidelity-clips",
    type=int,
    help=f"Held-out clips the target fidelity is measured on [{_D.fidelity_clips}].",
)
@click.option(
    "--block-size", type=int, help=f"Clips per block = per zarr shard = unit of resume [{_D.block_size}]."
)
@click.option("--codec", type=click.Choice(list(CODEC_NAMES)), help=f"Compression [{_D.codec}].")
@click.option(
    "--disk-budget",
    type=str,
    help="Refuse plans whose store + shards exceed SIZE (500G, 1.5T, 800MiB, 10GB; G = GiB like df -h).",
)
@click.option(
    "--train-rate", type=float, help="Clips/s a trainer reads, for the dry run's bandwidth [per model size]."
)
@click.option("--batch-size", type=int, help=f"Clips per model batch [{_D.batch_size}].")
@click.option("--num-workers", type=int, help=f"Decoding worker processes [{_D.num_workers}].")
@click.option("--device", type=str, help=f"{R.DEVICE_HELP} [{_D.device}].")
@click.option(
    "--dry-run",
    is_flag=True,
    default=None,
    help="Measure one clip, print sizes of every format; write nothing.",
)
@click.option("--overwrite", is_flag=True, default=None, help="Replace a store made with a different config.")
@config_options
def extract(config_file, overrides, **flags):
    """Decode videos, run the VAE and frozen encoders, resample to the DiT grid, store compact targets.

    Rerunning the same command resumes a killed run; under torchrun the ranks split the blocks.
    """
    from pipeline.commands.common import cli_errors, resolve_stage_config
    from stages.common.runtime import dump_config, env_rank
    from stages.extract.config import preset_values
    from stages.extract.runner import BudgetExceeded, run_extract

    if flags.get("encoders") is not None:
        flags["encoders"] = [e.strip() for e in flags["encoders"].split(",") if e.strip()]
    base = preset_values(flags.get("preset"))
    cfg = resolve_stage_config(
        ExtractConfig, config_file, overrides, flags, base=base
    )  # usage errors name the key
    cfg = _base_vae(cfg, flags, config_file, overrides)
    _check_sizes(cfg)
    with cli_errors(cfg.out):
        try:
            result = run_extract(cfg)
        except BudgetExceeded as exc:
            if exc.table is not None:  # show the projections the refusal is based on
                _print_sizes(exc.table)
            raise
    _print_layout(result)
    if result.dry_run:
        if result.sizes is not None:  # rank 0 measured (under torchrun the others did not)
            _print_sizes(result.sizes)
        click.echo("dry run: nothing written")
        return
    if "://" not in cfg.out and env_rank()[0] == 0:  # one writer: torchrun ranks would race on the file
        with cli_errors(cfg.out):
            dump_config(cfg, f"{cfg.out.rstrip('/')}/extract_config.yaml")
    _print_outcome(cfg, result)


def _base_vae(cfg, flags: dict, config_file, overrides) -> ExtractConfig:
    """`--base PIPELINE` without a VAE named anywhere: the latents come from the base's own VAE
    (a fine-tune trains on what its model was trained on), so --vae PIPELINE --vae-kind wan."""
    named = flags.get("vae") is not None or flags.get("vae_kind") is not None or config_file
    named = named or any(
        o.split("=", 1)[0].strip().replace("-", "_") in ("vae", "vae_kind") for o in overrides
    )
    if not cfg.base or named:
        return cfg
    import dataclasses

    click.echo(f"--base: latents with its own VAE (--vae {cfg.base} --vae-kind wan)")
    return dataclasses.replace(cfg, vae=cfg.base, vae_kind="wan")


def _check_sizes(cfg) -> None:
    """Sizes and PCA dims against the models' config files, before any model loads (exit 2)."""
    from pipeline.commands.common import cli_errors
    from pipeline.config import ConfigError
    from stages.extract.models import model_sources
    from stages.extract.preflight import check_sizes

    with cli_errors():
        sources = model_sources(cfg)
    try:
        check_sizes(cfg, sources)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _print_layout(result) -> None:
    click.echo(
        f"clips: {result.num_clips}   blocks: {result.blocks_total}   "
        f"grid (T,H,W): {tuple(result.grid)}   latent: {tuple(result.latent_shape)}"
    )
    rows = [
        (e.name, e.dim, e.format, e.stored_dim, e.time_frames, "yes" if e.pca else "no")
        for e in result.encoders
    ]
    print_table(["encoder", "dim", "format", "stored dim", "time frames", "pca"], rows)
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} video(s):")
        for s in result.skipped[:10]:
            click.echo(f"  {s['path']}: {s['reason']}")
        if len(result.skipped) > 10:
            click.echo(f"  ... and {len(result.skipped) - 10} more (see report.json)")


def _print_sizes(table) -> None:
    """Per-format sizes and, per trainer rate, the shard read bandwidth it needs."""
    rows = [
        (
            r["format"],
            human_bytes(r["bytes_per_clip"]),
            human_bytes(r["store_bytes"]),
            human_bytes(r["shard_bytes"]),
            f"{r['vs_float16']:.2f}",
        )
        for r in table.rows()
    ]
    click.echo(f"sizes for {table.current.clips} clips (measured on store row {table.measured_clip}):")
    print_table(["format", "bytes/clip", "store", "shards (+latents-only)", "vs float16"], rows)
    if table.text_per_clip is not None:
        store, shard = table.text_per_clip
        click.echo(
            f"prompt embeddings (included above): {human_bytes(store)}/clip in the store, "
            f"{human_bytes(shard)}/clip in each shard set (measured on that clip's caption)"
        )
    if not table.rates:  # a refused real run: its size check counts no trainer rates
        return
    names = [r["format"] for r in table.rows()]
    rate_rows = [
        (label, f"{rate:.1f}", *(f"{r['read_gbps'][label]:.3f}" for r in table.rows()))
        for label, rate in table.rates.items()
    ]
    grid = "x".join(str(v) for v in table.latent_shape)
    what = (
        "fine-tuning each Wan 2.1 size in full (a LoRA step is ~1/3 cheaper)"
        if table.trainer == "wan"
        else ""
    )
    click.echo(
        f"shard read bandwidth a trainer needs (GB/s), per H100 at 40% MFU {what or 'training each model'} on "
        f"this store's {grid} latents (FLOPs counted at that size; --train-rate sets a rate):"
    )
    print_table(["trainer", "clips/s", *names], rate_rows)


def _print_outcome(cfg, result) -> None:
    t = result.timings
    if result.invalid_clips:
        click.echo(
            f"{len(result.invalid_clips)} clip(s) failed to decode and are marked invalid (see report.json)"
        )
    if result.invalid_clips or result.skipped:
        click.echo(f"report: {cfg.out.rstrip('/')}/report.json")
    for problem in result.redone:
        click.echo(f"warning: {problem}: block redone", err=True)
    if result.blocks_computed:
        click.echo(
            f"done: {result.blocks_done}/{result.blocks_total} blocks, {t['total']:.1f}s "
            f"(vae {t.get('vae', 0):.1f}s, write {t.get('write', 0):.1f}s, decode wait {t.get('decode_wait', 0):.1f}s)"
        )
    else:
        checked = "checksums verified" if result.verifiable else "written before checksums: not verifiable"
        click.echo(f"store complete: {result.blocks_total} blocks already done ({checked}), nothing to do")
    if result.fidelity:
        rows = []
        for name, f in result.fidelity.items():
            ev = f.get("explained_variance")
            rows.append(
                (
                    name,
                    f"{f['mean']:.5f}",
                    f"{f['p1']:.5f}",
                    "-" if ev is None else f"{ev:.4f}",
                    f["clips"],
                    "yes" if f.get("held_out") else "no",
                )
            )
        click.echo("target fidelity (cosine of stored vs exact targets, per token):")
        print_table(["encoder", "mean", "p1", "pca explained var", "clips", "held out"], rows)
    click.echo(f"store: {cfg.out}")
