"""`pipeline info PATH`: one screen about a feature store, a shard folder or a training run."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cache_schema.layout import CacheLayout


@click.command("info")
@click.argument("path", type=str)
@click.option(
    "--verify",
    is_flag=True,
    help="Re-hash every shard (shard folders) or re-read every finished block against its checksums "
    "(stores), and name corrupt ones.",
)
def info(path: str, verify: bool) -> None:
    """Summarise PATH: a feature store, a shard folder or a training run, with the target
    format and the measured fidelity of its targets."""
    from cache_schema import kind_of
    from pipeline.commands.common import cli_errors

    with cli_errors():
        kind = kind_of(path)
        if kind == "store":
            _store(path, verify)
        elif kind == "shards":
            _shards(path, verify)
        elif kind == "run":
            _run(path)
        elif kind == "zarr":
            raise click.ClickException(
                f"{path} is a zarr group but not an align4gen feature store (it has no schema_version "
                "attribute); `pipeline extract` writes the stores this command describes"
            )
        else:
            raise click.ClickException(f"{path} is not a feature store, a shard folder or a run directory")


def _layout_lines(layout: CacheLayout) -> None:
    from pipeline.summary import print_table

    click.echo(f"fingerprint  {layout.fingerprint[:16]}   schema v{layout.schema_version}")
    click.echo(f"grid (T,H,W) {layout.grid}   latent [C,T,h,w] {layout.latent_shape}")
    names = layout.class_names
    if names:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        click.echo(f"classes      {len(names)}: {shown}")
    else:
        click.echo("classes      unlabelled")
    clips = (layout.spec or {}).get("clips", {})
    if clips:
        variety = f"{clips.get('clips_per_video', 1)} per video ({clips.get('placement', 'even')})"
        flip = ", + mirrored copies" if clips.get("hflip") else ""
        click.echo(
            f"clips        {clips.get('frames')} frames, stride {clips.get('stride')}, "
            f"{'x'.join(map(str, layout.clip_size or ('?',)))}px (HxW); "
            f"{variety}{flip}"
        )
    vae = layout.vae_spec
    if vae:
        click.echo(f"vae          {vae.get('id')} ({vae.get('kind', 'image')}, scale {vae.get('scale')})")
    if layout.text is not None:
        t = layout.text
        click.echo(
            f"text         {t.encoder}: {t.max_length} tokens x {t.dim} ({t.dtype}) per clip, empty prompt once"
        )
    fidelity, pca = layout.fidelity, layout.pca_derived
    rows = []
    for e in layout.encoders:
        fid = fidelity.get(e.name, {})
        stored = f"pca {e.stored_dim}" if e.pca else ""
        rows.append(
            (
                e.name,
                e.id or "",
                e.dim,
                e.format,
                f"T={e.time_frames}" + (f", {stored}" if stored else ""),
                _num(fid.get("mean")),
                _num(fid.get("p1")),
                _num((pca.get(e.name) or {}).get("explained_variance_ratio")),
            )
        )
    print_table(["encoder", "model", "dim", "format", "stored", "cos mean", "cos p1", "pca var"], rows)


def _num(value) -> str:
    return "-" if value is None else f"{value:.5f}"


def _store(path: str, verify: bool) -> None:
    from cache_schema import CacheError, open_group, store_layout, validate_store
    from cache_schema import constants as C
    from cache_schema.integrity import StoreVerifier
    from pipeline.summary import human_bytes

    group = open_group(path)
    click.echo(f"zarr feature store: {path}")
    errors = validate_store(path, require_complete=False)
    if errors and "schema" in errors[0]:
        raise click.ClickException(errors[0])
    layout = store_layout(group, path)
    _layout_lines(layout)
    try:
        verifier = StoreVerifier(group, path)  # every per-clip array's metadata, or one clear error
        done, valid = group[C.BLOCK_DONE][:], verifier.arrays[C.VALID][:]
    except CacheError as exc:
        raise click.ClickException(
            f"{exc}: the store cannot be read; extract it again (--overwrite)"
        ) from None
    click.echo(
        f"clips        {layout.num_clips} ({int(valid.sum())} valid)   "
        f"blocks {int(done.sum())}/{layout.num_blocks} done"
    )
    arrays = [a for name, a in verifier.arrays.items() if name not in (*C.META_ARRAYS, C.VALID)]
    stored = sum(a.nbytes_stored() for a in arrays)
    click.echo(
        f"size         {human_bytes(stored)} on disk, {human_bytes(sum(a.nbytes for a in arrays))} raw"
    )
    report = Path(path) / C.REPORT_FILE
    if report.is_file():
        data = json.loads(report.read_text())
        click.echo(
            f"report       {len(data.get('skipped', []))} video(s) skipped, "
            f"{len(data.get('invalid_clips', []))} clip(s) invalid"
        )
    errors += _verify_store(verifier, done, verify)
    click.echo("valid        yes" if not errors else "problems:\n  " + "\n  ".join(errors))
    if errors and verify:
        raise SystemExit(1)


def _verify_store(verifier, done, verify: bool) -> list[str]:
    """The checksums line; with --verify, every finished block re-read and checked (its problems)."""
    if not verifier.verifiable:
        click.echo("checksums    none: written before per-clip checksums existed, not verifiable")
        return []
    if not verify:
        click.echo("checksums    crc32 per clip and array (--verify re-reads every finished block)")
        return []
    finished = [int(b) for b in done.nonzero()[0]]
    check = verifier.blocks(finished)
    if not check.problems:
        click.echo(f"verified     all {len(finished)} finished blocks match their checksums")
        return []
    return [f"{p}; rerun the same `pipeline extract` command to redo the block" for p in check.problems]


def _shards(path: str, verify: bool) -> None:
    from cache_schema import read_shard_layout, validate_shards
    from pipeline.summary import human_bytes

    errors = validate_shards(path, verify_hashes=verify, progress=verify)
    if errors and "schema" in errors[0]:
        raise click.ClickException(errors[0])
    index = read_shard_layout(path)
    click.echo(f"WebDataset shards: {path}")
    _layout_lines(index)
    total = sum(s.bytes for s in index.shards)
    n = index.num_samples
    click.echo(
        f"samples      {n} in {len(index.shards)} shards ({human_bytes(total)}, {human_bytes(total / max(1, n))}/sample)"
    )
    order = index.order or {}
    click.echo(f"order        {order.get('kind', 'store order')} (seed {order.get('seed', '-')})")
    lean = index.latents_only if isinstance(index.latents_only, dict) else None
    if lean:
        click.echo(
            f"latents-only {lean['dir']}/: {human_bytes(lean['bytes'])} ({lean['bytes'] / max(1, total):.1%} of the bytes)"
        )
    if errors:
        click.echo("problems:\n  " + "\n  ".join(errors))
        raise SystemExit(1)
    click.echo(
        "verified     all shards match their sha256"
        if verify
        else "valid        yes (sizes; --verify re-hashes)"
    )


def _run(path: str) -> None:
    from cache_schema import RunDir

    run = RunDir(path)
    cfg = run.read_config()
    click.echo(f"training run: {path}")
    for key in ("model", "shards", "steps", "batch_size", "align_lambda", "align_schedule", "align_until",
                "encoders", "projector", "projector_kernel", "target_norm", "align_depth"):  # fmt: skip
        if key in cfg:
            click.echo(f"{key:<17}{cfg[key]}")
    vae = cfg.get("vae_spec") or {}
    if vae:
        click.echo(f"{'vae':<17}{vae.get('id')} ({vae.get('kind', 'image')}, scale {vae.get('scale')})")
    rows = run.read_log()
    if rows:
        last = rows[-1]
        shown = {k: v for k, v in last.items() if isinstance(v, (int, float))}
        click.echo("last log       " + "  ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(shown.items())[:8]))  # fmt: skip
        skipped = (last.get("skipped") or {}).get("count", 0)
        if skipped:
            click.echo(f"{'skipped':<17}{skipped} corrupt sample(s) (keys in log.jsonl)")
    latest = run.latest_checkpoint()
    click.echo(f"{'checkpoint':<17}{latest.name if latest else 'none yet'} ({len(run.step_dirs())} kept)")
