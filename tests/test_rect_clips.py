"""Non-square clips end to end: `extract --size HxW` (one parser, errors naming the axis), frames
resized to cover HxW then center-cropped, the encoders' targets on the HxW token grid, VideoDiT
and Wan (LoRA) trained on non-square latents and sampled at the run's (h, w); the dry run's trainer
rows for a Wan base; a store written before non-square clips still reads, packs and trains square."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from helpers import REPO

from cache_schema import RunDir
from cache_schema.layout import StoreLayout
from cache_schema.validate import read_shard_layout
from pipeline.cli import main
from stages.common.models.dit import sincos_2d
from stages.common.models.factory import load_adapter
from stages.common.video import parse_clip_size, resize_crop
from stages.extract.config import ExtractConfig

HW = "32x48"  # tiny VAE / Wan VAE (8x) and patch 2: latents 4 x 6, token grid 2 x 3
LEGACY = REPO / "tests" / "data" / "legacy_v2_cache.tar.gz"


def _invoke(args: list[str]):
    result = CliRunner().invoke(main, args)
    return result, [line for line in result.output.splitlines() if line.startswith("Error:")]


# ------------------------------------------------------------------------------------ parsing
def test_a_clip_size_is_a_side_or_height_x_width_parsed_in_one_place() -> None:
    assert parse_clip_size(256) == (256, 256) and parse_clip_size("64") == (64, 64)
    assert parse_clip_size("480x832") == (480, 832) and parse_clip_size(" 480 X 832 ") == (480, 832)
    assert ExtractConfig().size == 256 and ExtractConfig().hw == (256, 256)  # the default stays square
    assert ExtractConfig(size="480x832").hw == (480, 832)
    for bad in ("480x", "x832", "480x832x3", "big", "-4", True):
        with pytest.raises(ValueError, match=r"is not a clip size; give SIDE or HEIGHTxWIDTH px"):
            parse_clip_size(bad)
    with pytest.raises(ValueError, match="size: the width must be a positive number of pixels, got 0"):
        parse_clip_size("16x0")


@pytest.mark.parametrize(
    "size,message",
    [
        ("480x", "size: '480x' is not a clip size; give SIDE or HEIGHTxWIDTH px, e.g. 256 or 480x832"),
        ("480x831", "size: width 831 is not a multiple of the patch size 2"),
        (
            "488x832",
            "size: height 488 is not a multiple of 16 (the VAE's spatial factor 8 x patch 2); "
            "use e.g. 480, 496",
        ),  # fmt: skip
        (
            "480x830",
            "size: width 830 is not a multiple of 16 (the VAE's spatial factor 8 x patch 2); "
            "use e.g. 816, 832",
        ),  # fmt: skip
    ],
)
def test_cli_refuses_a_bad_size_naming_the_axis(size: str, message: str, tmp_path: Path) -> None:
    out = tmp_path / "store"
    args = ["extract", "--data", str(tmp_path), "--out", str(out), "--preset", "tiny", "--size", size]
    result, errors = _invoke(args)
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0] == f"Error: {message}" or errors[0].startswith(f"Error: {message}"), errors
    assert not out.exists()


# ------------------------------------------------------------------------------------ frames
def test_frames_are_resized_to_cover_height_x_width_then_center_cropped() -> None:
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 64, 80, 3), generator=g, dtype=torch.uint8)
    assert torch.equal(resize_crop(frames, (48, 48)), resize_crop(frames, 48))  # square: as before
    # 64 x 80 -> (32, 48): scale max(32/64, 48/80) = 0.6 covers both -> 38 x 48, rows 3..35 kept
    wide = resize_crop(frames, (32, 48))
    assert wide.shape == (2, 32, 48, 3)
    assert torch.equal(wide, _cover(frames, 38, 48)[:, 3:35])
    # a tall crop of a wide frame: cover by height (48 / 64) -> 48 x 60, columns 22..38 kept
    tall = resize_crop(frames, (48, 16))
    assert tall.shape == (2, 48, 16, 3) and torch.equal(tall, _cover(frames, 48, 60)[:, :, 22:38])


def _cover(frames: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The whole frames resized to h x w (what resize_crop crops from)."""
    x = torch.nn.functional.interpolate(
        frames.permute(0, 3, 1, 2).float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False
    )
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def test_an_encoder_sees_the_whole_non_square_frame() -> None:
    """A square-input encoder on a 32 x 48 clip takes the whole frame (its own centre crop would drop
    the sides, and the targets resampled to the 2 x 3 grid would not lie under their tokens)."""
    from stages.common.models.encoders import load_encoder
    from stages.common.presets import tiny_models
    from stages.extract.models import encoder_input

    enc = load_encoder("dino", tiny_models()["dino"], input_size=42)
    frames = torch.zeros(1, 2, 32, 48, 3, dtype=torch.uint8)
    frames[..., :6, :] = 255  # only the leftmost 6 columns are bright: outside a 32 x 32 centre crop
    assert float(enc.preprocess(frames[0]).float().max()) < 0  # the encoder alone crops them away
    seen = encoder_input(enc, frames)
    assert seen.shape == (1, 2, 42, 42, 3)
    assert int(seen[..., :4, :].min()) > 200 and int(seen[..., 10:, :].max()) < 50
    pixels = enc.preprocess(seen[0]).float()
    assert float(pixels[..., :4].mean()) > 1.0 > -1.0 > float(pixels[..., 10:].mean())
    features = enc.features(seen)
    assert features.shape == (1, 2, 3, 3, 32)  # 42 / 14: what extraction resamples to the 2 x 3 grid
    square = frames[:, :, :, 8:40]  # square clips pass unchanged
    assert encoder_input(enc, square) is square
    hog = load_encoder("hog")  # at the clip's own size: 4 x 6 cells of 8 px, nothing resized
    assert encoder_input(hog, frames) is frames and hog.features(frames).shape[1:4] == (2, 4, 6)


