"""Stage one, cache schema v2: compact target formats against the real encoders, PCA and
measured fidelity, clip variety (random placement, mirrored copies), the dry run's size table,
the disk budget, and config values refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from helpers import clip_frames, decoded_rows, store_targets, tiny_extract_config

from cache_schema import constants as C
from cache_schema import formats, validate_store
from pipeline.cli import main as cli_main
from stages.common import video as V
from stages.common.models.encoders import load_encoder
from stages.common.models.vae import VAEWrapper
from stages.common.presets import tiny_models
from stages.common.resample import to_target
from stages.extract import runner
from stages.extract.budget import BudgetExceeded
from stages.extract.config import ExtractConfig, parse_size
from stages.extract.job import sample_rows

# mean cosine per format (the brief's bar), and the worst single token on these tiny D=32 encoders
MIN_COSINE = {"float16": 0.99999, "int8": 0.999, "int4": 0.99}
MIN_TOKEN_COSINE = {"float16": 0.99999, "int8": 0.998, "int4": 0.98}


def tiny_config(data: Path, out: Path | str, **over) -> ExtractConfig:
    return tiny_extract_config(data, out, **{"block_size": 3, **over})


# --------------------------------------------------------------------------- formats


FORMAT_ENCODERS = ["dino", "videomae"]  # the DiT-grid and the native-time-grid paths (sam2: test_extract.py)


@pytest.fixture(scope="module")
def format_stores(synth_videos: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    stores = {}
    for fmt in formats.TARGET_FORMATS:
        stores[fmt] = root / f"{fmt}.zarr"
        runner.run_extract(
            tiny_config(synth_videos, stores[fmt], target_format=fmt, encoders=FORMAT_ENCODERS)
        )
    return stores


@pytest.fixture(scope="module")
def direct_targets(format_stores, synth_videos: Path) -> dict[str, torch.Tensor]:
    """Each encoder's exact targets for the 6 store rows, computed without the extract stage."""
    group, frames = decoded_rows(format_stores["float16"], synth_videos, range(6), frames=8)
    paths = tiny_models()
    return {
        name: to_target(load_encoder(name, paths[name]).features(frames), group.attrs["grid"])
        for name in FORMAT_ENCODERS
    }


@pytest.mark.parametrize("fmt", list(formats.TARGET_FORMATS))
def test_each_format_reconstructs_the_real_encoders_targets(format_stores, direct_targets, fmt: str):
    out = format_stores[fmt]
    assert validate_store(out) == []
    group = zarr.open_group(str(out), mode="r")
    attrs = dict(group.attrs)
    layout = formats.stored_layout(fmt, 32)
    for enc in attrs["encoders"]:
        assert enc["format"] == fmt and enc["values"] == list(layout["values"])
        assert enc["scales"] == (None if layout["scales"] is None else list(layout["scales"]))
        assert (f"targets/{enc['name']}/scales" in group) == (layout["scales"] is not None)
    for name, expected in direct_targets.items():
        cos = formats.token_cosines(store_targets(group, name, slice(None)), expected)
        assert float(cos.mean()) >= MIN_COSINE[fmt], (name, float(cos.mean()))
        assert float(cos.min()) >= MIN_TOKEN_COSINE[fmt], (name, float(cos.min()))
        fid = attrs["derived"]["fidelity"][name]
        assert fid["clips"] == 6 and fid["tokens"] == cos.numel()
        assert abs(fid["mean"] - float(cos.double().mean())) < 1e-6  # measured on the same clips


def test_smaller_formats_are_smaller_and_less_exact(format_stores):
    sizes, means = {}, {}
    for fmt, out in format_stores.items():
        group = zarr.open_group(str(out), mode="r")
        sizes[fmt] = sum(
            obj.nbytes_stored()
            for name, obj in group.members(max_depth=None)
            if isinstance(obj, zarr.Array) and name.startswith("targets/")
        )
        means[fmt] = np.mean([f["mean"] for f in group.attrs["derived"]["fidelity"].values()])
    assert sizes["int4"] < sizes["int8"] < sizes["float16"]
    assert means["int4"] < means["int8"] < means["float16"]


def test_dit_time_grid_stores_videomae_on_the_dit_grid(synth_videos: Path, tmp_path):
    out = tmp_path / "dit.zarr"
    runner.run_extract(tiny_config(synth_videos, out, encoders=["videomae"], time_grid="dit"))
    group = zarr.open_group(str(out), mode="r")
    assert (
        group.attrs["encoders"][0]["time_frames"] == 8
        and group.attrs["spec"]["encoders"][0]["time_grid"] == "dit"
    )
    stored = group["targets/videomae/values"][:].astype(np.float32) * group["targets/videomae/scales"][:]
    norms = np.linalg.norm(stored, axis=-1)  # normalised before quantising, unlike the native grid
    np.testing.assert_allclose(norms, 1.0, atol=0.01)


