"""The hand-offs between stages on real artifacts: extract -> pack -> train -> sample, with an image
VAE and with a causal video VAE; the run directory tells `pipeline sample --run` which VAE decodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import tiny_extract_config

from cache_schema import RunDir, validate_shards
from pipeline.cli import main
from stages.extract.runner import run_extract
from stages.pack.packer import PackConfig, run_pack
from stages.train import TrainConfig, train


@pytest.fixture(scope="module", params=["image", "video"])
def trained_run(request, synth_videos: Path, tmp_path_factory) -> tuple[str, Path, int]:
    kind = request.param
    root = tmp_path_factory.mktemp(f"handoff-{kind}")
    frames = 9 if kind == "video" else 8  # a causal video VAE takes 1 + 4j frames
    cfg = tiny_extract_config(synth_videos, root / "store.zarr", encoders=["dino", "videomae"], vae_kind=kind,
                              frames=frames, pca_dims="dino=8", block_size=3)  # fmt: skip
    run_extract(cfg)
    run_pack(
        PackConfig(
            cache=str(root / "store.zarr"), out=str(root / "shards"), samples_per_shard=4, progress=False
        )
    )
    assert validate_shards(root / "shards", verify_hashes=True) == []
    run = root / "run"
    train(TrainConfig(shards=str(root / "shards"), out=str(run), model="tiny", steps=2, batch_size=2,
                      checkpoint_every=2, log_every=1, projector_dim=16, num_workers=0, shuffle_buffer=4,
                      device="cpu"), progress=False)  # fmt: skip
    return kind, run, frames


def test_the_run_records_the_shards_vae(trained_run) -> None:
    kind, run, _ = trained_run
    spec = RunDir(run).vae_spec()
    assert spec["kind"] == kind and Path(spec["id"]).name == ("video_vae" if kind == "video" else "vae")
    rows = RunDir(run).read_log()
    assert [r["step"] for r in rows] == [1, 2] and set(rows[-1]["cos_sim"]) == {"dino", "videomae"}


def test_sample_decodes_with_the_runs_vae(trained_run, tmp_path: Path) -> None:
    kind, run, frames = trained_run
    out = tmp_path / "samples"
    result = CliRunner().invoke(
        main, ["sample", "--run", str(run), "--out", str(out), "--num", "2", "--steps", "2"]
    )
    assert result.exit_code == 0, result.output
    videos = np.load(out / "videos.npz")["videos"]
    # an image VAE decodes 8 latent frames to 8 frames; the video VAE 3 latent steps to 1 + 4*2 = 9
    assert videos.shape == (2, frames, 64, 64, 3)