# ------------------------------------------------------------------------------------ VideoDiT
@pytest.fixture(scope="module")
def rect_store(synth_videos: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rect")
    args = ["extract", "--data", str(synth_videos), "--out", str(root / "store"), "--preset", "tiny",
            "--size", HW, "--encoders", "dino,hog", "--set", "fidelity_clips=1", "--set", "progress=false"]  # fmt: skip
    result, errors = _invoke(args)
    assert result.exit_code == 0 and not errors, result.output
    return root / "store"


def test_extract_writes_a_non_square_store(rect_store: Path) -> None:
    group = zarr.open_group(str(rect_store), mode="r")
    layout = StoreLayout.from_attrs(dict(group.attrs))
    assert layout.clip_size == (32, 48) and layout.spec["clips"]["size"] == [32, 48]
    assert layout.latent_shape == (4, 8, 4, 6) and layout.grid == (8, 2, 3)
    n = layout.num_clips
    assert group["latents"].shape == (n, 4, 8, 4, 6)
    for name in (
        "dino",
        "hog",
    ):  # dino: its square input, tokens resampled to 2 x 3; hog: 4 x 6 cells -> 2 x 3
        assert group[f"targets/{name}/values"].shape[:4] == (n, 8, 2, 3), name
    info = CliRunner().invoke(main, ["info", str(rect_store)])
    assert info.exit_code == 0 and "8 frames, stride 1, 32x48px (HxW)" in info.output, info.output


def _train(shards: Path, run: Path, *extra: str) -> None:
    args = ["train", "--shards", str(shards), "--out", str(run), "--steps", "2", "--batch-size", "2",
            "--num-workers", "0", "--device", "cpu", "--checkpoint-every", "2", "--set", "shuffle_buffer=4",
            "--projector-dim", "16", *extra]  # fmt: skip
    result, errors = _invoke(args)
    assert result.exit_code == 0 and not errors, result.output


def test_videodit_trains_and_samples_at_the_stores_height_and_width(rect_store: Path, tmp_path: Path) -> None:
    result, _ = _invoke(["pack", str(rect_store), "--out", str(tmp_path / "shards")])
    assert result.exit_code == 0, result.output
    # iREPA's conv projector works on the 2 x 3 token grid too
    _train(tmp_path / "shards", tmp_path / "run", "--model", "tiny", "--set", "projector=conv")
    ckpt = RunDir(tmp_path / "run").latest_checkpoint()
    assert json.loads((ckpt / "model" / "config.json").read_text())["sample_size"] == [4, 6]
    adapter = load_adapter(ckpt / "ema")
    assert adapter.latent_shape == (4, 8, 4, 6)
    hidden = adapter.module.config.hidden_size
    assert torch.equal(adapter.module.spatial_pos, sincos_2d(hidden, 2, 3))  # rows x columns, not 3 x 2
    out = tmp_path / "samples"
    result, errors = _invoke(["sample", "--run", str(tmp_path / "run"), "--num", "2", "--steps", "2",
                              "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0 and not errors, result.output
    assert np.load(out / "videos.npz")["videos"].shape == (2, 8, 32, 48, 3)
    # the exported diffusers pipeline (its own copy of the model module) generates at 32 x 48 too
    from test_export import load_in_fresh_process

    result, errors = _invoke(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exported")])
    assert result.exit_code == 0 and not errors, result.output
    info = load_in_fresh_process(tmp_path / "exported", tmp_path / "exported.npz", 2, 0, 1.0)
    assert info["ours"] == []
    exported = np.load(tmp_path / "exported.npz")
    assert exported["latents"].shape == (4, 4, 8, 4, 6) and exported["videos"].shape == (4, 8, 32, 48, 3)


def test_dry_run_rows_are_the_videodit_sizes_whose_patch_fits(synth_videos: Path, tmp_path: Path) -> None:
    args = ["extract", "--data", str(synth_videos), "--out", str(tmp_path / "s"), "--preset", "tiny",
            "--size", HW, "--encoders", "hog", "--dry-run", "--set", "progress=false"]  # fmt: skip
    result, errors = _invoke(args)
    assert result.exit_code == 0 and not errors, result.output
    rows = _trainer_rows(result.output)
    assert "XL/2" in rows and "mini/4" not in rows  # 4 x 6 latents: patch 4 does not divide 6
    assert not any(r.startswith("Wan") for r in rows)


def _trainer_rows(output: str) -> list[str]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("trainer ")) + 2
    return [line.split()[0] for line in lines[start:] if line.strip() and not line.startswith("dry run")]


# ------------------------------------------------------------------------------------ Wan
@pytest.fixture(scope="module")
def wan_folder() -> str:
    from stages.common.presets import tiny_wan_pipeline

    return tiny_wan_pipeline()


def _manifest(videos: Path, path: Path) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "caption"])
        writer.writerows(
            (str(v), "", f"a shape, clip {i}") for i, v in enumerate(sorted(videos.rglob("*.mp4")))
        )
    return path


def _wan_extract(manifest: Path, out: Path, wan: str, size: str, *extra: str):
    return _invoke(["extract", "--data", str(manifest), "--out", str(out), "--preset", "tiny", "--base", wan,
                    "--frames", "5", "--size", size, "--encoders", "dino,hog", "--set", "fidelity_clips=1",
                    "--set", "text_max_length=16", "--set", "progress=false", *extra])  # fmt: skip


def test_wan_lora_trains_and_samples_at_the_stores_height_and_width(
    wan_folder: str, synth_videos: Path, tmp_path: Path
) -> None:
    manifest = _manifest(synth_videos, tmp_path / "captions.csv")
    result, errors = _wan_extract(manifest, tmp_path / "store", wan_folder, HW)
    assert result.exit_code == 0 and not errors, result.output
    layout = StoreLayout.from_attrs(dict(zarr.open_group(str(tmp_path / "store"), mode="r").attrs))
    assert layout.latent_shape == (16, 2, 4, 6) and layout.grid == (
        2,
        2,
        3,
    )  # Wan VAE: 1 + (5 - 1) / 4 frames
    result, _ = _invoke(["pack", str(tmp_path / "store"), "--out", str(tmp_path / "shards")])
    assert result.exit_code == 0, result.output
    assert read_shard_layout(tmp_path / "shards").grid == (2, 2, 3)
    _train(tmp_path / "shards", tmp_path / "run", "--base", wan_folder, "--lora-rank", "4")
    assert RunDir(tmp_path / "run").read_config()["latent_shape"] == [16, 2, 4, 6]
    out = tmp_path / "samples"
    result, errors = _invoke(["sample", "--run", str(tmp_path / "run"), "--prompt", "a shape", "--num", "1",
                              "--steps", "2", "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0 and not errors, result.output
    assert np.load(out / "videos.npz")["videos"].shape == (1, 5, 32, 48, 3)


def test_dry_run_with_a_wan_base_lists_the_wan_sizes(
    wan_folder: str, synth_videos: Path, tmp_path: Path
) -> None:
    manifest = _manifest(synth_videos, tmp_path / "captions.csv")
    result, errors = _wan_extract(manifest, tmp_path / "s", wan_folder, HW, "--dry-run")
    assert result.exit_code == 0 and not errors, result.output
    assert "per H100 at 40% MFU fine-tuning each Wan 2.1 size in full" in result.output
    assert "this store's 16x2x4x6 latents" in result.output
    rows = _trainer_rows(result.output)
    assert rows == ["Wan2.1-T2V-1.3B", "Wan2.1-T2V-14B"]
    rates = {line.split()[0]: float(line.split()[1]) for line in result.output.splitlines()
             if line.startswith("Wan2.1")}  # fmt: skip
    assert rates["Wan2.1-T2V-1.3B"] > 5 * rates["Wan2.1-T2V-14B"] > 0  # the bigger model reads fewer clips/s
    # the Wan VAE's factor is read from its config.json: refused before any model loads (exit 2)
    result, errors = _wan_extract(manifest, tmp_path / "s2", wan_folder, "32x40", "--dry-run")
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert errors[0] == (
        "Error: size: width 40 is not a multiple of 16 (the VAE's spatial factor 8 x patch 2); use e.g. 32, 48"
    )
    assert not (tmp_path / "s2").exists()


# ------------------------------------------------------------------------------------ old stores
def test_a_store_written_before_non_square_clips_still_reads_and_trains_square(tmp_path: Path) -> None:
    with tarfile.open(LEGACY) as tar:
        tar.extractall(tmp_path, filter="data")
    layout = StoreLayout.from_attrs(dict(zarr.open_group(str(tmp_path / "store"), mode="r").attrs))
    assert layout.spec["clips"]["size"] == 64 and layout.clip_size == (64, 64)
    info = CliRunner().invoke(main, ["info", str(tmp_path / "store")])
    assert info.exit_code == 0 and "64x64px (HxW)" in info.output, info.output
    _train(tmp_path / "shards", tmp_path / "run", "--model", "tiny")
    ckpt = RunDir(tmp_path / "run").latest_checkpoint()
    assert json.loads((ckpt / "model" / "config.json").read_text())["sample_size"] == 8  # an int, as before
    assert load_adapter(ckpt / "ema").latent_shape == (4, 8, 8, 8)
