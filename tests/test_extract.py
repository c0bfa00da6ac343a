"""Stage one on the tiny preset: store layout, values against a direct computation, resume,
bad videos, rank splitting, and packing read back with the stock webdataset reader."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from helpers import decoded_rows, read_arrays, store_targets, tiny_extract_config

from cache_schema import constants as C
from cache_schema import formats, validate_shards, validate_store
from stages.common.models.encoders import load_encoder
from stages.common.models.vae import VAEWrapper
from stages.common.presets import tiny_models
from stages.common.resample import to_target
from stages.extract import runner
from stages.extract.config import ExtractConfig
from stages.pack.packer import PackConfig, run_pack


@pytest.fixture(scope="module")
def full_store(synth_videos: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extract") / "store.zarr"
    runner.run_extract(tiny_extract_config(synth_videos, out))
    return out


def test_store_shapes_and_attributes(full_store: Path):
    assert validate_store(full_store) == []
    group = zarr.open_group(str(full_store), mode="r")
    attrs = dict(group.attrs)
    assert attrs["schema_version"] == 2 and attrs["num_clips"] == 6 and attrs["num_blocks"] == 3
    assert attrs["grid"] == [8, 4, 4] and attrs["latent_shape"] == [4, 8, 8, 8]
    assert [e["name"] for e in attrs["encoders"]] == ["dino", "sam2", "videomae"]
    # int8 by default; VideoMAE (4 tubelets < 8 DiT frames) stays on its own time grid
    assert [(e["format"], e["time_frames"], e["pca"]) for e in attrs["encoders"]] == [
        ("int8", 8, False),
        ("int8", 8, False),
        ("int8", 4, False),
    ]
    assert [e["time_grid"] for e in attrs["spec"]["encoders"]] == ["dit", "dit", "native"]
    assert attrs["spec"]["clips"] == {
        "frames": 8,
        "stride": 1,
        "clips_per_video": 1,
        "placement": "even",
        "seed": 0,
        "hflip": False,
        "size": 64,
    }
    values = group["targets/dino/values"]
    assert values.shape == (6, 8, 4, 4, 32) and values.dtype == np.int8
    assert group["targets/videomae/values"].shape == (6, 4, 4, 4, 32)
    assert (
        group["targets/dino/scales"].shape == (6, 8, 4, 4, 1)
        and group["targets/dino/scales"].dtype == np.float16
    )
    assert group[C.LATENTS].dtype == np.float16 and not group[C.FLIP][:].any()
    assert sorted(set(group[C.LABELS][:].tolist())) == [0, 1]
    assert attrs["class_names"] and len(attrs["class_names"]) == 2
    # one clip per chunk, one block per shard
    assert values.chunks[0] == 1 and values.shards[0] == 2
    for enc in attrs["encoders"]:
        norms = store_targets(group, enc["name"], slice(None)).norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    report = json.loads((full_store / C.REPORT_FILE).read_text())
    assert report["skipped"] == [] and report["invalid_clips"] == []
    # fidelity measured before the first block: on every clip here (6 < --fidelity-clips 32)
    assert set(report["fidelity"]) == {"dino", "sam2", "videomae"}
    for name, fid in report["fidelity"].items():
        assert fid["mean"] == attrs["derived"]["fidelity"][name]["mean"] and fid["explained_variance"] is None
        assert 0.999 <= fid["p1"] <= fid["mean"] <= 1.0 + 1e-6 and fid["clips"] == 6


def test_cached_target_equals_direct_computation(full_store: Path, synth_videos: Path):
    clip = 3
    group, frames = decoded_rows(full_store, synth_videos, [clip], frames=8)
    attrs = dict(group.attrs)
    paths = tiny_models()
    grid = tuple(attrs["grid"])
    for enc in attrs["encoders"]:
        encoder = load_encoder(enc["name"], paths[enc["name"]])
        expected = to_target(encoder.features(frames), grid)
        cached = store_targets(group, enc["name"], slice(clip, clip + 1))
        cos = formats.token_cosines(cached, expected)
        assert float(cos.min()) >= 0.999, enc["name"]
        torch.testing.assert_close(cached, expected, atol=0.02, rtol=0, msg=enc["name"])
    vae = VAEWrapper.load(paths["vae"])
    latent = vae.encode(frames)[0].float().numpy()
    np.testing.assert_allclose(group[C.LATENTS][clip].astype(np.float32), latent, atol=2e-3, rtol=2e-3)


def test_interrupted_run_resumes_to_identical_store(
    full_store: Path, synth_videos: Path, tmp_path, monkeypatch
):
    out = tmp_path / "resumed.zarr"
    cfg = tiny_extract_config(synth_videos, out)
    real_compute = runner.compute_batch
    calls = {"n": 0}

    def dying_compute(*args, **kwargs):
        calls["n"] += 1  # the block loop's calls only (size check and fidelity use models.compute_batch)
        if calls["n"] == 3:  # one batch per block: blocks 0 and 1 computed, killed in block 2
            raise KeyboardInterrupt("simulated kill")
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(runner, "compute_batch", dying_compute)
    with pytest.raises(KeyboardInterrupt):
        runner.run_extract(cfg)
    done = zarr.open_group(str(out), mode="r")[C.BLOCK_DONE][:]
    assert 0 < done.sum() < len(done), "the kill must leave some blocks finished and some not"
    assert validate_store(out) and "incomplete" in validate_store(out)[0]

    computed = {"n": 0}

    def counting_compute(*args, **kwargs):
        computed["n"] += 1
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(runner, "compute_batch", counting_compute)
    result = runner.run_extract(cfg)
    assert result.blocks_computed == int(len(done) - done.sum())  # finished blocks were not recomputed
    expected, got = read_arrays(full_store), read_arrays(out)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert (
        zarr.open_group(str(out)).attrs["fingerprint"]
        == zarr.open_group(str(full_store)).attrs["fingerprint"]
    )
    # a completed store is a no-op
    computed["n"] = 0
    again = runner.run_extract(cfg)
    assert again.blocks_computed == 0 and computed["n"] == 0


def test_bad_videos_are_skipped_and_reported(synth_videos: Path, tmp_path):
    data = tmp_path / "videos"
    shutil.copytree(synth_videos, data)
    bad_dir = data / sorted(p.name for p in data.iterdir() if p.is_dir())[0]
    (bad_dir / "zero.mp4").write_bytes(b"")
    good = next(bad_dir.glob("*.mp4"))
    (bad_dir / "truncated.mp4").write_bytes(good.read_bytes()[:300])
    result = runner.run_extract(tiny_extract_config(data, tmp_path / "store.zarr"))
    assert result.num_clips == 6
    report = json.loads((tmp_path / "store.zarr" / C.REPORT_FILE).read_text())
    reported = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(reported) == {"zero.mp4", "truncated.mp4"}
    assert all(reason for reason in reported.values())


def test_nan_features_stop_the_block_naming_the_video(synth_videos: Path, tmp_path, monkeypatch):
    real_compute = runner.compute_batch

    def nan_compute(*args, **kwargs):
        features = real_compute(*args, **kwargs)
        features.quantities["sam2"][0, 0, 0, 0, 0] = float("nan")
        return features

    monkeypatch.setattr(runner, "compute_batch", nan_compute)
    with pytest.raises(runner.ExtractError, match=r"NaN.*video_\d+\.mp4"):
        runner.run_extract(tiny_extract_config(synth_videos, tmp_path / "nan.zarr"))
    assert zarr.open_group(str(tmp_path / "nan.zarr"), mode="r")[C.BLOCK_DONE][:].sum() == 0


def test_dry_run_writes_nothing_and_projects_the_real_size(full_store: Path, synth_videos: Path, tmp_path):
    out = tmp_path / "never.zarr"
    result = runner.run_extract(tiny_extract_config(synth_videos, out, dry_run=True))
    assert result.dry_run and result.num_clips == 6
    assert not out.exists()
    group = zarr.open_group(str(full_store), mode="r")
    stored = sum(
        obj.nbytes_stored()
        for name, obj in group.members(max_depth=None)
        if isinstance(obj, zarr.Array) and (name == C.LATENTS or name.startswith(C.TARGETS_GROUP))
    )
    projected = result.sizes.by_format("int8").store_bytes
    assert abs(projected - stored) / stored < 0.25
    assert result.sizes.current.format == "int8" and result.sizes.current.clips == 6


def test_existing_store_of_another_config_is_refused(full_store: Path, synth_videos: Path, tmp_path):
    out = tmp_path / "store.zarr"
    shutil.copytree(full_store, out)
    with pytest.raises(runner.ExtractError, match="'clips.clips_per_video'"):
        runner.run_extract(tiny_extract_config(synth_videos, out, clips_per_video=2))
    with pytest.raises(runner.ExtractError, match="'encoders'"):
        runner.run_extract(tiny_extract_config(synth_videos, out, encoders=["dino"]))
    runner.run_extract(tiny_extract_config(synth_videos, out, encoders=["dino"], overwrite=True))
    assert validate_store(out) == [] and [e["name"] for e in zarr.open_group(str(out)).attrs["encoders"]] == [
        "dino"
    ]


def test_two_ranks_write_the_same_store_as_one(full_store: Path, synth_videos: Path, tmp_path):
    out = tmp_path / "ddp.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port, so parallel runs cannot collide
        "--nproc_per_node",
        "2",
        "-m",
        "pipeline.cli",
        "extract",
        "--data",
        str(synth_videos),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--block-size",
        "2",
        "--num-workers",
        "0",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = read_arrays(full_store), read_arrays(out)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_pack_samples_equal_store_rows(full_store: Path, tmp_path):
    out = tmp_path / "shards"
    index = run_pack(PackConfig(cache=str(full_store), out=str(out), samples_per_shard=4, progress=False))
    assert [s["samples"] for s in index["shards"]] == [4, 2]
    assert validate_shards(out, verify_hashes=True) == []
    group = zarr.open_group(str(full_store), mode="r")
    urls = [str(out / s["name"]) for s in index["shards"]]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        clip = int(sample["__key__"])
        np.testing.assert_array_equal(sample["latent.npy"], group[C.LATENTS][clip])
        for enc in group.attrs["encoders"]:
            name = enc["name"]
            np.testing.assert_array_equal(
                sample[C.sample_values(name)], group[f"targets/{name}/values"][clip]
            )
            np.testing.assert_array_equal(
                sample[C.sample_scales(name)], group[f"targets/{name}/scales"][clip]
            )
        assert sample["cls"] == int(group[C.LABELS][clip])
        assert sample["json"]["clip_index"] == clip
        assert sample["json"]["start_frame"] == int(group[C.START_FRAME][clip])
        seen += 1
    assert seen == 6
    # packing is reproducible: same bytes again
    again = run_pack(
        PackConfig(cache=str(full_store), out=str(tmp_path / "again"), samples_per_shard=4, progress=False)
    )
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in index["shards"]]


def test_verify_names_a_corrupted_shard(full_store: Path, tmp_path):
    out = tmp_path / "shards"
    run_pack(PackConfig(cache=str(full_store), out=str(out), samples_per_shard=4, progress=False))
    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    errors = validate_shards(out, verify_hashes=True)
    assert len(errors) == 1 and "shard-000001.tar" in errors[0]


def test_pack_refuses_incomplete_store(full_store: Path, tmp_path):
    out = tmp_path / "partial.zarr"
    shutil.copytree(full_store, out)
    zarr.open_group(str(out), mode="r+")[C.BLOCK_DONE][1] = 0
    from stages.pack.packer import PackError

    with pytest.raises(PackError, match="incomplete"):
        run_pack(PackConfig(cache=str(out), out=str(tmp_path / "s"), progress=False))


def test_replace_keeps_config_dataclass():  # guards the dataclass stays copyable for presets
    cfg = replace(ExtractConfig(), frames=4)
    assert cfg.frames == 4


def test_info_summarises_store_and_verifies_shards(full_store: Path, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    runner_ = CliRunner()
    result = runner_.invoke(main, ["info", str(full_store)])
    assert result.exit_code == 0, result.output
    assert "zarr feature store" in result.output and "blocks 3/3 done" in result.output
    assert "dino" in result.output and "valid        yes" in result.output
    out = tmp_path / "shards"
    assert (
        runner_.invoke(
            main, ["pack", str(full_store), "--out", str(out), "--samples-per-shard", "3"]
        ).exit_code
        == 0
    )
    result = runner_.invoke(main, ["info", str(out), "--verify"])
    assert result.exit_code == 0 and "all shards match their sha256" in result.output
    (out / "shard-000000.tar").write_bytes(b"x" * (out / "shard-000000.tar").stat().st_size)
    result = runner_.invoke(main, ["info", str(out), "--verify"])
    assert result.exit_code != 0 and "shard-000000.tar is corrupt" in result.output


def test_fsspec_url_for_the_store(synth_videos: Path):
    """Object storage goes through fsspec: an in-memory filesystem stands in for s3:// or gs://."""
    import fsspec

    store = "memory://extract-url/store.zarr"
    cfg = tiny_extract_config(
        synth_videos, store, encoders=["dino"], block_size=3, pca_dims=8, target_format="int4"
    )
    runner.run_extract(cfg)
    assert validate_store(store) == []
    group = zarr.open_group(store, mode="r")
    assert group["pca/dino/components"].shape == (8, 32) and group["targets/dino/values"].shape[-1] == 4
    fs = fsspec.filesystem("memory")
    assert fs.exists("/extract-url/store.zarr/report.json")
    fs.rm("/extract-url", recursive=True)


