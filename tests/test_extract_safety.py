"""`pipeline extract` and `pipeline pack` never lose a user's data: refused outputs, one writer at a
time, a full disk that leaves a resumable store, and no decoding worker outliving a kill -9."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr
from click.testing import CliRunner
from helpers import tiny_extract_config

from cache_schema import constants as C
from cache_schema.outputs import LOCK
from pipeline.cli import main
from stages.extract import runner
from stages.pack.packer import PackConfig, run_pack

REPO = Path(__file__).resolve().parents[1]


def extract_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--data", str(data), "--out", str(out), "--preset", "tiny", "--encoders", "dino",
            "--block-size", "2", *extra]  # fmt: skip


def invoke(args: list[str]):
    return CliRunner().invoke(main, args)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_user_files_in_out_are_refused_and_kept(synth_videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "important"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "table.csv").write_text("a,b\n")
    before = tree(out)
    result = invoke(extract_args(synth_videos, out))
    assert result.exit_code == 1 and "notes.txt, sub/" in result.output, result.output
    assert tree(out) == before


@pytest.mark.parametrize("where", ["same", "inside"])
def test_out_equal_to_or_inside_data_is_refused(synth_videos: Path, tmp_path: Path, where) -> None:
    data = tmp_path / "ucf_copy"
    shutil.copytree(synth_videos, data)
    before = tree(data)
    out = data if where == "same" else data / "cache.zarr"
    result = invoke(extract_args(data, out))
    assert result.exit_code == 1 and "--data" in result.output, result.output
    assert tree(data) == before


def test_a_shard_folder_or_a_file_as_out_is_refused(synth_videos: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    runner.run_extract(tiny_extract_config(synth_videos, store, encoders=["dino"]))
    shards = tmp_path / "shards"
    run_pack(PackConfig(cache=str(store), out=str(shards), samples_per_shard=4, progress=False))
    before = tree(shards)
    result = invoke(extract_args(synth_videos, shards))
    assert result.exit_code == 1 and "holds a shard set" in result.output
    result = invoke(extract_args(synth_videos, shards, "--overwrite"))
    assert result.exit_code == 1 and tree(shards) == before
    regular = tmp_path / "out.txt"
    regular.write_text("mine")
    result = invoke(extract_args(synth_videos, regular))
    assert result.exit_code == 1 and "is a file" in result.output and regular.read_text() == "mine"
    # pack into the store folder (a typo) is refused too
    result = invoke(["pack", str(store), "--out", str(store)])
    assert result.exit_code == 1 and "same path as CACHE" in result.output


def test_another_dataset_into_an_existing_store_names_the_field(synth_videos: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    runner.run_extract(tiny_extract_config(synth_videos, store, encoders=["dino"]))
    other = tmp_path / "other"
    shutil.copytree(synth_videos, other)
    next(other.rglob("*.mp4")).unlink()
    result = invoke(extract_args(other, store))
    assert result.exit_code == 1 and "field 'dataset.files" in result.output, result.output
    assert "Traceback" not in result.output
    # --overwrite never touches a folder that also holds a user's file
    (store / "notes.txt").write_text("mine")
    result = invoke(extract_args(other, store, "--overwrite"))
    assert result.exit_code == 1 and "notes.txt" in result.output and (store / "notes.txt").exists()


def test_a_second_extraction_is_refused_naming_the_first(synth_videos: Path, tmp_path: Path) -> None:
    from cache_schema import validate_store

    out = tmp_path / "store.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline.cli", *extract_args(synth_videos, out, "--block-size", "1")]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / LOCK).exists() and first.poll() is None:
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # hold the first writer mid-run, lock taken
    try:
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=240) == 0, first.stderr.read()[-2000:]
    assert second.returncode == 1 and f"being written by `pipeline extract` (pid {first.pid}" in second.stderr
    assert validate_store(out) == []


def test_disk_full_names_the_file_and_resumes(synth_videos: Path, tmp_path: Path, monkeypatch) -> None:
    reference = tmp_path / "reference.zarr"
    runner.run_extract(tiny_extract_config(synth_videos, reference, encoders=["dino"]))
    out = tmp_path / "store.zarr"
    written = {"latent_shards": 0}
    original = zarr.storage.LocalStore.set

    async def set_until_full(self, key, value):
        written["latent_shards"] += "latents/c" in key
        if written["latent_shards"] == 2:  # the disk fills as the second block's latents are written
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(str(self.root)) / key))
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_until_full)
    with pytest.raises(
        runner.ExtractError, match=r"disk full while writing .*store\.zarr/latents/c.* free on that"
    ):
        runner.run_extract(tiny_extract_config(synth_videos, out, encoders=["dino"]))
    monkeypatch.setattr(zarr.storage.LocalStore, "set", original)
    done = zarr.open_group(str(out), mode="r")[C.BLOCK_DONE][:]
    assert 0 < done.sum() < len(done)  # finished blocks kept, the torn one not marked
    runner.run_extract(tiny_extract_config(synth_videos, out, encoders=["dino"]))
    a, b = zarr.open_group(str(reference), mode="r"), zarr.open_group(str(out), mode="r")
    for name in (C.LATENTS, "targets/dino/values", "targets/dino/scales", C.VALID, C.BLOCK_DONE):
        np.testing.assert_array_equal(a[name][:], b[name][:])


def test_kill_9_leaves_no_decoding_workers(synth_videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "store.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline.cli",
           *extract_args(synth_videos, out, "--num-workers", "2", "--block-size", "1", "--batch-size", "1")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    workers: list[psutil.Process] = []
    deadline = time.time() + 120
    while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
        try:
            workers = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    assert len(workers) >= 2, "the extraction never started its decoding workers"
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, [p.pid for p in alive]
