"""`pipeline pack`: zarr feature store -> WebDataset tar shards (in parallel with dask)."""

from __future__ import annotations

import click

from pipeline.config import config_options


@click.command("pack")
@click.argument("cache", type=str)
@click.option(
    "--out", type=str, help="Output folder (or fsspec URL) for shard-000000.tar, ... and index.json."
)
@click.option("--samples-per-shard", type=int, help="Clips per tar shard [256].")
@click.option(
    "--scheduler", type=str, help="threads | processes | synchronous | dask.distributed address [threads]."
)
@click.option("--workers", type=int, help="Local dask workers [all cores].")
@click.option("--overwrite", is_flag=True, default=None, help="Replace existing shards in --out.")
@config_options
def pack(cache, config_file, overrides, **flags):
    """Write one WebDataset sample per valid clip of CACHE, plus index.json (fingerprint, counts, sha256)."""
    from pipeline.config import resolve_config, save_config
    from pipeline.summary import human_bytes, print_table
    from stages.pack.packer import PackConfig, PackError, run_pack

    cfg = resolve_config(PackConfig, config_file, overrides, {**flags, "cache": cache})
    try:
        index = run_pack(cfg)
    except PackError as exc:
        raise click.ClickException(str(exc)) from None
    if "://" not in cfg.out:
        save_config(cfg, f"{cfg.out}/pack_config.yaml")
    rows = [
        (s["name"], s["samples"], human_bytes(s["bytes"]), s["sha256"][:12]) for s in index["shards"][:12]
    ]
    print_table(["shard", "samples", "size", "sha256"], rows)
    if len(index["shards"]) > 12:
        click.echo(f"... {len(index['shards']) - 12} more shards")
    total = sum(s["bytes"] for s in index["shards"])
    click.echo(
        f"{index['num_samples']} samples in {len(index['shards'])} shards ({human_bytes(total)}) -> {cfg.out}"
    )