# --------------------------------------------------------------------------- variety + PCA


@pytest.fixture(scope="module")
def variety_store(synth_videos: Path, tmp_path_factory) -> tuple[Path, ExtractConfig]:
    out = tmp_path_factory.mktemp("variety") / "store.zarr"
    cfg = tiny_config(
        synth_videos,
        out,
        encoders=["dino", "videomae"],
        frames=4,  # half the tiny clip: 24 rows stay cheap
        clips_per_video=2,
        clip_placement="random",
        seed=3,
        hflip=True,
        pca_dims="dino=8",
        pca_fit_clips=6,
        fidelity_clips=4,
        block_size=4,
        disk_budget="1G",  # fits: the budget check lets the run through
    )
    runner.run_extract(cfg)
    return out, cfg


def test_random_placement_and_hflip_are_recorded_and_reproducible(variety_store, synth_videos: Path):
    out, cfg = variety_store
    assert validate_store(out) == []
    group = zarr.open_group(str(out), mode="r")
    clips = group.attrs["spec"]["clips"]
    assert (clips["placement"], clips["seed"], clips["hflip"], clips["clips_per_video"]) == (
        "random",
        3,
        True,
        2,
    )
    assert group.attrs["num_clips"] == 24
    assert group[C.FLIP][:].tolist() == [0, 1] * 12  # every clip, then its mirrored copy
    source = V.discover(synth_videos)
    spec = V.ClipSpec(frames=4, stride=1, size=64, clips_per_video=2, placement="random", seed=3, hflip=True)
    refs, _, _ = V.plan_clips(source, spec, progress=False)
    assert [(r.video_index, r.start_frame, int(r.flip)) for r in refs] == list(
        zip(
            group[C.VIDEO_INDEX][:].tolist(),
            group[C.START_FRAME][:].tolist(),
            group[C.FLIP][:].tolist(),
            strict=True,
        )
    )
    other, _, _ = V.plan_clips(source, V.ClipSpec(**{**spec.__dict__, "seed": 4}), progress=False)
    assert [r.start_frame for r in other] != [r.start_frame for r in refs]  # the seed matters


def test_mirrored_rows_are_the_encoders_on_mirrored_frames(variety_store, synth_videos: Path):
    out, _ = variety_store
    group = zarr.open_group(str(out), mode="r")
    source = V.discover(synth_videos)
    spec = V.ClipSpec(frames=4, stride=1, size=64)
    paths = tiny_models()
    row = 5
    assert group[C.FLIP][row] == 1 and group[C.START_FRAME][row] == group[C.START_FRAME][row - 1]
    mirrored, plain = clip_frames(source, group, row, spec), clip_frames(source, group, row, spec, flip=False)
    torch.testing.assert_close(mirrored, plain.flip(3))
    videomae = load_encoder("videomae", paths["videomae"])
    stored = store_targets(group, "videomae", slice(row, row + 1))
    expected = to_target(videomae.features(mirrored), group.attrs["grid"])
    assert float(formats.token_cosines(stored, expected).min()) >= 0.998
    unflipped = to_target(videomae.features(plain), group.attrs["grid"])
    assert float(formats.token_cosines(stored, unflipped).mean()) < 0.99
    latent = VAEWrapper.load(paths["vae"]).encode(mirrored)[0].float().numpy()
    np.testing.assert_allclose(group[C.LATENTS][row].astype(np.float32), latent, atol=2e-3, rtol=2e-3)


def test_pca_basis_and_fidelity_come_from_disjoint_seeded_samples(variety_store, synth_videos: Path):
    out, cfg = variety_store
    group = zarr.open_group(str(out), mode="r")
    derived = group.attrs["derived"]
    fid_rows, fit_rows = sample_rows(24, cfg.fidelity_clips, cfg.pca_fit_clips, cfg.seed)
    assert len(fid_rows) == 4 and len(fit_rows) == 6 and not set(fid_rows) & set(fit_rows)
    source = V.discover(synth_videos)
    spec = V.ClipSpec(frames=4, stride=1, size=64)
    dino = load_encoder("dino", tiny_models()["dino"])

    def direct(rows):
        frames = torch.cat([clip_frames(source, group, r, spec) for r in rows])
        return to_target(dino.features(frames), group.attrs["grid"])

    # the basis: PCA of the fit sample's exact targets (an independent refit)
    acc = formats.CovarianceAccumulator()
    acc.update(direct(fit_rows))
    refit = acc.fit(8)
    np.testing.assert_allclose(group["pca/dino/components"][:], refit.components, atol=1e-4)
    assert derived["pca"]["dino"]["dims"] == 8 and group.attrs["encoders"][0]["stored_dim"] == 8
    assert abs(derived["pca"]["dino"]["explained_variance_ratio"] - refit.explained_variance_ratio) < 1e-6
    assert (
        derived["pca"]["dino"]["sha256"]
        == formats.PCABasis(group["pca/dino/mean"][:], group["pca/dino/components"][:], 0.5).sha256()
    )
    assert "videomae" not in derived["pca"] and not group.attrs["encoders"][1]["pca"]
    # fidelity: the held-out rows' stored targets against the exact ones
    cos = formats.token_cosines(store_targets(group, "dino", fid_rows), direct(fid_rows))
    fid = derived["fidelity"]["dino"]
    assert fid["clips"] == 4 and fid["held_out"] is True
    assert abs(fid["mean"] - float(cos.double().mean())) < 1e-5
    assert abs(fid["p1"] - float(np.percentile(cos.numpy(), 1))) < 1e-5


