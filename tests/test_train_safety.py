"""`pipeline train` under bad conditions: corrupt samples, failing workers, a killed parent, two
writers, Ctrl-C, bad values, and resumes that read the run's own config."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

import psutil
import pytest
import torch
from helpers import checkpoint_weights, make_shards, subprocess_env, tiny_train_config

from cache_schema import CacheError, RunDir
from cache_schema.checkpoint import CheckpointError, verify_checkpoint, write_manifest
from stages.train import train
from stages.train.data import CorruptSample


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=32, per_shard=8)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train", *args]


def tiny_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return cli("--shards", str(shards), "--out", str(out), "--preset", "tiny", "--device", "cpu",
               "--set", "projector_dim=16", *extra)  # fmt: skip


def run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=subprocess_env(), timeout=timeout)


def invoke(args: list[str]) -> subprocess.CompletedProcess:
    """The same command in this process (click's runner): exit code and stderr, without the
    seconds a fresh interpreter takes to import torch."""
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, args[3:])  # drop "python -m pipeline.cli"
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def corrupt_copy(shards: Path, dest: Path, member_suffix: str = "latent.npy") -> str:
    """Copy the shard set and flip 64 bytes inside one sample's payload; returns that sample's key."""
    shutil.copytree(shards, dest)
    tar_path = dest / "shard-000001.tar"
    with tarfile.open(tar_path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(member_suffix)][2]
    with open(tar_path, "r+b") as fh:
        fh.seek(member.offset_data + 128)
        data = bytearray(fh.read(64))
        fh.seek(member.offset_data + 128)
        fh.write(bytes(b ^ 0xFF for b in data))
    return member.name.split(".")[0]


tiny = partial(tiny_train_config, steps=4, checkpoint_every=2, projector_dim=16)


def test_corrupt_payload_stops_naming_shard_and_key(shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    key = corrupt_copy(shards, bad)
    with pytest.raises(CorruptSample, match=rf"shard-000001.tar sample {key}.*checksum"):
        train(tiny(bad, tmp_path / "run", steps=40), progress=False)


def test_corrupt_sample_with_workers_ends_within_seconds(shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    key = corrupt_copy(shards, bad)
    start = time.time()
    proc = run_cli(tiny_args(bad, tmp_path / "run", "--steps", "60", "--num-workers", "2"), timeout=90)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert time.time() - start < 60
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "shard-000001.tar" in errors[0] and key in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_truncated_shard_is_named_or_skipped(shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    tar = bad / "shard-000002.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2 + 100])  # a copy cut short mid-member
    with pytest.raises(CacheError, match=r"shard shard-000002.tar is corrupt: \d+ bytes on disk, index says"):
        train(tiny(bad, tmp_path / "run", steps=40), progress=False)
    summary = train(tiny(bad, tmp_path / "skip", steps=20, on_corrupt="skip"), progress=False)
    assert summary["skipped"] >= 1 and summary["step"] == 20
    assert any("shard-000002.tar is corrupt" in n for n in summary["notes"])
    keys = [k for r in RunDir(tmp_path / "skip").read_log() for k in r["skipped"]["keys"]]
    assert keys and all("shard-000002.tar" in k for k in keys), keys  # the cut sample, named


def test_skip_logs_every_skipped_key_and_a_count(shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    key = corrupt_copy(shards, bad)
    summary = train(tiny(bad, tmp_path / "run", steps=20, on_corrupt="skip"), progress=False)
    rows = RunDir(tmp_path / "run").read_log()
    keys = [k for r in rows for k in r["skipped"]["keys"]]
    assert summary["skipped"] == rows[-1]["skipped"]["count"] == len(keys) >= 1
    assert all(key in k and "shard-000001.tar" in k for k in keys)


def test_nan_stop_with_workers_does_not_hang(tmp_path: Path) -> None:
    bad = make_shards(tmp_path / "nan", num_samples=16, per_shard=8, nan=True)
    start = time.time()
    proc = run_cli(tiny_args(bad, tmp_path / "run", "--num-workers", "2"), timeout=90)
    assert proc.returncode == 1 and "non-finite loss" in proc.stderr, proc.stderr[-2000:]
    assert time.time() - start < 60


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_loader_workers_die_with_a_killed_parent(shards: Path, tmp_path: Path) -> None:
    args = tiny_args(shards, tmp_path / "run", "--steps", "100000", "--num-workers", "2", "--log-every", "1")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    deadline = time.time() + 60
    while time.time() < deadline and len(RunDir(tmp_path / "run").read_log()) < 2:
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert len(workers) >= 2
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, [p.pid for p in alive]


def test_a_second_writer_is_refused_naming_the_first(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = subprocess.Popen(
        tiny_args(shards, run, "--steps", "100000", "--log-every", "1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(RunDir(run).read_log()) < 1:
            time.sleep(0.2)
        second = run_cli(tiny_args(shards, run, "--steps", "100000", "--resume"))
        assert (
            second.returncode == 1 and "being written by" in second.stderr and str(first.pid) in second.stderr
        )
    finally:
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=60)
    # Ctrl-C: the step finishes, a checkpoint is written, exit code 130
    assert first.returncode == 130, err[-2000:]
    assert RunDir(run).latest_checkpoint() is not None and "SIGINT" in out + err


def test_resume_reads_the_runs_own_config(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = invoke(tiny_args(shards, run, "--steps", "2", "--model", "tiny", "--lambda", "0.25"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # no --preset, no --model: the run's own config (tiny, lambda 0.25, projector_dim 16) is used
    proc = invoke(cli("--out", str(run), "--resume", "--steps", "4"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert RunDir(run).latest_checkpoint().name == "step-0000004"
    assert RunDir(run).read_log()[-1]["align_weight"] == {"dino": 0.25, "sam2": 0.25}
    for flag, value, field in (("--model", "S/2", "model"), ("--projector-dim", "8", "projector_dim"),
                               ("--lambda", "0.5", "align_lambda")):  # fmt: skip
        proc = invoke(cli("--out", str(run), "--resume", "--steps", "6", flag, value))
        assert proc.returncode == 1 and f"cannot change {field}" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_resume_of_a_missing_run_is_refused(tmp_path: Path) -> None:
    proc = invoke(cli("--out", str(tmp_path / "typo"), "--resume"))
    assert proc.returncode == 1 and "no training run at" in proc.stderr


def test_a_torn_log_line_is_repaired_on_resume(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(shards, run, steps=2), progress=False)
    with (run / "log.jsonl").open("a") as fh:
        fh.write('{"step": 3, "loss": 0.')  # a crash mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        train(tiny(shards, run, steps=4, resume=True), progress=False)
    assert [r["step"] for r in RunDir(run).read_log()] == [1, 2, 3, 4]
    # a bad line anywhere else is named with its file and line
    text = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join([text[0], "garbage", *text[1:]]) + "\n")
    with pytest.raises(Exception, match=r"log.jsonl:2"):
        RunDir(run).read_log()


def test_resuming_a_finished_run_at_its_last_checkpoint(shards: Path, tmp_path: Path) -> None:
    """Found by bench/soak.py: a kill after the final checkpoint, then --resume, must load it."""
    run = tmp_path / "run"
    train(tiny(shards, run, steps=2), progress=False)
    summary = train(tiny(shards, run, steps=2, resume=True), progress=False)
    assert summary["step"] == 2 and RunDir(run).latest_checkpoint().name == "step-0000002"


def test_keep_checkpoints_prunes_but_never_latest(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(shards, run, steps=6, checkpoint_every=1, keep_checkpoints=2), progress=False)
    names = [p.name for p in RunDir(run).step_dirs()]
    assert names == ["step-0000005", "step-0000006"]
    assert RunDir(run).latest_checkpoint().name == "step-0000006"


@pytest.mark.parametrize(
    "args,message",
    [
        (("--grad-clip", "-1"), "grad_clip must be >= 0"),
        (("--set", "class_dropout=2"), "class_dropout must be in [0, 1)"),
        (("--batch-size", "0"), "batch_size must be >= 1"),
        (("--device", "tpu"), "device: 'tpu' is not one of"),
        (("--encoders", "dino,dino"), "names one twice"),
        (("--lambda", "dino=-1"), "must be a finite number >= 0"),
    ],
)
def test_bad_values_are_refused_by_validation(shards: Path, tmp_path: Path, args, message) -> None:
    proc = invoke(tiny_args(shards, tmp_path / "run", *args))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_out_holding_user_files_or_a_file_is_refused(shards: Path, tmp_path: Path) -> None:
    folder = tmp_path / "important"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    proc = invoke(tiny_args(shards, folder))
    assert (
        proc.returncode == 1 and "notes.txt" in proc.stderr and (folder / "notes.txt").read_text() == "mine"
    )
    regular = tmp_path / "file.txt"
    regular.write_text("mine")
    proc = invoke(tiny_args(shards, regular))
    assert proc.returncode == 1 and "is a file" in proc.stderr and regular.read_text() == "mine"
    inside = shards / "run"
    proc = invoke(tiny_args(shards, inside))
    assert proc.returncode == 1 and "inside --shards" in proc.stderr and not inside.exists()


def test_checkpoint_payload_is_loadable_after_resume_across_ranks_count(shards: Path, tmp_path: Path) -> None:
    """A checkpoint holds one noise state per rank, all equal: a resume on any number of ranks takes
    the first (tests/test_train_elastic.py resumes on another number of ranks under torchrun)."""
    run = tmp_path / "run"
    train(tiny(shards, run, steps=2), progress=False)
    folder = RunDir(run).latest_checkpoint()
    state = torch.load(folder / "train_state.pt", weights_only=True)
    state["rng"]["noise"] = state["rng"]["noise"] * 2
    torch.save(state, folder / "train_state.pt")
    write_manifest(folder)  # an edit on purpose: record the new checksum
    summary = train(tiny(shards, run, steps=3, resume=True), progress=False)
    assert summary["notes"] == []  # the same number of ranks: nothing to say
    assert json.loads(json.dumps(RunDir(run).read_log()[-1]))["step"] == 3


def test_a_full_disk_while_checkpointing_is_named_and_resumes(
    shards: Path, tmp_path: Path, monkeypatch
) -> None:
    import errno

    from stages.train import state as S

    run = tmp_path / "run"
    train(tiny(shards, run, steps=2, checkpoint_every=2), progress=False)
    original = S.save_file

    def full(tensors, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(S, "save_file", full)
    proc = invoke(cli("--out", str(run), "--resume", "--steps", "4", "--checkpoint-every", "2"))
    assert (
        proc.returncode == 1
        and "disk full while writing" in proc.stderr
        and "projectors.safetensors" in proc.stderr
    )
    assert "free on that filesystem" in proc.stderr and "Traceback" not in proc.stderr
    assert RunDir(run).latest_checkpoint().name == "step-0000002"  # the last good checkpoint is intact
    monkeypatch.setattr(S, "save_file", original)
    train(tiny(shards, run, steps=4, checkpoint_every=2, resume=True), progress=False)
    assert RunDir(run).latest_checkpoint().name == "step-0000004"


# --------------------------------------------------------------------------- damaged checkpoints

MODEL_FILE = "model/diffusion_pytorch_model.safetensors"


def test_checkpoints_carry_checksums_written_before_latest(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(shards, run, steps=2), progress=False)
    folder = RunDir(run).latest_checkpoint()
    manifest = json.loads((folder / "checksums.json").read_text())["files"]
    assert {MODEL_FILE, "ema/config.json", "train_state.pt", "projectors.safetensors"} <= set(manifest)
    assert verify_checkpoint(folder)


@pytest.mark.parametrize("damage", ["truncate-model", "flip-ema", "truncate-state"])
def test_a_damaged_checkpoint_is_named_and_the_previous_offered(
    shards: Path, tmp_path: Path, damage: str
) -> None:
    run = tmp_path / "run"
    proc = invoke(tiny_args(shards, run, "--steps", "4", "--checkpoint-every", "2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = RunDir(run).step_dir(4)
    name = {"truncate-model": MODEL_FILE, "flip-ema": "ema/diffusion_pytorch_model.safetensors",
            "truncate-state": "train_state.pt"}[damage]  # fmt: skip
    path = folder / name
    data = bytearray(path.read_bytes())
    if damage.startswith("truncate"):
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2 : len(data) // 2 + 8] = bytes(
            b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 8]
        )
    path.write_bytes(bytes(data))
    config = (run / "config.yaml").read_bytes()
    proc = invoke(cli("--out", str(run), "--resume", "--steps", "6"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{path} is damaged" in proc.stderr and "--resume-from step-0000002" in proc.stderr
    assert (run / "config.yaml").read_bytes() == config and folder.is_dir()  # nothing touched
    # the previous checkpoint continues the run, exactly as an uninterrupted run from it would
    proc = invoke(cli("--out", str(run), "--resume-from", "step-0000002", "--steps", "4"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = tmp_path / "reference"
    assert invoke(tiny_args(shards, reference, "--steps", "4", "--checkpoint-every", "2")).returncode == 0
    assert verify_checkpoint(RunDir(run).step_dir(4))
    ours, theirs = (checkpoint_weights(RunDir(r).step_dir(4) / "ema") for r in (run, reference))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_an_old_checkpoint_without_checksums_still_resumes(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(shards, run, steps=2), progress=False)
    (RunDir(run).latest_checkpoint() / "checksums.json").unlink()
    summary = train(tiny(shards, run, steps=3, resume=True), progress=False)
    assert summary["step"] == 3
    # and a truncated file of such a checkpoint is still named (no checksum to compare with)
    folder = RunDir(run).latest_checkpoint()
    (folder / "checksums.json").unlink()
    state = folder / "train_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(
        CheckpointError, match=rf"{state} is damaged and cannot be read.*--resume-from step-0000002"
    ):
        train(tiny(shards, run, steps=4, resume=True), progress=False)


def test_pruning_keeps_the_previous_checkpoint_while_the_newest_is_unverified(
    shards: Path, tmp_path: Path, monkeypatch
) -> None:
    from cache_schema import run as run_module

    run = tmp_path / "run"
    train(tiny(shards, run, steps=2, checkpoint_every=1, keep_checkpoints=1), progress=False)
    assert [p.name for p in RunDir(run).step_dirs()] == ["step-0000002"]
    original = run_module.write_manifest

    def damaged_after_writing(folder: Path) -> dict:  # a disk that corrupts what was just written
        manifest = original(folder)
        target = folder / MODEL_FILE
        target.write_bytes(target.read_bytes()[:-10])
        return manifest

    monkeypatch.setattr(run_module, "write_manifest", damaged_after_writing)
    with pytest.raises(
        CheckpointError, match="step-0000003/model/diffusion_pytorch_model.safetensors is damaged"
    ):
        train(tiny(shards, run, steps=3, checkpoint_every=1, keep_checkpoints=1, resume=True), progress=False)
    assert [p.name for p in RunDir(run).step_dirs()] == ["step-0000002", "step-0000003"]


def test_resume_to_fewer_steps_than_the_run_has_is_refused(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = invoke(tiny_args(shards, run, "--steps", "4", "--checkpoint-every", "2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = (run / "config.yaml").read_bytes()
    proc = invoke(cli("--out", str(run), "--resume", "--steps", "2"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--steps 2 is below the run's current step 4" in proc.stderr
    assert (run / "config.yaml").read_bytes() == config
    with pytest.raises(ValueError, match="below the run's current step 4"):
        train(tiny(shards, run, steps=3, resume=True, shuffle_buffer=16), progress=False)
    assert (run / "config.yaml").read_bytes() == config


# --------------------------------------------------------------------------- a real full disk


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 16 MiB tmpfs, room for two tiny checkpoints (root only; skipped with the reason otherwise)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}); needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_while_checkpointing(shards: Path, tmp_path: Path, small_tmpfs: Path) -> None:
    import shutil as sh

    run = small_tmpfs / "run"
    proc = invoke(tiny_args(shards, run, "--steps", "2", "--checkpoint-every", "2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    filler = small_tmpfs / "filler.bin"  # leave ~64 KiB: enough for log rows, not for a checkpoint
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, sh.disk_usage(small_tmpfs).free - 64 * 1024))
    proc = invoke(cli("--out", str(run), "--resume", "--steps", "4", "--checkpoint-every", "2"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and f"disk full while writing {run}/checkpoints/step-0000004.tmp/" in error[0], (
        error
    )
    free = sh.disk_usage(small_tmpfs).free
    assert "KiB free on that filesystem" in error[0] and free < 200 * 1024  # the tmpfs, not /tmp's disk
    assert "last good checkpoint step-0000002 is kept" in error[0] and "--resume" in error[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000002"]
    filler.unlink()
    proc = invoke(cli("--out", str(run), "--resume", "--steps", "4", "--checkpoint-every", "2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = tmp_path / "reference"
    assert invoke(tiny_args(shards, reference, "--steps", "4", "--checkpoint-every", "2")).returncode == 0
    ours, theirs = (checkpoint_weights(RunDir(r).step_dir(4) / "model") for r in (run, reference))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_resume_finds_the_run_from_an_interpolated_config_out(shards: Path, tmp_path: Path) -> None:
    """--resume without --out: the run folder is the config's `out`, with `${...}` resolved as for
    a fresh run."""
    run = Path(f"{shards}-run")
    proc = invoke(tiny_args(shards, run, "--steps", "2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = tmp_path / "resume.yaml"
    config.write_text(f"shards: {shards}\nout: ${{shards}}-run\n")
    proc = invoke(cli("--config", str(config), "--resume", "--steps", "3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert RunDir(run).latest_checkpoint().name == "step-0000003"