def test_fsspec_urls_for_store_and_shards(synth_videos: Path):
    """The store and the shards both on an fsspec URL (needs the v2 packer)."""
    import fsspec

    store, shards = "memory://extract-test/store.zarr", "memory://extract-test/shards"
    cfg = tiny_extract_config(synth_videos, store, encoders=["dino"], block_size=3)
    runner.run_extract(cfg)
    assert validate_store(store) == []
    index = run_pack(
        PackConfig(cache=store, out=shards, samples_per_shard=4, progress=False, scheduler="synchronous")
    )
    assert index["num_samples"] == 6 and validate_shards(shards, verify_hashes=True) == []
    fs = fsspec.filesystem("memory")
    assert fs.exists("/extract-test/store.zarr/report.json")
    fs.rm("/extract-test", recursive=True)


def test_pack_on_a_dask_distributed_scheduler(full_store: Path, tmp_path):
    """`--scheduler ADDRESS` sends the shard tasks to a dask.distributed cluster (here in-process)."""
    from dask.distributed import LocalCluster

    local = run_pack(
        PackConfig(cache=str(full_store), out=str(tmp_path / "local"), samples_per_shard=4, progress=False)
    )
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        index = run_pack(
            PackConfig(
                cache=str(full_store),
                out=str(tmp_path / "cluster"),
                samples_per_shard=4,
                scheduler=cluster.scheduler_address,
                progress=False,
            )
        )
    assert [s["sha256"] for s in index["shards"]] == [s["sha256"] for s in local["shards"]]
