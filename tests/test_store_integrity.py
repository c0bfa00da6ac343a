"""A damaged feature store is found, named and repaired, never read as zeros: a deleted chunk, flipped
bytes inside a chunk and garbage array metadata are caught by `info --verify`, by `pack` (naming the
array, the block and the rows) and by an `extract` rerun (which redoes the block); a store written
before the checksums existed still works. Also: a full disk (a real small tmpfs) names the file and
the free space of its own filesystem, and `pack --scheduler processes` leaves no process behind
after kill -9."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from click.testing import CliRunner
from helpers import read_arrays, subprocess_env, tiny_extract_config

from cache_schema import constants as C
from cache_schema import validate_shards
from pipeline.cli import main
from stages.extract import runner
from stages.pack.packer import PackConfig, PackError, run_pack

ARRAYS = (C.LATENTS, C.values_path("dino"), C.scales_path("dino"), C.norms_path("dino"))


@pytest.fixture(scope="module")
def pristine(synth_videos: Path, tmp_path_factory) -> Path:
    """A finished store of 6 clips in 3 blocks of 2 (never modified: tests damage copies)."""
    out = tmp_path_factory.mktemp("integrity") / "store.zarr"
    runner.run_extract(tiny_extract_config(synth_videos, out, encoders=["dino"]))
    return out


def copy_store(pristine: Path, tmp_path: Path) -> Path:
    out = tmp_path / "store.zarr"
    shutil.copytree(pristine, out)
    return out


def chunk_file(store: Path, array: str, block: int) -> Path:
    """The file of one block (one zarr shard) of a per-clip array."""
    path = store / array / "c" / str(block)
    return path if path.is_file() else next(f for f in sorted(path.rglob("*")) if f.is_file())


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def cli_process(*args: str) -> subprocess.CompletedProcess:
    """The command in its own interpreter: what a user sees, exit-time messages included."""
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)


def rerun(synth_videos: Path, store: Path) -> runner.ExtractResult:
    return runner.run_extract(tiny_extract_config(synth_videos, store, encoders=["dino"]))


def assert_same_arrays(a: Path, b: Path) -> None:
    left, right = read_arrays(a), read_arrays(b)
    assert sorted(left) == sorted(right)
    for name in left:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)


@pytest.mark.parametrize("array", ARRAYS)
def test_a_deleted_chunk_is_named_by_info_and_pack(pristine: Path, tmp_path: Path, array: str) -> None:
    store = copy_store(pristine, tmp_path)
    chunk_file(store, array, 1).unlink()
    result = cli("info", str(store), "--verify")
    assert result.exit_code == 1 and "valid        yes" not in result.output
    assert f"{array} block 1 (rows 2-3): row(s) 2, 3 fail their checksum" in result.output, result.output
    with pytest.raises(PackError) as err:
        run_pack(PackConfig(cache=str(store), out=str(tmp_path / "shards"), progress=False))
    message = str(err.value)
    assert f"{array} block 1 (rows 2-3): row " in message and "fails its checksum" in message
    assert "Rerun the same `pipeline extract` command" in message
    assert not (tmp_path / "shards" / C.SHARD_INDEX).exists()


def test_an_extract_rerun_redoes_a_block_with_a_deleted_chunk(
    pristine: Path, synth_videos: Path, tmp_path: Path
) -> None:
    store = copy_store(pristine, tmp_path)
    chunk_file(store, C.LATENTS, 1).unlink()
    chunk_file(store, C.LABELS, 2).unlink()  # clip metadata is checked (and rewritten) too
    result = cli(
        "extract", "--data", str(synth_videos), "--out", str(store), "--preset", "tiny",
        "--encoders", "dino", "--block-size", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "warning: latents block 1 (rows 2-3): row(s) 2, 3 fail their checksum" in result.output
    assert "labels block 2 (rows 4-5)" in result.output and "store complete" not in result.output
    assert_same_arrays(pristine, store)
    assert "verified     all 3 finished blocks match" in cli("info", str(store), "--verify").output
    again = rerun(synth_videos, store)
    assert again.blocks_computed == 0 and again.redone == [] and again.verifiable


@pytest.mark.parametrize("array", (C.values_path("dino"), C.norms_path("dino")))
def test_flipped_bytes_in_a_chunk_are_named_and_redone(
    pristine: Path, synth_videos: Path, tmp_path: Path, array: str
) -> None:
    store = copy_store(pristine, tmp_path)
    path = chunk_file(store, array, 2)
    data = bytearray(path.read_bytes())
    for i in range(40, 48):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    packed = cli_process("pack", str(store), "--out", str(tmp_path / "shards"))
    assert packed.returncode == 1, packed.stderr
    assert f"{array} block 2 (rows 4-5): row " in packed.stderr, packed.stderr
    assert "Traceback" not in packed.stderr and "Exception ignored" not in packed.stderr
    assert [line for line in packed.stderr.splitlines() if line.startswith("Error:")] == [
        packed.stderr.strip().splitlines()[-1]
    ]
    result = rerun(synth_videos, store)
    assert result.blocks_computed == 1 and f"{array} block 2 (rows 4-5)" in result.redone[0]
    assert_same_arrays(pristine, store)


def test_garbage_array_metadata_is_one_error_naming_the_file(
    pristine: Path, synth_videos: Path, tmp_path: Path
) -> None:
    store = copy_store(pristine, tmp_path)
    (store / C.LATENTS / "zarr.json").write_text("garbage")
    named = f"{store}/latents/zarr.json is not readable zarr metadata"
    for args in (("info", str(store)), ("pack", str(store), "--out", str(tmp_path / "shards"))):
        done = cli_process(*args)
        assert done.returncode == 1, done.stderr
        assert named in done.stderr and "Traceback" not in done.stderr, done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
        assert "Task exception" not in done.stderr and len(errors) == 1, done.stderr
    with pytest.raises(runner.ExtractError, match=f"{named}.*cannot be resumed. Pass --overwrite"):
        rerun(synth_videos, store)
    result = runner.run_extract(tiny_extract_config(synth_videos, store, encoders=["dino"], overwrite=True))
    assert result.blocks_computed == 3
    assert_same_arrays(pristine, store)


def test_a_store_without_checksums_still_works(pristine: Path, synth_videos: Path, tmp_path: Path) -> None:
    """What a store written before the checksums existed looks like: no clip_crc, no attribute."""
    store = copy_store(pristine, tmp_path)
    shutil.rmtree(store / C.CLIP_CRC)
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"][C.INTEGRITY_ATTR]
    (store / "zarr.json").write_text(json.dumps(meta))
    result = cli("info", str(store), "--verify")
    assert result.exit_code == 0 and "not verifiable" in result.output, result.output
    run_pack(PackConfig(cache=str(store), out=str(tmp_path / "shards"), progress=False))
    assert validate_shards(tmp_path / "shards", verify_hashes=True) == []
    again = rerun(synth_videos, store)
    assert again.blocks_computed == 0 and not again.verifiable


# --------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A real tmpfs of `size` at `path` (root only); skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def test_extract_into_a_full_tmpfs_names_the_file_and_resumes_exactly(
    pristine: Path, synth_videos: Path, tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path / "small", "120k") as small:
        out = small / "store.zarr"
        config = tiny_extract_config(synth_videos, out, encoders=["dino"], disk_budget="1G")
        with pytest.raises(runner.ExtractError) as err:
            runner.run_extract(config)
        message = str(err.value)
        assert message.startswith(f"disk full while writing {out}/"), message
        free = message.split(": ", 1)[1].split(" free on that filesystem")[0]
        assert free.endswith(("KiB", " B")), message  # the tmpfs's free space, not another filesystem's
        grow(small, "4m")
        runner.run_extract(config)
        assert_same_arrays(pristine, out)


def test_pack_into_a_full_tmpfs_names_the_file_and_resumes_exactly(pristine: Path, tmp_path: Path) -> None:
    reference = run_pack(
        PackConfig(cache=str(pristine), out=str(tmp_path / "ref"), samples_per_shard=2, progress=False)
    )
    with small_tmpfs(tmp_path / "small", "100k") as small:
        out = small / "shards"
        done = cli_process("pack", str(pristine), "--out", str(out), "--samples-per-shard", "2")
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "Exception ignored" not in done.stderr
        error = done.stderr.strip().splitlines()[-1]
        assert error.startswith(f"Error: disk full while writing {out}/") and ".tar: " in error, error
        assert " KiB free on that filesystem" in error or " B free on that filesystem" in error
        grow(small, "4m")
        index = run_pack(PackConfig(cache=str(pristine), out=str(out), samples_per_shard=2, progress=False))
        assert [s["sha256"] for s in index["shards"]] == [s["sha256"] for s in reference["shards"]]


# --------------------------------------------------------------------------- kill -9


def test_kill_9_of_pack_with_processes_leaves_no_process(pristine: Path, tmp_path: Path) -> None:
    args = ["pack", str(pristine), "--out", str(tmp_path / "shards"), "--scheduler", "processes",
            "--workers", "2", "--samples-per-shard", "1"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args], env=subprocess_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    children: list[psutil.Process] = []
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # the resource tracker and a spawn worker
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(proc.pid).children(recursive=True)
        if len(children) >= 2:
            break
        time.sleep(0.02)
    assert len(children) >= 2, "pack never started its process pool"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    assert not alive, [(p.pid, p.cmdline()[-2:]) for p in alive]