def test_sample_rows_overlap_only_when_clips_run_out():
    a, b = sample_rows(100, 32, 64, seed=0)
    assert len(a) == 32 and len(b) == 64 and not set(a) & set(b)
    assert sample_rows(100, 32, 64, seed=0) == (a, b) and sample_rows(100, 32, 64, seed=1) != (a, b)
    a, b = sample_rows(6, 32, 64, seed=0)
    assert a == b == list(range(6))
    a, b = sample_rows(10, 4, 0, seed=0)
    assert len(a) == 4 and b == []


# --------------------------------------------------------------------------- dry run, budget


def test_dry_run_prints_every_format_and_writes_nothing(synth_videos: Path, tmp_path):
    out = tmp_path / "never.zarr"
    args = ["extract", "--data", str(synth_videos), "--out", str(out), "--preset", "tiny", "--dry-run"]
    result = CliRunner().invoke(cli_main, args)
    assert result.exit_code == 0, result.output
    table = result.output.split("sizes for")[1]
    for fmt in formats.TARGET_FORMATS:
        assert f"\n{fmt} " in table
    for model in ("S/2", "B/2", "L/2", "XL/2"):
        assert f"\n{model} " in table
    assert "nothing written" in result.output and not out.exists()
    result = CliRunner().invoke(cli_main, [*args, "--train-rate", "100"])
    assert result.exit_code == 0 and "\n--train-rate  100.0" in result.output and "XL/2" not in result.output


def test_disk_budget_refuses_naming_settings_that_fit(synth_videos: Path, tmp_path):
    out = tmp_path / "never.zarr"
    cfg = tiny_config(synth_videos, out, clips_per_video=2, hflip=True, dry_run=True)
    sizes = runner.run_extract(cfg).sizes
    int8, int4 = sizes.by_format("int8"), sizes.by_format("int4")
    assert int8.clips == 24 and int4.total_bytes < int8.total_bytes
    budget = int((int8.total_bytes + int4.total_bytes) / 2)
    # a real run is refused before anything is written
    with pytest.raises(BudgetExceeded) as refused:
        runner.run_extract(
            tiny_config(synth_videos, out, clips_per_video=2, hflip=True, disk_budget=str(budget))
        )
    assert not out.exists()
    message = str(refused.value)
    assert "disk_budget" in message and "--target-format int4" in message
    assert "--clips-per-video 1" in message and "no --hflip" in message and "--pca-dims 16" in message
    listed = [part.rsplit(" (", 1)[0] for part in message.split("settings that fit: ")[1].split("; ")]
    by_label = {o.label(): o for o in refused.value.table.alternatives}
    assert listed and all(by_label[label].total_bytes <= budget for label in listed)
    no_flip = next(o for o in refused.value.table.alternatives if o.changes == ("no --hflip",))
    assert no_flip.clips == 12 and no_flip.total_bytes == pytest.approx(int8.total_bytes / 2)
    # the dry run shows its table, then refuses the same way
    args = ["extract", "--data", str(synth_videos), "--out", str(out), "--preset", "tiny", "--dry-run"]
    cli = CliRunner().invoke(
        cli_main, [*args, "--clips-per-video", "2", "--hflip", "--disk-budget", str(budget)]
    )
    assert (
        cli.exit_code != 0
        and "int4" in cli.output.split("sizes for")[1]
        and "settings that fit" in cli.output
    )
    assert not out.exists()


def test_parse_size():
    assert parse_size("500G") == 500 * 1024**3 and parse_size("1.5T") == int(1.5 * 1024**4)
    assert (
        parse_size("800MiB") == 800 * 1024**2
        and parse_size("10GB") == 10 * 1000**3
        and parse_size(4096) == 4096
    )
    for bad in ("lots", "5X", "-1G", "0"):
        with pytest.raises(ValueError, match="disk_budget"):
            parse_size(bad)


