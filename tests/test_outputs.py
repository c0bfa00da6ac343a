"""Output folders: markers, refusals, --overwrite that deletes only our own entries, overlap with
inputs, and the one-writer lock (held, stale, shared by a torchrun job)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache_schema import OutputError, OutputLock, RunDir, prepare_output
from cache_schema.outputs import LOCK, MARKER, clear_artifact, inspect_output, read_lock


def user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "important"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "sub" / "table.csv").write_text("a,b\n1,2\n")
    return folder


def test_a_folder_of_user_files_is_refused_naming_them(tmp_path):
    folder = user_folder(tmp_path)
    with pytest.raises(OutputError, match=r"notes\.txt, sub/"):
        prepare_output(folder, "store")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "sub"]
    assert (folder / "sub" / "table.csv").read_text() == "a,b\n1,2\n"


def test_new_empty_ours_and_other_kinds(tmp_path):
    assert prepare_output(tmp_path / "new", "shards") == "absent"
    assert json.loads((tmp_path / "new" / MARKER).read_text())["kind"] == "shards"
    (tmp_path / "empty").mkdir()
    assert prepare_output(tmp_path / "empty", "run") == "empty"
    assert prepare_output(tmp_path / "new", "shards") == "ours"
    with pytest.raises(OutputError, match="holds a shard set .* not a feature store"):
        prepare_output(tmp_path / "new", "store")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        prepare_output(tmp_path / "file.bin", "store")
    assert (tmp_path / "file.bin").read_bytes() == b"x"


def test_overwrite_deletes_only_our_entries_and_refuses_mixed_folders(tmp_path):
    out = tmp_path / "shards"
    prepare_output(out, "shards")
    (out / "shard-000000.tar").write_bytes(b"tar")
    (out / "index.json").write_text("{}")
    (out / "latents-only").mkdir()
    (out / "latents-only" / "shard-000000.tar").write_bytes(b"tar")
    assert prepare_output(out, "shards", overwrite=True) == "ours"
    assert sorted(p.name for p in out.iterdir()) == [MARKER]
    (out / "index.json").write_text("{}")
    (out / "my-notes.md").write_text("mine")
    with pytest.raises(OutputError, match="my-notes.md, which align4gen did not write"):
        clear_artifact(out, "shards")
    assert (out / "index.json").exists() and (out / "my-notes.md").read_text() == "mine"


@pytest.mark.parametrize("relation", ["same", "inside", "contains"])
def test_out_overlapping_an_input_is_refused(tmp_path, relation):
    data = tmp_path / "videos"
    data.mkdir()
    (data / "a.mp4").write_bytes(b"video")
    out = {"same": data, "inside": data / "out", "contains": tmp_path}[relation]
    with pytest.raises(OutputError, match="--data"):
        prepare_output(out, "store", inputs={"--data": str(data)})
    assert sorted(p.name for p in data.iterdir()) == ["a.mp4"]


def test_legacy_artifacts_are_recognised_by_their_own_files(tmp_path):
    store = tmp_path / "old.zarr"
    store.mkdir()
    (store / "zarr.json").write_text(json.dumps({"zarr_format": 3, "attributes": {"schema_version": 1}}))
    assert inspect_output(store, "store") == "ours"
    other = tmp_path / "plain.zarr"
    other.mkdir()
    (other / "zarr.json").write_text(json.dumps({"zarr_format": 3, "attributes": {}}))
    with pytest.raises(OutputError, match="did not write"):
        inspect_output(other, "store")


_HOLD = """
import sys, time
from cache_schema import OutputLock
with OutputLock(sys.argv[1], "pipeline extract"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "store"
    prepare_output(out, "store")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=rf"being written by `pipeline extract` \(pid {holder.pid} on"):
            OutputLock(str(out), "pipeline train").acquire()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale on this host and is taken over
    assert read_lock(out).pid == holder.pid
    lock = OutputLock(str(out), "pipeline extract").acquire()
    assert "stale lock" in lock.note and read_lock(out).pid == os.getpid()
    lock.release()
    assert not (out / LOCK).exists()


