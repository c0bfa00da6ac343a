"""`pipeline info PATH`: one screen about a zarr store, a shard folder or a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("info")
@click.argument("path", type=str)
@click.option("--verify", is_flag=True, help="Re-hash every shard (shard folders) and name corrupt ones.")
def info(path: str, verify: bool) -> None:
    """Summarise PATH: a feature store, a shard folder or a training run."""
    from cache_schema import kind_of

    kind = kind_of(path)
    if kind == "store":
        _store(path)
    elif kind == "shards":
        _shards(path, verify)
    elif kind == "run":
        _run(Path(path))
    else:
        raise click.ClickException(f"{path} is not a feature store, a shard folder or a run directory")


def _layout_lines(layout: dict) -> None:
    from pipeline.summary import print_table

    click.echo(f"fingerprint  {layout['fingerprint'][:16]}   schema v{layout['schema_version']}")
    click.echo(f"grid (T,H,W) {tuple(layout['grid'])}   latent [C,T,h,w] {tuple(layout['latent_shape'])}")
    names = layout.get("class_names")
    if names:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        click.echo(f"classes      {len(names)}: {shown}")
    else:
        click.echo("classes      unlabelled")
    spec = layout.get("spec", {})
    clips = spec.get("clips", {})
    if clips:
        click.echo(
            f"clips        {clips.get('frames')} frames, stride {clips.get('stride')}, {clips.get('size')}px"
        )
    vae = spec.get("vae", {})
    if vae:
        click.echo(f"vae          {vae.get('id')} (scale {vae.get('scale')})")
    rows = [(e["name"], e.get("id", ""), e["dim"], f"[{e['start']}:{e['stop']}]") for e in layout["encoders"]]
    print_table(["encoder", "model", "dim", "channels"], rows)


def _store(path: str) -> None:
    from cache_schema import constants as C
    from cache_schema import open_group, validate_store
    from pipeline.summary import human_bytes

    group = open_group(path)
    attrs = dict(group.attrs)
    click.echo(f"zarr feature store: {path}")
    _layout_lines(attrs)
    done = group[C.BLOCK_DONE][:]
    valid = group[C.VALID][:]
    click.echo(
        f"clips        {attrs['num_clips']} ({int(valid.sum())} valid)   blocks {int(done.sum())}/{attrs['num_blocks']} done"
    )
    lat, tgt = group[C.LATENTS], group[C.TARGETS]
    stored = lat.nbytes_stored() + tgt.nbytes_stored()
    click.echo(f"size         {human_bytes(stored)} on disk, {human_bytes(lat.nbytes + tgt.nbytes)} raw")
    report = Path(path) / C.REPORT_FILE
    if report.is_file():
        data = json.loads(report.read_text())
        click.echo(
            f"report       {len(data.get('skipped', []))} video(s) skipped, "
            f"{len(data.get('invalid_clips', []))} clip(s) invalid"
        )
    errors = validate_store(path, require_complete=False)
    click.echo("valid        yes" if not errors else "problems:\n  " + "\n  ".join(errors))


def _shards(path: str, verify: bool) -> None:
    from cache_schema import read_index, validate_shards
    from pipeline.summary import human_bytes

    index = read_index(path)
    click.echo(f"WebDataset shards: {path}")
    _layout_lines(index)
    total = sum(s["bytes"] for s in index["shards"])
    click.echo(f"samples      {index['num_samples']} in {len(index['shards'])} shards ({human_bytes(total)})")
    errors = validate_shards(path, verify_hashes=verify, progress=verify)
    if errors:
        click.echo("problems:\n  " + "\n  ".join(errors))
        raise SystemExit(1)
    click.echo(
        "verified     all shards match their sha256"
        if verify
        else "valid        yes (sizes; --verify re-hashes)"
    )


def _run(path: Path) -> None:
    import yaml

    cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
    click.echo(f"training run: {path}")
    for key in ("model", "shards", "steps", "batch_size", "align_lambda", "encoders", "align_depth"):
        if key in cfg:
            click.echo(f"{key:<13}{cfg[key]}")
    log = path / "log.jsonl"
    if log.is_file():
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        if lines:
            last = lines[-1]
            shown = {k: v for k, v in last.items() if isinstance(v, (int, float))}
            click.echo(
                "last log     "
                + "  ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(shown.items())[:8]
                )
            )
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        click.echo(f"checkpoint   {latest.read_text().strip()}")