# --------------------------------------------------------------------------- refused config


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--size", "7"], "size: 7 is not a multiple of the patch size 2"),
        (["--size", "24"], "size: 24 is not a multiple of 16"),
        (["--block-size", "0"], "block_size: must be a positive integer, got 0"),
        (["--batch-size", "0"], "batch_size: must be a positive integer, got 0"),
        (["--num-workers", "-1"], "num_workers: must be an integer >= 0, got -1"),
        (["--frames", "0"], "frames: must be a positive integer, got 0"),
        (["--stride", "0"], "stride: must be a positive integer, got 0"),
        (["--encoders", "dino,dino"], "encoders: dino,dino names 'dino' twice"),
        (["--encoders", "dino,clip"], "encoders: unknown encoder 'clip'"),
        (["--device", "tpu"], "device: 'tpu' is not one of auto | cpu | cuda | cuda:N"),
        (["--set", "codec=lz4"], "codec: 'lz4' is not one of zstd, blosc, none"),
        (["--set", "target_format=int3"], "target_format: 'int3' is not one of float16, int8, int4"),
        (["--set", "clip_placement=middle"], "clip_placement: 'middle' is not one of even, random"),
        (["--pca-dims", "0"], "pca_dims: dino=0 must be >= 1"),
        (["--pca-dims", "sam2=8,foo=2"], "pca_dims: 'foo' is not one of the run's encoders"),
        (["--pca-dims", "64"], "pca_dims: dino=64 exceeds the encoder's feature dim 32"),
        (["--target-format", "int4", "--pca-dims", "7"], "pca_dims: dino=7 is odd"),
        (["--disk-budget", "lots"], "disk_budget: 'lots' is not a size"),
    ],
)
def test_unusable_values_are_refused_naming_the_key(synth_videos: Path, tmp_path, extra, message):
    out = tmp_path / "never.zarr"
    args = ["extract", "--data", str(synth_videos), "--out", str(out), "--preset", "tiny", *extra]
    result = CliRunner().invoke(cli_main, args)
    assert result.exit_code != 0
    assert message in " ".join(result.output.split()), result.output
    assert not out.exists()


# --------------------------------------------------------------------------- failures


def test_a_failed_run_leaves_no_decoding_workers(synth_videos: Path, tmp_path, monkeypatch):
    import multiprocessing

    def failing_compute(*args, **kwargs):
        raise RuntimeError("model failure")

    monkeypatch.setattr(runner, "compute_batch", failing_compute)
    cfg = tiny_config(synth_videos, tmp_path / "s.zarr", encoders=["dino"], num_workers=2, fidelity_clips=0)
    with pytest.raises(RuntimeError, match="model failure"):
        runner.run_extract(cfg)
    assert multiprocessing.active_children() == []


def test_a_store_larger_than_the_free_disk_is_refused(synth_videos: Path, tmp_path, monkeypatch):
    from stages.common import runtime

    monkeypatch.setattr(runtime, "free_bytes", lambda path: 10_000)
    out = tmp_path / "s.zarr"
    with pytest.raises(BudgetExceeded, match=r"out: the store needs about .* but only 9.8K is free at "):
        runner.run_extract(tiny_config(synth_videos, out, encoders=["dino"]))
    assert not out.exists()


def test_a_store_of_another_schema_version_is_replaced_only_with_overwrite(synth_videos: Path, tmp_path):
    out = tmp_path / "old.zarr"
    zarr.open_group(str(out), mode="w").attrs.update({"schema_version": 1})
    with pytest.raises(runner.ExtractError, match="schema v1.*--overwrite"):
        runner.run_extract(tiny_config(synth_videos, out, encoders=["dino"]))
    runner.run_extract(tiny_config(synth_videos, out, encoders=["dino"], overwrite=True))
    assert validate_store(out) == []


def test_dino_input_follows_the_clip_so_its_patch_grid_is_the_dit_grid(synth_videos: Path, tmp_path):
    """REPA's rule, our default: 224 px per 256 px of clip, i.e. the DiT grid side x DINOv2's patch (14)."""
    for size in (64, 128):
        out = tmp_path / f"s{size}.zarr"
        result = runner.run_extract(
            tiny_config(synth_videos, out, encoders=["dino"], size=size, dry_run=True)
        )
        grid = result.grid
        assert grid[1] == size // 8 // 2
        cfg = tiny_config(synth_videos, tmp_path / f"r{size}.zarr", encoders=["dino"], size=size)
        runner.run_extract(cfg)
        spec = zarr.open_group(str(cfg.out), mode="r").attrs["spec"]
        dino = next(e for e in spec["encoders"] if e["name"] == "dino")
        assert dino["input_size"] == grid[1] * 14  # 56 px for 64 px clips, 112 px for 128 px clips
