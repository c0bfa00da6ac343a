"""`pipeline pack`: zarr feature store -> WebDataset tar shards (in parallel with dask)."""

from __future__ import annotations

from functools import partial

import click

from pipeline.commands.common import help_default
from pipeline.config import config_options
from stages.pack.packer import PackConfig

_d = partial(help_default, PackConfig)


@click.command("pack")
@click.argument("cache", type=str)
@click.option(
    "--out", type=str, help="Output folder (or fsspec URL) for shard-000000.tar, ... and index.json."
)
@click.option("--samples-per-shard", type=int, help=f"Clips per tar shard [{_d('samples_per_shard')}].")
@click.option(
    "--seed", type=int, help=f"Seed of the row permutation that mixes classes across shards [{_d('seed')}]."
)
@click.option(
    "--scheduler", type=str, help="threads | processes | synchronous | dask.distributed address [threads]."
)
@click.option("--workers", type=int, help="Local dask workers [all cores].")
@click.option("--overwrite", is_flag=True, default=None, help="Replace a shard set this tool wrote in --out.")
@config_options
def pack(cache, config_file, overrides, **flags):
    """Write one WebDataset sample per valid clip of CACHE, in a seeded permutation (shards mix
    classes), plus a latents-only copy in OUT/latents-only/ and index.json (fingerprint, counts, sha256)."""
    from cache_schema.layout import ShardLayout
    from pipeline.commands.common import cli_errors, resolve_stage_config
    from pipeline.summary import human_bytes, print_table
    from stages.common.runtime import dump_config
    from stages.pack.packer import PackConfig, run_pack

    cfg = resolve_stage_config(PackConfig, config_file, overrides, {**flags, "cache": cache})
    with cli_errors(cfg.out):
        index = ShardLayout.from_index(run_pack(cfg))
        if "://" not in cfg.out:
            dump_config(cfg, f"{cfg.out}/pack_config.yaml")
    rows = [(s.name, s.samples, human_bytes(s.bytes), s.sha256[:12]) for s in index.shards[:12]]
    print_table(["shard", "samples", "size", "sha256"], rows)
    if len(index.shards) > 12:
        click.echo(f"... {len(index.shards) - 12} more shards")
    total = sum(s.bytes for s in index.shards)
    lean = index.latents_only["bytes"]
    click.echo(
        f"{index.num_samples} samples in {len(index.shards)} shards ({human_bytes(total)}; latents-only "
        f"copy {human_bytes(lean)}, {lean / max(1, total):.1%}) -> {cfg.out}"
    )
