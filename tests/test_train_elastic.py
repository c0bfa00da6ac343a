"""Elastic resume: a run checkpointed on N ranks continues on M ranks with the same sequence of
global batches (torchrun, gloo on the CPU), every epoch a permutation of the shard set, the global
batch kept (per-rank batch = global / M, refused when it does not divide), and weights equal to
an uninterrupted run's up to floating-point reduction order."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import checkpoint_weights, make_shards, subprocess_env, tiny_train_config

from cache_schema import RunDir, read_index, read_shard_layout
from cache_schema.tars import iter_samples, open_shard
from stages.train import train
from stages.train.config import resume_batch_size
from stages.train.data import CorruptSample, LoaderSpec, RankBatches, shard_counts, shard_urls
from stages.train.loop import SAMPLE_KEYS_ENV

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLES, GLOBAL_BATCH, STEPS, HALF = 20, 8, 6, 3  # 48 samples: 2.4 epochs, batches straddle epochs
tiny = partial(tiny_train_config, steps=STEPS, checkpoint_every=HALF, shuffle_buffer=8, projector_dim=16)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=SAMPLES, per_shard=8)


@pytest.fixture(scope="module")
def straight(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run: one rank, the whole global batch."""
    run = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SAMPLE_KEYS_ENV, "1")
        torch.set_num_threads(1)
        train(tiny(shards, run, batch_size=GLOBAL_BATCH), progress=False)
    return run


def all_keys(shards: Path) -> set[str]:
    """Every sample key of the shard set, read from the tars."""
    keys = set()
    for shard in read_index(shards)["shards"]:
        with open_shard(str(shards / shard["name"])) as fh:
            keys.update(s["__key__"] for s in iter_samples(fh, shard["name"]))
    assert len(keys) == SAMPLES
    return keys


def batch_keys(run: Path) -> list[list[str]]:
    """The keys of every global micro-batch, in training order, from log.jsonl."""
    return [batch for row in RunDir(run).read_log() for batch in row["sample_keys"]]


def assert_epochs_are_permutations(batches: list[list[str]], everything: set[str]) -> None:
    flat = [k for batch in batches for k in batch]
    for start in range(0, len(flat) - SAMPLES + 1, SAMPLES):
        epoch = flat[start : start + SAMPLES]
        assert sorted(epoch) == sorted(everything), f"epoch at {start} repeats or misses a sample"


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "pipeline.cli", "train", *args, "--device", "cpu"]
    env = {**subprocess_env(), SAMPLE_KEYS_ENV: "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def assert_same_weights(a: Path, b: Path) -> None:
    """Equal up to float reduction order (one rank's mean over 8 vs two ranks' all-reduced means
    over 4): the largest difference measured is 3e-8; the tolerance is 30x that."""
    ca, cb = RunDir(a).latest_checkpoint(), RunDir(b).latest_checkpoint()
    assert ca.name == cb.name == f"step-{STEPS:07d}"
    for part in ("model", "ema"):
        wa, wb = checkpoint_weights(ca / part), checkpoint_weights(cb / part)
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=f"{part}.{key}")


def test_the_order_is_the_same_on_any_number_of_ranks_and_workers(shards: Path) -> None:
    index = read_shard_layout(shards)
    spec = LoaderSpec(shard_urls(str(shards), index), shard_counts(index), seed=0, batch_size=GLOBAL_BATCH,
                      batches_per_step=1, shuffle_buffer=8)  # fmt: skip

    def global_batches(world: int, workers: int, start: int, n: int) -> list[list[str]]:
        per_rank = []
        for rank in range(world):
            part = LoaderSpec(**{**spec.__dict__, "batch_size": GLOBAL_BATCH // world, "rank": rank,
                                 "world_size": world, "num_workers": workers})  # fmt: skip
            loader = torch.utils.data.DataLoader(
                RankBatches(part, start), batch_size=None, num_workers=workers
            )
            it = iter(loader)
            per_rank.append([next(it)["keys"] for _ in range(n)])
            del it
        return [[k for rank in per_rank for k in rank[j]] for j in range(n)]

    one = global_batches(1, 0, 0, 6)
    assert global_batches(2, 0, 0, 6) == global_batches(4, 0, 0, 6) == global_batches(2, 2, 0, 6) == one
    assert global_batches(2, 0, 3, 3) == one[3:]  # a start position, no replay
    assert_epochs_are_permutations(one, all_keys(shards))
    assert one[0] != sorted(one[0])  # shuffled, not the shards' order
    other_seed = RankBatches(LoaderSpec(**{**spec.__dict__, "seed": 1}), 0)
    assert next(iter(other_seed))["keys"] != one[0]


