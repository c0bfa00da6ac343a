"""iREPA's spatial normalisation from the cache: each token's norm is stored beside its unit token,
the trainer rebuilds the encoder's raw tokens and z-scores those, as iREPA does; shards without
norms are refused for --target-norm spatial."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from helpers import decoded_rows, make_shards, tiny_extract_config
from helpers import tiny_train_config as tiny

from cache_schema import constants as C
from cache_schema import formats, read_shard_layout
from cache_schema.tars import iter_samples, open_shard
from pipeline.cli import main as cli_main
from stages.common.models.encoders import load_encoder
from stages.common.presets import tiny_models
from stages.common.resample import resample_to_grid
from stages.extract import runner
from stages.pack.packer import PackConfig, run_pack
from stages.train import train
from stages.train.align import spatial_normalize
from stages.train.data import DecodeSamples, SkipLog, collate
from stages.train.step import StepConfig, prepare_batch

pytestmark = pytest.mark.usefixtures("one_thread")

ENCODERS = ["dino", "videomae"]  # unit tokens + norms, and raw values at VideoMAE's own time grid
IREPA_ALPHA = 0.6  # iREPA ldm/train.py --zscore-alpha default


def irepa_spatial_zscore(feat: np.ndarray, alpha: float = IREPA_ALPHA, eps: float = 1e-6) -> np.ndarray:
    """iREPA's `spatial_zscore` (ldm/utils.py, End2End-Diffusion/iREPA), re-implemented in float64:
    feat [B, T, D] patch tokens of B images, mean and std (Bessel) over the T tokens."""
    mean = feat.mean(axis=1, keepdims=True)
    std = feat.std(axis=1, ddof=1, keepdims=True)
    return (feat - alpha * mean) / (std + eps)


def per_frame_irepa(raw: np.ndarray) -> np.ndarray:
    """[B, T, H, W, D] -> every frame as one iREPA image of H*W tokens, z-scored, same shape."""
    b, t, h, w, d = raw.shape
    return irepa_spatial_zscore(raw.reshape(b * t, h * w, d).astype(np.float64)).reshape(b, t, h, w, d)


@pytest.fixture(scope="module")
def packed(synth_videos: Path, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("raw")
    store, shards = root / "store.zarr", root / "shards"
    runner.run_extract(
        tiny_extract_config(synth_videos, store, target_format="float16", encoders=ENCODERS, block_size=3)
    )
    run_pack(PackConfig(cache=str(store), out=str(shards), samples_per_shard=3, progress=False))
    return store, shards


def _raw_tokens(store: Path, videos: Path, rows: list[int]) -> dict[str, torch.Tensor]:
    """Each encoder's raw tokens on the DiT grid for store rows, computed without the extract stage."""
    group, frames = decoded_rows(store, videos, rows, frames=8)
    paths = tiny_models()
    grid = group.attrs["grid"]
    return {n: resample_to_grid(load_encoder(n, paths[n]).features(frames), grid) for n in ENCODERS}


def test_the_store_and_the_shards_carry_each_tokens_norm(packed, synth_videos: Path) -> None:
    store, shards = packed
    group = zarr.open_group(str(store), mode="r")
    entries = {e["name"]: e for e in group.attrs["encoders"]}
    assert entries["dino"][C.RAW_TOKENS] == C.RAW_FROM_NORMS
    assert entries["videomae"][C.RAW_TOKENS] == C.RAW_IN_VALUES  # stored raw at its own time grid
    assert C.norms_path("videomae") not in group
    raw = _raw_tokens(store, synth_videos, [0, 1])["dino"]
    stored = torch.from_numpy(group[C.norms_path("dino")][:2].astype(np.float32))
    torch.testing.assert_close(stored, raw.norm(dim=-1), rtol=1e-3, atol=0)
    with open_shard(str(shards / C.SHARD_PATTERN.format(0))) as fh:
        sample = next(iter_samples(fh, "shard-0"))
    assert C.sample_norms("dino") in sample and C.sample_norms("videomae") not in sample


