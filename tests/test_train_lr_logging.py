"""Learning-rate schedules (diffusers' get_scheduler) with an exact resume, and --report-to:
every log.jsonl row reaches TensorBoard or W&B (offline), or nothing."""

from __future__ import annotations

import json
import math
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import checkpoint_weights, make_shards, tiny_train_config

from cache_schema import RunDir
from stages.train import train
from stages.train.trackers import flatten_row

pytestmark = pytest.mark.usefixtures("one_thread")
tiny = partial(tiny_train_config, projector_dim=16)
PEAK = 1e-3


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=32, per_shard=8)


def diffusers_lambda(schedule: str, s: int, warmup: int, total: int) -> float:
    """diffusers.optimization's definitions, written out: the factor at completed steps s."""
    if s < warmup:
        return s / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (s - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lrs(run: Path) -> list[float]:
    return [r["lr"] for r in RunDir(run).read_log()]


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_logged_lr_follows_the_schedule(shards: Path, tmp_path: Path, schedule: str) -> None:
    run = tmp_path / schedule
    train(tiny(shards, run, steps=5, lr_schedule=schedule, lr_warmup=2, report_to="none"), progress=False)
    expected = [PEAK * diffusers_lambda(schedule, s - 1, 2, 5) for s in range(1, 6)]
    np.testing.assert_allclose(lrs(run), expected, rtol=1e-12, atol=1e-15)
    assert not (run / "tensorboard").exists()  # --report-to none


def crashed_copy(run: Path, dest: Path, step: int) -> Path:
    """`run` as a kill -9 after its checkpoint of `step` would have left it: later checkpoints
    gone, `latest` naming `step`, log rows past it still there (resume truncates them)."""
    import shutil

    shutil.copytree(run, dest)
    for folder in (dest / "checkpoints").glob("step-*"):
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    (dest / "checkpoints" / "latest").write_text(f"step-{step:07d}\n")
    (dest / ".align4gen.lock").unlink(missing_ok=True)
    return dest


def test_cosine_resume_continues_the_schedule_exactly_and_refuses_a_new_one(
    shards: Path, tmp_path: Path
) -> None:
    common = dict(lr_schedule="cosine", lr_warmup=3, steps=8, checkpoint_every=5, report_to="none")
    straight = tmp_path / "straight"
    train(tiny(shards, straight, **common), progress=False)
    expected = [PEAK * diffusers_lambda("cosine", s - 1, 3, 8) for s in range(1, 9)]
    np.testing.assert_allclose(lrs(straight), expected, rtol=1e-12, atol=1e-15)
    state = torch.load(straight / "checkpoints" / "step-0000005" / "train_state.pt", weights_only=True)
    assert state["lr_scheduler"]["last_epoch"] == 5

    split = crashed_copy(straight, tmp_path / "split", 5)
    changes = ((dict(lr_schedule="linear"), "lr_schedule"), (dict(lr_warmup=1), "lr_warmup"),
               (dict(steps=10), "steps"))  # fmt: skip
    for change, field in changes:
        with pytest.raises(ValueError, match=f"--resume cannot change {field}"):
            train(tiny(shards, split, resume=True, **{**common, **change}), progress=False)
    train(tiny(shards, split, resume=True, **common), progress=False)
    assert lrs(split) == lrs(straight)
    a, b = (RunDir(path).latest_checkpoint() for path in (straight, split))
    for key, value in checkpoint_weights(a / "model").items():
        torch.testing.assert_close(value, checkpoint_weights(b / "model")[key], rtol=1e-5, atol=1e-6)


def test_tensorboard_gets_every_number_of_every_row(shards: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    train(tiny(shards, run, steps=3, checkpoint_every=3, lr_warmup=1), progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    rows = RunDir(run).read_log()
    expected = {tag for row in rows for tag in flatten_row(row)}
    assert {"train/lr", "train/loss", "align/cos_dino", "align/weight_sam2", "skipped/count"} <= expected
    assert set(events.Tags()["scalars"]) == expected
    for tag in expected:
        logged = {e.step: e.value for e in events.Scalars(tag)}
        want = {row["step"]: flatten_row(row)[tag] for row in rows}
        assert logged.keys() == want.keys(), tag
        np.testing.assert_allclose(list(logged.values()), list(want.values()), rtol=1e-6, err_msg=tag)


def test_wandb_offline_gets_every_row_and_a_resume_continues_its_run(
    shards: Path, tmp_path: Path, monkeypatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "wb"
    train(tiny(shards, run, steps=2, checkpoint_every=2, report_to="wandb"), progress=False)
    run_id = (run / "wandb" / "run-id").read_text().strip()
    train(tiny(shards, run, steps=3, checkpoint_every=2, report_to="wandb", resume=True), progress=False)
    assert (run / "wandb" / "run-id").read_text().strip() == run_id
    offline = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2  # both sessions logged into the same W&B run
    history = read_wandb_history(offline[-1] / f"run-{run_id}.wandb")
    row = RunDir(run).read_log()[-1]
    assert history[-1]["_step"] == row["step"] == 3
    for tag, value in flatten_row(row).items():
        assert history[-1][tag] == pytest.approx(value, rel=1e-6), tag
    assert not (run / "tensorboard").exists()


def wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-log
    chunks in 32 KiB blocks, each with a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last)."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pos, partial = [], 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        partial += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(partial)
            partial = b""
    return records


def read_wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline .wandb file (records parsed with wandb's own protobuf)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for data in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})  # fmt: skip
    return rows


def test_report_to_wandb_without_wandb_is_refused_before_anything_runs(
    shards: Path, tmp_path: Path, monkeypatch
) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    args = ["train", "--shards", str(shards), "--out", str(tmp_path / "run"), "--preset", "tiny",
            "--device", "cpu", "--report-to", "wandb"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Error: report_to: wandb is not installed; install the extra" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_a_new_lr_on_resume_is_the_new_peak_and_older_checkpoints_resume(
    shards: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    common = dict(lr_schedule="linear", lr_warmup=0, steps=4, checkpoint_every=2, report_to="none")
    train(tiny(shards, run, **{**common, "steps": 4}), progress=False)
    split = crashed_copy(run, tmp_path / "split", 2)
    # a checkpoint written before the schedule was saved: the schedule continues from its step
    state_file = split / "checkpoints" / "step-0000002" / "train_state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["lr_scheduler"]
    torch.save(state, state_file)
    (state_file.parent / "checksums.json").unlink()  # such a checkpoint also predates checksums
    train(tiny(shards, split, resume=True, **{**common, "lr": 5e-4}), progress=False)
    assert lrs(split)[:2] == lrs(run)[:2]
    np.testing.assert_allclose(lrs(split)[2:], [5e-4 * diffusers_lambda("linear", s, 0, 4) for s in (2, 3)])
