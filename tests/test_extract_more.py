"""Stage one, harder cases: a causal video VAE's temporal grid, a real SIGKILL mid-run then
resume, and a clip whose video probes fine but fails to decode at extraction time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
import zarr
from click.testing import CliRunner
from helpers import decoded_rows, read_arrays, store_targets, tiny_extract_config

from cache_schema import constants as C
from cache_schema import formats, validate_store
from pipeline.cli import main as cli_main
from stages.common import video as V
from stages.common.models.encoders import load_encoder
from stages.common.models.vae import VAEWrapper
from stages.common.presets import tiny_models
from stages.common.resample import causal_groups, to_target
from stages.extract import budget, derive, runner
from stages.extract.config import ExtractConfig, preset_values


def tiny_config(data: Path, out: Path | str, **over) -> ExtractConfig:
    return tiny_extract_config(data, out, **{"block_size": preset_values("tiny")["block_size"], **over})


def video_vae_config(data: Path, out: Path | str, **over) -> ExtractConfig:
    """The tiny preset with the tiny causal video VAE (temporal compression 4) instead of the image VAE."""
    return tiny_config(data, out, vae=tiny_models(names=["video_vae"])["video_vae"], vae_kind="video", **over)


# --------------------------------------------------------------------------- causal video VAE


def test_causal_groups():
    assert causal_groups(9, 4) == [(0, 1), (1, 5), (5, 9)]
    assert causal_groups(1, 4) == [(0, 1)]
    assert causal_groups(3, 1) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match=r"1 \+ 4\*j"):
        causal_groups(8, 4)


@pytest.fixture(scope="module")
def video_vae_store(synth_videos: Path, tmp_path_factory) -> tuple[Path, ExtractConfig]:
    out = tmp_path_factory.mktemp("video_vae") / "store.zarr"
    # dino at 112 px gives an 8x8 grid, so the spatial resampling to the 4x4 DiT grid is real
    cfg = video_vae_config(
        synth_videos, out, frames=9, encoders=["dino", "videomae"], dino_size=112, block_size=3
    )
    runner.run_extract(cfg)
    return out, cfg


def test_video_vae_store_has_causal_latent_grid(video_vae_store):
    out, cfg = video_vae_store
    assert validate_store(out) == []
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    assert attrs["latent_shape"] == [4, 3, 8, 8]  # T' = 1 + (9 - 1) / 4
    assert attrs["grid"] == [3, 4, 4]
    assert attrs["spec"]["vae"]["temporal_factor"] == 4 and attrs["spec"]["vae"]["kind"] == "video"
    vae = VAEWrapper.load(cfg.vae, kind="video", scale=cfg.latent_scale)
    assert vae.latent_shape(9, 64, 64) == tuple(attrs["latent_shape"])


def test_video_vae_targets_average_each_causal_latent_step(video_vae_store, synth_videos: Path):
    out, cfg = video_vae_store
    clip = 4
    group, frames = decoded_rows(out, synth_videos, [clip], frames=9)
    attrs = dict(group.attrs)
    paths = tiny_models()
    assert [e["time_frames"] for e in attrs["encoders"]] == [
        3,
        3,
    ]  # VideoMAE's 4 tubelets > 3 steps: DiT grid

    # dino, computed independently: per-frame tokens, groups [0], [1-4], [5-8], mean, resize, L2
    dino = load_encoder("dino", paths["dino"], input_size=112)
    per_frame = dino.features(frames)[0].numpy()  # [9, 8, 8, D]
    assert per_frame.shape[:3] == (9, 8, 8)
    steps = np.stack([per_frame[0], per_frame[1:5].mean(0), per_frame[5:9].mean(0)])  # [3, 8, 8, D]
    x = torch.from_numpy(steps).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    expected = x.permute(0, 2, 3, 1).numpy()
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    cached = store_targets(group, "dino", slice(clip, clip + 1))[0].numpy()
    np.testing.assert_allclose(cached, expected, atol=0.02)
    assert float(formats.token_cosines(cached, expected).min()) >= 0.999
    # and not the naive grouping of 3 frames per latent step
    naive = to_target(torch.from_numpy(per_frame)[None], attrs["grid"])[0].numpy()
    assert np.abs(cached - naive).max() > 1e-2

    # videomae: its tubelet grid (4 steps) is interpolated to the 3 latent steps, as before
    videomae = load_encoder("videomae", paths["videomae"])
    expected_vm = to_target(videomae.features(frames), attrs["grid"])[0].numpy()
    cached_vm = store_targets(group, "videomae", slice(clip, clip + 1))[0].numpy()
    np.testing.assert_allclose(cached_vm, expected_vm, atol=0.02)
    assert float(formats.token_cosines(cached_vm, expected_vm).min()) >= 0.999

    vae = VAEWrapper.load(cfg.vae, kind="video", scale=cfg.latent_scale)
    latent = vae.encode(frames)[0].float().numpy()
    np.testing.assert_allclose(group[C.LATENTS][clip].astype(np.float32), latent, atol=2e-3, rtol=2e-3)


def test_frames_that_do_not_fit_a_causal_vae_fail_clearly(synth_videos: Path, tmp_path):
    out = tmp_path / "never.zarr"
    cfg = video_vae_config(synth_videos, out, frames=8, encoders=["dino"])
    with pytest.raises(runner.ExtractError, match=r"--frames 8 .*causal.*1 \+ 4\*j frames, e\.g\. 5, 9, 13"):
        runner.run_extract(cfg)
    assert not out.exists()


# --------------------------------------------------------------------------- a real kill


def _block_files(out: Path, block: int) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file that holds block ``block``'s latents and targets."""
    files = {}
    for name in (C.LATENTS, "targets/dino/values", "targets/dino/scales"):
        for f in sorted((out / name / "c" / str(block)).rglob("*")):
            if f.is_file():
                st = f.stat()
                files[str(f)] = (st.st_mtime_ns, st.st_size)
    return files


