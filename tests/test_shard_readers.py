"""A shard set under a running training: `pack --overwrite` refuses while a live `train` reads it
(naming the training), a training stops when its shards change under it anyway, a resume on
re-packed shards says what changed, and `info --verify` checks each shard's real sample count."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import make_shards, subprocess_env, tiny_extract_config, tiny_train_config

from cache_schema import CacheError, validate_shards
from cache_schema import constants as C
from cache_schema.outputs import LOCK
from cache_schema.readers import READERS_DIR, ShardReader, index_summary, live_readers
from pipeline.cli import main
from stages.extract.runner import run_extract
from stages.pack.packer import PackConfig, PackError, run_pack
from stages.train import train
from stages.train.loop import RunSetup, check_shards_unchanged


@pytest.fixture(scope="module")
def store(synth_videos: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("readers") / "store.zarr"
    run_extract(tiny_extract_config(synth_videos, out, encoders=["dino"]))
    return out


def pack(store: Path, out: Path, **over) -> dict:
    return run_pack(PackConfig(cache=str(store), out=str(out), samples_per_shard=2, progress=False, **over))


def test_pack_overwrite_refuses_shards_a_reader_holds(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    first = pack(store, out)
    reader = ShardReader(str(out), "pipeline train", run="runs/b2").acquire()
    try:
        with pytest.raises(PackError, match=r"being read by `pipeline train \(run runs/b2\)` \(pid \d+ on"):
            pack(store, out, overwrite=True, seed=1)
        assert json.loads((out / C.SHARD_INDEX).read_text())["shards"] == first["shards"]  # untouched
    finally:
        reader.release()
    assert live_readers(out) == [] and not (out / READERS_DIR).exists()
    (out / LOCK).write_text("")  # another pack has just created its lock: nothing is cleared
    with pytest.raises(PackError, match="unreadable lock file"):
        pack(store, out, overwrite=True, seed=1)
    assert json.loads((out / C.SHARD_INDEX).read_text())["shards"] == first["shards"]
    (out / LOCK).unlink()
    pack(store, out, overwrite=True, seed=1)  # no reader, no writer: replaced


def test_a_running_training_is_named_by_pack_overwrite(store: Path, tmp_path: Path) -> None:
    shards, run = tmp_path / "shards", tmp_path / "run"
    pack(store, shards)
    args = ["train", "--shards", str(shards), "--out", str(run), "--preset", "tiny", "--device", "cpu",
            "--steps", "100000", "--set", "projector_dim=16", "--set", "sample_every=0"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 600  # a fresh interpreter importing torch on a busy machine
        while time.time() < deadline and not live_readers(shards) and proc.poll() is None:
            time.sleep(0.1)
        assert live_readers(shards), proc.stderr.read() if proc.poll() is not None else "no reader file"
        result = CliRunner().invoke(main, ["pack", str(store), "--out", str(shards), "--overwrite"])
        assert result.exit_code == 1, result.output
        assert f"being read by `pipeline train (run {run})` (pid {proc.pid} on" in result.output
        assert validate_shards(shards, verify_hashes=True) == []
    finally:
        proc.kill()
        proc.wait()


def test_training_stops_when_its_shards_change_under_it(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", num_samples=16, per_shard=8)
    setup = RunSetup({}, {}, {}, None, shards_index=index_summary(shards))
    from cache_schema import RunDir

    check_shards_unchanged(tiny_train_config(shards, tmp_path / "run"), setup, 4, RunDir(tmp_path / "run"))
    shutil.rmtree(shards)
    make_shards(shards, num_samples=16, per_shard=8, seed=1)  # re-packed behind the reader's back
    with pytest.raises(CacheError, match=r"changed while this run was reading it \(the shards' contents"):
        check_shards_unchanged(
            tiny_train_config(shards, tmp_path / "run"), setup, 4, RunDir(tmp_path / "run")
        )


def test_a_resume_on_repacked_shards_says_what_changed(tmp_path: Path, capsys) -> None:
    shards, run = tmp_path / "shards", tmp_path / "run"
    make_shards(shards, num_samples=16, per_shard=8)
    first = train(
        tiny_train_config(shards, run, steps=2, checkpoint_every=2, projector_dim=16), progress=False
    )
    assert first["notes"] == [] and not (shards / READERS_DIR).exists()
    shutil.rmtree(shards)
    make_shards(shards, num_samples=24, per_shard=8, seed=1)
    again = train(
        tiny_train_config(shards, run, steps=3, checkpoint_every=2, projector_dim=16, resume=True),
        progress=False,
    )
    note = f"the shards at {shards} changed since this run last read them (num_samples 16 -> 24, the shards'"
    assert any(n.startswith(note) for n in again["notes"]), again["notes"]
    assert "warning: " + note in capsys.readouterr().err


def test_verify_refuses_sample_counts_edited_to_agree(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", num_samples=16, per_shard=8)
    index = json.loads((shards / C.SHARD_INDEX).read_text())
    index["shards"][0]["samples"] += 1
    index["num_samples"] += 1  # the counts agree with each other, not with the tar
    (shards / C.SHARD_INDEX).write_text(json.dumps(index))
    assert validate_shards(shards) == []  # sizes and sums: nothing to see without re-reading
    errors = validate_shards(shards, verify_hashes=True)
    assert errors == ["index.json is wrong: it says shard shard-000000.tar holds 9 samples, the tar holds 8"]
    result = CliRunner().invoke(main, ["info", str(shards), "--verify"])
    assert result.exit_code == 1 and "the tar holds 8" in result.output
