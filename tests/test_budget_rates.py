"""The dry run's bandwidth table: each model's clip rate is for the store's own clips, not for
Latte's 16 x 256 x 256 clips (a tiny store's bytes times a full-size clip rate mixed scales)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import tiny_extract_config

from pipeline.cli import main as cli_main
from stages.common import registry as registry
from stages.common.models.dit_sizes import train_tflop_per_clip
from stages.extract import runner


@pytest.mark.parametrize("name", list(registry.MODEL_SIZES))
def test_flop_count_at_lattes_grid_reproduces_the_registry_table(name: str) -> None:
    counted = train_tflop_per_clip(name, registry.LATTE_LATENT_SHAPE)
    assert counted == pytest.approx(registry.TRAIN_TFLOP_PER_CLIP[name], rel=0.01)


def test_flops_follow_the_grid() -> None:
    full = train_tflop_per_clip("B/2", (4, 16, 32, 32))
    small = train_tflop_per_clip("B/2", (4, 8, 8, 8))  # 1/32 of the tokens, shorter attention
    assert small < full / 32


def test_dry_run_rates_are_for_the_stores_own_clips(synth_videos: Path, tmp_path: Path) -> None:
    cfg = tiny_extract_config(synth_videos, tmp_path / "dry.zarr", dry_run=True)
    table = runner.run_extract(cfg).sizes
    assert table.latent_shape == (4, 8, 8, 8)  # the tiny preset: 8 frames of 64 px, 8x VAE
    for name in registry.MODEL_SIZES:
        want = registry.clips_per_s(train_tflop_per_clip(name, table.latent_shape))
        assert table.rates[name] == pytest.approx(want)
        for row in table.rows():  # bytes of this store's clip x this store's clip rate
            shard = next(o for o in table.formats if o.format == row["format"]).shard_per_clip
            assert row["read_gbps"][name] == pytest.approx(shard * want / 1e9)
    # the old table used B/2's rate on 16 x 256 x 256 clips, 183 clips/s: 33x too low for these clips
    assert table.rates["B/2"] > 20 * registry.train_rate("B/2")
    res = CliRunner().invoke(
        cli_main, ["extract", "--data", str(synth_videos), "--out", str(tmp_path / "cli.zarr"), "--preset", "tiny",
                   "--dry-run"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "training each model on this store's 4x8x8x8 latents" in res.output
    b2 = next(line for line in res.output.splitlines() if line.strip().startswith("B/2"))
    assert f"{table.rates['B/2']:.1f}" in b2
    assert not (tmp_path / "cli.zarr").exists()