def _batch_from_shard(shards: Path, norms: bool) -> tuple[list[int], dict]:
    """A shard's samples decoded and collated by the loader's own stages, on the CPU."""
    index = read_shard_layout(shards)
    encoders = index.encoder_entries()
    decode = DecodeSamples(encoders, "stop", SkipLog(), norms=norms)
    with open_shard(str(shards / index.shards[0].name)) as fh:
        samples = list(iter_samples(fh, "shard-0"))
    decoded = [decode.decode(s) | {"skipped": []} for s in samples]
    cfg = StepConfig(device=torch.device("cpu"), encoders=encoders, frames=index.grid[0], raw_targets=norms)
    return [int(s["__key__"]) for s in samples], prepare_batch(collate(decoded), cfg)


def test_spatial_targets_equal_irepas_formula_on_the_raw_tokens(packed, synth_videos: Path) -> None:
    store, shards = packed
    rows, batch = _batch_from_shard(shards, norms=True)
    raw = _raw_tokens(store, synth_videos, rows)
    for name in ENCODERS:
        want = torch.from_numpy(per_frame_irepa(raw[name].numpy())).float()
        got = spatial_normalize(batch["targets"][name])
        cos = formats.token_cosines(got, want)
        assert float(cos.min()) > 0.9999, (name, float(cos.min()))
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    # z-scoring the unit tokens instead (what the trainer did before) is another target where token
    # norms vary: VideoMAE's do here (the tiny DINOv2's final LayerNorm at init gives equal norms)
    _, unit = _batch_from_shard(shards, norms=False)
    want = torch.from_numpy(per_frame_irepa(raw["videomae"].numpy())).float()
    old = formats.token_cosines(spatial_normalize(unit["targets"]["videomae"]), want)
    assert float(old.min()) < 0.99, float(old.min())


@pytest.mark.parametrize("fmt", list(formats.TARGET_FORMATS))
def test_raw_tokens_from_unit_tokens_and_norms_in_every_format(fmt: str) -> None:
    """768-d tokens whose norms vary (as DINOv2's do): the stored unit token and float16 norm give
    iREPA's z-score of the raw tokens; the unit tokens alone do not."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 3, 4, 4, 768, generator=g) * torch.exp(torch.randn(2, 3, 4, 4, 1, generator=g))
    norms = raw.norm(dim=-1)
    values, scales = formats.encode(raw / norms[..., None], fmt)
    rebuilt = formats.reconstruct_raw(values, scales, fmt, 768, 3, norms=formats.encode_norms(norms))
    want = torch.from_numpy(per_frame_irepa(raw.numpy())).float()
    floor = {"float16": 0.9999, "int8": 0.999, "int4": 0.99}[fmt]
    assert float(formats.token_cosines(spatial_normalize(rebuilt), want).min()) > floor
    unit_only = formats.reconstruct(values, scales, fmt, 768, 3)
    assert float(formats.token_cosines(spatial_normalize(unit_only), want).mean()) < 0.99
    with pytest.raises(ValueError, match="do not match"):
        formats.reconstruct_raw(values, scales, fmt, 768, 3, norms=norms[:, :2])


def test_spatial_training_runs_on_shards_with_norms(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", num_samples=16, per_shard=8)
    summary = train(tiny(shards, tmp_path / "run", steps=2, target_norm="spatial"), progress=False)
    assert summary["step"] == 2


def test_shards_without_norms_are_refused_for_spatial(tmp_path: Path) -> None:
    old = make_shards(tmp_path / "old", num_samples=16, per_shard=8, token_norms=False)
    with pytest.raises(ValueError, match="--target-norm spatial needs the raw tokens of dino, sam2"):
        train(tiny(old, tmp_path / "run", steps=1, target_norm="spatial"), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    # token mode still trains on them
    assert train(tiny(old, tmp_path / "run2", steps=1), progress=False)["step"] == 1
    res = CliRunner().invoke(
        cli_main,
        ["train", "--shards", str(old), "--out", str(tmp_path / "run3"), "--preset", "tiny", "--steps", "1",
         "--target-norm", "spatial", "--device", "cpu"],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: --target-norm spatial needs the raw tokens of dino, sam2")
    assert "Traceback" not in res.output