def test_another_hosts_lock_is_stale_only_without_heartbeat(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    info = {
        "host": "elsewhere",
        "pid": 1,
        "started": time.time(),
        "job": "pid:1",
        "command": "pipeline train",
    }
    (out / LOCK).write_text(json.dumps(info))
    with pytest.raises(OutputError, match="elsewhere"):
        OutputLock(str(out), "pipeline train").acquire()
    monkeypatch.setenv("ALIGN4GEN_LOCK_STALE_S", "5")
    old = time.time() - 60
    os.utime(out / LOCK, (old, old))
    lock = OutputLock(str(out), "pipeline train").acquire()
    assert read_lock(out).host == socket.gethostname()
    lock.release()


def test_ranks_of_one_job_share_the_lock(tmp_path):
    first = OutputLock(str(tmp_path), "pipeline train", job="torchrun:abc").acquire()
    OutputLock(str(tmp_path), "pipeline train", job="torchrun:abc").acquire()  # another rank: no error
    with pytest.raises(OutputError):
        OutputLock(str(tmp_path), "pipeline train", job="torchrun:other").acquire()
    first.release()


def test_run_dir_publishes_atomically_and_prunes_but_never_latest(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in (1, 2, 3, 4):
        run.publish_checkpoint(step, lambda folder, s=step: (folder / "state").write_text(str(s)))
    assert run.latest_checkpoint().name == "step-0000004"
    (run.checkpoints / "latest").write_text("step-0000002\n")  # an older checkpoint is `latest`
    removed = run.prune_checkpoints(keep=1)  # (e.g. resumed with --resume-from after step 4 was damaged)
    assert [p.name for p in removed] == ["step-0000001"]  # never `latest`, never one newer than it
    assert [p.name for p in run.step_dirs()] == ["step-0000002", "step-0000003", "step-0000004"]
    with pytest.raises(Exception, match="no training run at"):
        RunDir(tmp_path / "typo").require()


def real_store(out: Path) -> Path:
    """A small zarr store in our layout (latents, targets/dino/values, labels), marked as ours."""
    import numpy as np
    import zarr

    prepare_output(out, "store")
    group = zarr.open_group(str(out), mode="a")
    group.create_array("latents", shape=(4, 3), chunks=(1, 3), shards=(2, 3), dtype="float16")[:] = 1
    group.create_array("targets/dino/values", shape=(4, 5), chunks=(2, 5), dtype="int8")[:] = 2
    group.create_array("labels", shape=(4,), chunks=(2,), dtype="int64")[:] = np.arange(4)
    group.attrs.update({"encoders": [{"name": "dino"}], "schema_version": 2})
    (out / "report.json").write_text("{}")
    return out


@pytest.mark.parametrize(
    ("user_path", "named"),
    [
        ("latents/notes.txt", "latents/notes.txt"),
        ("latents/c/mine.txt", "latents/c/mine.txt"),
        ("targets/mine/", "targets/mine/"),
        ("targets/mine/a.txt", "targets/mine/"),
        ("targets/dino/values/extra/", "targets/dino/values/extra/"),
    ],
)
def test_overwrite_refuses_user_files_inside_our_own_folders(tmp_path, user_path, named):
    out = real_store(tmp_path / "store.zarr")
    ours = set(out.rglob("*"))
    user = out / user_path
    if user_path.endswith("/"):
        user.mkdir(parents=True)
    else:
        user.parent.mkdir(parents=True, exist_ok=True)
        user.write_text("mine")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(OutputError, match=f"also {named}, which align4gen did not write"):
        prepare_output(out, "store", overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    if user.is_file():
        user.unlink()
        user = user.parent
    while user not in ours and user != out:  # the folders the test made for the user's file
        user.rmdir()
        user = user.parent
    prepare_output(out, "store", overwrite=True)
    assert [p.name for p in out.iterdir()] == [MARKER]


def test_overwrite_refuses_a_user_file_in_the_latents_only_folder(tmp_path):
    out = tmp_path / "shards"
    prepare_output(out, "shards")
    (out / "latents-only").mkdir()
    (out / "latents-only" / "shard-000000.tar").write_bytes(b"tar")
    (out / "latents-only" / "mine.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"latents-only/mine\.txt, which align4gen did not write"):
        prepare_output(out, "shards", overwrite=True)
    assert (out / "latents-only" / "mine.txt").read_text() == "mine"
    assert (out / "latents-only" / "shard-000000.tar").exists()


def test_an_empty_or_torn_lock_file_is_stale_after_a_short_grace(tmp_path):
    out = tmp_path / "store"
    prepare_output(out, "store")
    for torn in ("", '{"host": "a", "pid'):
        (out / LOCK).write_text(torn)
        with pytest.raises(
            OutputError, match=r"unreadable lock file .*\.align4gen\.lock .*Retry in a few seconds"
        ):
            OutputLock(str(out), "pipeline extract").acquire()
        old = time.time() - 30  # its writer was killed between creating and filling it
        os.utime(out / LOCK, (old, old))
        lock = OutputLock(str(out), "pipeline extract").acquire()
        assert "took over a stale lock of an unreadable lock file" in lock.note
        assert read_lock(out).pid == os.getpid()
        lock.release()