def test_two_ranks_resume_on_one(shards: Path, straight: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    proc = torchrun("--shards", str(shards), "--out", str(run), "--preset", "tiny", "--batch-size", "4",
                    "--steps", str(HALF), "--checkpoint-every", str(HALF), "--set", "shuffle_buffer=8",
                    "--set", "projector_dim=16")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(RunDir(run).latest_checkpoint() / "train_state.pt", weights_only=True)
    assert state["loader"] == {"order": "global-v1", "seed": 0, "position": HALF * GLOBAL_BATCH, "epoch": 1,
                               "samples_per_epoch": SAMPLES, "global_batch": GLOBAL_BATCH, "world_size": 2}  # fmt: skip
    monkeypatch.setenv(SAMPLE_KEYS_ENV, "1")
    summary = train(tiny(shards, run, batch_size=4, resume=True), progress=False)
    assert summary["notes"] == [
        "resumed on 1 rank(s) from 2: the global batch stays 8 (8 per rank) and the data order continues "
        "exactly at sample 24 (epoch 1); the weights follow an uninterrupted run up to floating-point "
        "reduction order"
    ]
    rows = RunDir(run).read_log()
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["samples_seen"] == r["step"] * GLOBAL_BATCH for r in rows)
    assert batch_keys(run) == batch_keys(straight)
    assert_epochs_are_permutations(batch_keys(run), all_keys(shards))
    assert_same_weights(straight, run)


def test_one_rank_resumes_on_two(shards: Path, straight: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    monkeypatch.setenv(SAMPLE_KEYS_ENV, "1")
    train(tiny(shards, run, batch_size=GLOBAL_BATCH, steps=HALF), progress=False)
    proc = torchrun("--out", str(run), "--resume", "--steps", str(STEPS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: resumed on 2 rank(s) from 1: the global batch stays 8 (4 per rank)" in proc.stdout
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["batch_size"], config["world_size"]) == (4, 2)  # their product: the global batch
    assert batch_keys(run) == batch_keys(straight)
    assert_same_weights(straight, run)
    # the global batch of 8 does not divide by 3 ranks; 7 per rank on 2 ranks changes it
    with pytest.raises(ValueError, match="--resume on 3 rank"):
        resume_batch_size(config, 4, 3)
    proc = torchrun(
        "--out", str(run), "--resume", "--steps", str(STEPS + 1), "--batch-size", "7", timeout=120
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode != 0 and errors, proc.stderr[-3000:]
    assert errors[0] == (
        "Error: --resume cannot change the global batch (run: batch_size 4 x 2 rank(s) = 8, now: batch_size 7 "
        "x 2 rank(s) = 14): the data order depends on it. Omit --batch-size to train 4 per rank"
    )


def test_the_resume_batch_keeps_the_global_batch_or_says_why() -> None:
    run = {"batch_size": 4, "world_size": 2}
    assert resume_batch_size(run, 4, 1) == 8 and resume_batch_size(run, 4, 4) == 2
    assert resume_batch_size(run, 1, 8) == 1  # an explicit per-rank batch that keeps the global batch
    assert resume_batch_size({"batch_size": 4}, 4, 2) == 4  # a run from before elastic resume
    with pytest.raises(ValueError) as refused:
        resume_batch_size(run, 4, 3)
    assert str(refused.value) == (
        "--resume on 3 rank(s) cannot keep the run's global batch of 8 samples (run: batch_size 4 x 2 "
        "rank(s) = 8): 8 does not divide by 3. Resume on a number of ranks that divides it (1, 2, 4, 8)"
    )
    with pytest.raises(ValueError, match=r"now: batch_size 3 x 3 rank\(s\) = 9\).*divides 8"):
        resume_batch_size(run, 3, 3)


def test_a_corrupt_shard_under_skip_leaves_no_batch_empty(shards: Path, tmp_path: Path) -> None:
    """Batches of one: a slot whose sample is in an emptied shard takes the next good position;
    every skip is named; under stop the first one ends the stream naming the shard."""
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    (bad / "shard-000001.tar").write_bytes(b"")  # every sample of this shard is gone
    index = read_shard_layout(bad)
    spec = LoaderSpec(shard_urls(str(bad), index), shard_counts(index), seed=0, batch_size=1,
                      batches_per_step=1, shuffle_buffer=8, on_corrupt="skip")  # fmt: skip
    batches = list(itertools.islice(RankBatches(spec, 0), SAMPLES))
    with open_shard(str(shards / "shard-000001.tar")) as fh:
        lost = {s["__key__"] for s in iter_samples(fh, "shard-000001.tar")}
    assert all(b["batch_size"] == 1 and b["keys"][0] not in lost for b in batches)
    skipped = [m for b in batches for m in b["skipped"]]
    assert len(skipped) >= len(lost) and all(
        m.startswith("shard shard-000001.tar sample #") and "the tar holds 0 samples" in m for m in skipped
    )
    with pytest.raises(CorruptSample, match="shard shard-000001.tar sample #"):
        list(itertools.islice(RankBatches(replace(spec, on_corrupt="stop"), 0), SAMPLES))