def _read_done(out: Path) -> np.ndarray | None:
    try:
        return zarr.open_group(str(out), mode="r")[C.BLOCK_DONE][:]
    except Exception:  # not created yet, or a marker mid-write: poll again
        return None


def _kill_mid_run(cmd: list[str], out: Path, log: Path, timeout: float = 180.0) -> np.ndarray | None:
    """Start the command, SIGKILL it once some but not all blocks are marked done.
    Returns block_done after the kill, or None when the run finished before it could be killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                done = _read_done(out)
                if done is not None and 0 < done.sum() < len(done):
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.02)
            else:
                pytest.fail(f"extract never marked a block within {timeout}s:\n{log.read_text()[-3000:]}")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    if proc.returncode != -signal.SIGKILL:
        assert proc.returncode == 0, log.read_text()[-3000:]
        return None  # finished before the kill landed
    return _read_done(out)


def test_sigkill_mid_run_then_rerun_gives_identical_store(
    synth_videos: Path, tmp_path, monkeypatch, one_thread
):
    """With PCA: the resumed run reads the stored bases and fidelity (never refits), so the
    store is bit-identical to an uninterrupted one."""
    args = [
        "extract",
        "--data",
        str(synth_videos),
        "--preset",
        "tiny",
        "--encoders",
        "dino",
        "--block-size",
        "1",
        "--batch-size",
        "1",
        "--clips-per-video",
        "2",
        "--num-workers",
        "0",
        "--pca-dims",
        "8",
    ]
    for attempt in range(3):
        out = tmp_path / f"killed{attempt}.zarr"
        done = _kill_mid_run(
            [sys.executable, "-m", "pipeline.cli", *args, "--out", str(out)], out, tmp_path / "killed.log"
        )
        if done is not None:
            break
        shutil.rmtree(out)
    else:
        pytest.fail("three runs finished before a kill could land between two block markers")
    n_blocks = len(done)
    assert n_blocks == 12 and 0 < done.sum() < n_blocks
    assert validate_store(out) and "incomplete" in validate_store(out)[0]
    finished = {b: _block_files(out, b) for b in np.flatnonzero(done)}
    assert all(finished.values())

    killed_attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    assert killed_attrs["derived"]["pca"]["dino"]["dims"] == 8

    # rerun the same command, in this process so every model call can be counted
    real_compute = runner.compute_batch
    computed: list[int] = []

    def counting_compute(frames, *a, **kw):
        computed.append(int(frames.shape[0]))
        return real_compute(frames, *a, **kw)

    for module in (runner, derive, budget):  # the block loop, the PCA fit + fidelity, the size check
        monkeypatch.setattr(module, "compute_batch", counting_compute)
    rerun = CliRunner().invoke(cli_main, [*args, "--out", str(out)])
    assert rerun.exit_code == 0, rerun.output
    assert f"done: {n_blocks}/{n_blocks} blocks" in rerun.output
    # one clip per block and per batch: only the unfinished blocks were computed (no refit) ...
    assert sum(computed) == n_blocks - int(done.sum())
    assert dict(zarr.open_group(str(out), mode="r").attrs)["derived"] == killed_attrs["derived"]
    # ... and the finished blocks' files were left untouched
    assert {b: _block_files(out, b) for b in finished} == finished
    report = json.loads((out / C.REPORT_FILE).read_text())
    assert report["runs"][-1]["blocks_done_after"] == n_blocks
    assert validate_store(out) == []

    for module in (runner, derive, budget):
        monkeypatch.setattr(module, "compute_batch", real_compute)
    reference = tmp_path / "reference.zarr"
    runner.run_extract(
        tiny_config(
            synth_videos,
            reference,
            encoders=["dino"],
            block_size=1,
            batch_size=1,
            clips_per_video=2,
            pca_dims=8,
        )
    )
    expected, got = read_arrays(reference), read_arrays(out)
    assert set(got) == set(expected) and "pca/dino/components" in got
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    ref_attrs = zarr.open_group(str(reference), mode="r").attrs
    assert zarr.open_group(str(out), mode="r").attrs["fingerprint"] == ref_attrs["fingerprint"]


# --------------------------------------------------------------------------- decode failure


def _corrupt_packet(path: Path, decode_index: int) -> None:
    """Overwrite one coded frame in place: the container (and its frame count) stays intact, so
    probing succeeds, but decoding that frame fails."""
    import av

    with av.open(str(path)) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    pos, size = packets[decode_index]
    data = bytearray(path.read_bytes())
    data[pos : pos + size] = b"\xff" * size
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def corrupt_store(synth_videos: Path, tmp_path_factory) -> tuple[Path, int, Path, runner.ExtractResult]:
    """A store extracted from videos where one clip probes fine but fails to decode."""
    tmp = tmp_path_factory.mktemp("corrupt")
    data = tmp / "videos"
    shutil.copytree(synth_videos, data)
    source = V.discover(data)
    bad_index = 3
    bad = Path(source.entries[bad_index].path)
    _corrupt_packet(bad, decode_index=6)  # the clip covers frames 2..9
    assert V.probe_length(source.entries[bad_index]) == 12  # the header still claims 12 frames
    spec = V.ClipSpec(frames=8, stride=1, clips_per_video=1, size=64)
    with pytest.raises(V.VideoDecodeError):
        V.read_clip(source.entries[bad_index], 2, spec)
    out = tmp / "store.zarr"
    result = runner.run_extract(tiny_config(data, out, encoders=["dino"], block_size=2))
    return out, bad_index, bad, result


def test_clip_failing_to_decode_is_marked_invalid(corrupt_store):
    out, bad_index, bad, result = corrupt_store
    assert result.num_clips == 6 and result.skipped == []
    group = zarr.open_group(str(out), mode="r")
    clip = int(np.flatnonzero(group[C.VIDEO_INDEX][:] == bad_index)[0])
    valid = group[C.VALID][:]
    assert valid.tolist() == [0 if i == clip else 1 for i in range(6)]
    assert group[C.BLOCK_DONE][:].all()
    assert not group["targets/dino/values"][clip].any() and not group[C.LATENTS][clip].any()
    report = json.loads((out / C.REPORT_FILE).read_text())
    assert [c["clip"] for c in report["invalid_clips"]] == [clip]
    assert (
        Path(report["invalid_clips"][0]["path"]) == bad and "decode" in report["invalid_clips"][0]["reason"]
    )
    # the fidelity sample leaves the undecodable clip out
    assert report["fidelity"]["dino"]["clips"] == 5
    assert validate_store(out) == []


def test_clip_failing_to_decode_is_not_packed(corrupt_store, tmp_path):
    out, bad_index, _, _ = corrupt_store
    group = zarr.open_group(str(out), mode="r")
    clip = int(np.flatnonzero(group[C.VIDEO_INDEX][:] == bad_index)[0])
    shards = tmp_path / "shards"
    packed = CliRunner().invoke(
        cli_main, ["pack", str(out), "--out", str(shards), "--samples-per-shard", "4"]
    )
    assert packed.exit_code == 0, packed.output
    index = json.loads((shards / C.SHARD_INDEX).read_text())
    assert index["num_samples"] == 5
    urls = [str(shards / s["name"]) for s in index["shards"]]
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        keys.append(int(sample["__key__"]))
        np.testing.assert_array_equal(sample["dino.npy"], group["targets/dino/values"][keys[-1]])
        np.testing.assert_array_equal(sample["dino.scale.npy"], group["targets/dino/scales"][keys[-1]])
    assert sorted(keys) == [i for i in range(6) if i != clip]  # v2 shards hold a seeded permutation
