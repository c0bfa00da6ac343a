"""Stage two on tiny v2 shards: finite losses, alignment signal, exact resume, no encoder imports,
DDP with two gloo ranks, refusal of mismatched caches, NaN stop, SIGTERM checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LATENT_SHAPE, checkpoint_weights, make_shards, subprocess_env, tiny_train_config

import cache_schema
from cache_schema import RunDir, read_shard_layout
from stages.train import NonFiniteLoss, train


def read_log(run: Path) -> list[dict]:
    return RunDir(run).read_log()


def latest_checkpoint(run: Path):
    return RunDir(run).latest_checkpoint()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


tiny = partial(tiny_train_config, shuffle_buffer=16, projector_dim=64)


def test_a_few_steps_write_the_run_directory(shards: Path, tmp_path: Path) -> None:
    summary = train(tiny(shards, tmp_path / "run"), progress=False)
    run = tmp_path / "run"
    rows = read_log(run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for row in rows:
        assert np.isfinite([row["loss"], row["flow_loss"], row["align_loss"], row["grad_norm"]]).all()
        assert set(row["cos_sim"]) == {"dino", "sam2"}
        assert row["lr"] == pytest.approx(1e-3) and row["samples_per_s"] > 0
    # the loss is the flow loss plus the weighted alignment loss: lambda x mean over encoders of -cos
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["flow_loss"] + rows[-1]["align_loss"], rel=1e-4)
    assert rows[-1]["align_loss"] == pytest.approx(
        -0.5 * np.mean(list(rows[-1]["cos_sim"].values())), rel=1e-4
    )
    assert rows[-1]["align_weight"] == {"dino": 0.5, "sam2": 0.5}
    assert summary["align_depth"] == 1  # default_align_depth(4) for the tiny model

    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    index = json.loads((shards / "index.json").read_text())
    assert cfg["vae_spec"]["id"] == "test/vae" and cfg["vae_spec"]["scale"] == pytest.approx(0.18215)
    assert cfg["expect_fingerprint"] == index["fingerprint"] and cfg["encoders"] == ["dino", "sam2"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000006"
    step_dir = latest_checkpoint(run)
    for part in ("model/config.json", "ema/config.json", "projectors.safetensors", "train_state.pt"):
        assert (step_dir / part).is_file(), part
    assert (
        list((step_dir / "model").glob("*.safetensors")) and (run / "checkpoints" / "step-0000003").is_dir()
    )
    assert list((run / "tensorboard").glob("events.out.tfevents.*")) and (run / "loss.png").stat().st_size > 0

    # the saved inference model is a plain VideoDiT: no projector weights inside
    from stages.common.models.dit import VideoDiT

    ema = VideoDiT.from_pretrained(step_dir / "ema")
    assert not any("projector" in k for k in ema.state_dict())
    assert ema.config.num_classes == 2 and ema.config.in_channels == 4
    # a second run into the same directory without --resume is refused
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny(shards, run), progress=False)


def test_alignment_raises_cosine_similarity_only_when_on(shards: Path, tmp_path: Path) -> None:
    def cos_curve(lam: float) -> list[float]:
        out = tmp_path / f"lam{lam}"
        train(tiny(shards, out, steps=30, checkpoint_every=30, align_lambda=lam), progress=False)
        return [float(np.mean(list(r["cos_sim"].values()))) for r in read_log(out)]

    on, off = cos_curve(0.5), cos_curve(0.0)
    gain_on = np.mean(on[-5:]) - np.mean(on[:3])
    gain_off = np.mean(off[-5:]) - np.mean(off[:3])
    assert gain_on > 0.2, on
    assert gain_on > gain_off + 0.15, (on, off)
    # with lambda 0 the alignment term contributes nothing to the loss
    row = read_log(tmp_path / "lam0.0")[-1]
    assert row["loss"] == pytest.approx(row["flow_loss"], rel=1e-5)


def test_resume_reproduces_a_straight_run(shards: Path, tmp_path: Path) -> None:
    # Grad accumulation, and a stop at step 5 inside the 8-step loader segment, so the resumed
    # loader must replay the part of the segment already consumed.
    common = dict(checkpoint_every=8, grad_accum=2, batch_size=3)
    train(tiny(shards, tmp_path / "straight", steps=8, **common), progress=False)
    train(tiny(shards, tmp_path / "split", steps=5, **common), progress=False)
    assert latest_checkpoint(tmp_path / "split").name == "step-0000005"
    train(tiny(shards, tmp_path / "split", steps=8, resume=True, **common), progress=False)
    a = latest_checkpoint(tmp_path / "straight")
    b = latest_checkpoint(tmp_path / "split")
    assert a.name == b.name == "step-0000008"
    for part in ("model", "ema"):
        wa, wb = checkpoint_weights(a / part), checkpoint_weights(b / part)
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")
    la, lb = read_log(tmp_path / "straight"), read_log(tmp_path / "split")
    assert [r["step"] for r in lb] == list(range(1, 9))
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-5)


def test_mismatched_cache_is_refused_naming_the_field(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(cache_schema.CacheMismatch, match="fingerprint"):
        train(tiny(shards, tmp_path / "a", expect_fingerprint="0" * 64), progress=False)
    with pytest.raises(cache_schema.CacheMismatch, match="encoders"):
        train(tiny(shards, tmp_path / "b", encoders=["dino", "videomae"]), progress=False)
    # a resumed run refuses shards with another fingerprint than the one it was trained on
    train(tiny(shards, tmp_path / "c", steps=2, checkpoint_every=2), progress=False)
    with pytest.raises(ValueError, match="encoders"):
        train(tiny(shards, tmp_path / "c", steps=4, resume=True, encoders=["dino"]), progress=False)
    other = make_shards(tmp_path / "other", num_samples=16, spec_extra={"seed": 1})
    with pytest.raises(cache_schema.CacheMismatch, match="fingerprint"):
        train(tiny(other, tmp_path / "c", steps=4, resume=True), progress=False)


def test_encoder_subset_trains_one_projector(shards: Path, tmp_path: Path) -> None:
    summary = train(tiny(shards, tmp_path / "run", steps=2, encoders=["sam2"]), progress=False)
    assert summary["encoders"] == ["sam2"]
    assert set(read_log(tmp_path / "run")[-1]["cos_sim"]) == {"sam2"}


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(shards, run, steps=2, checkpoint_every=2), progress=False)
    # same spec (so the same fingerprint) but poisoned latents
    bad = make_shards(tmp_path / "bad", num_samples=16, nan=True)
    with pytest.raises(NonFiniteLoss, match="step 3"):
        train(tiny(bad, run, steps=4, checkpoint_every=1, resume=True), progress=False)
    assert latest_checkpoint(run).name == "step-0000002"
    assert torch.isfinite(
        torch.stack([v.float().sum() for v in checkpoint_weights(latest_checkpoint(run) / "model").values()])
    ).all()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train", *args]


def test_cli_run_imports_no_encoder_code(shards: Path, tmp_path: Path) -> None:
    probe = (
        "import sys, json, runpy\n"
        "sys.argv = ['pipeline'] + sys.argv[1:]\n"
        "from pipeline.cli import main\n"
        "try:\n"
        "    main(standalone_mode=False)\n"
        "finally:\n"
        # encoder model code (diffusers' optional peft import pulls transformers.models.auto: not an encoder)
        "    enc = tuple('transformers.models.' + n for n in ('dinov2', 'sam2', 'videomae', 'umt5', 't5'))\n"
        "    bad = [m for m in sys.modules if m == 'timm' or m.startswith(('timm.', *enc,\n"
        "           'stages.common.models.encoders', 'stages.common.models.hog', 'stages.extract'))]\n"
        "    print('ENCODER_MODULES=' + json.dumps(bad))\n"
    )
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-c",
        probe,
        "train",
        "--shards",
        str(shards),
        "--out",
        str(run),
        "--preset",
        "tiny",
    ]
    cmd += ["--steps", "2", "--device", "cpu", "--set", "projector_dim=32"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=subprocess_env(), timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ENCODER_MODULES="))
    assert json.loads(line.split("=", 1)[1]) == []
    assert "checkpoint:" in proc.stdout and latest_checkpoint(run).name == "step-0000002"
    # the mismatch refusal reaches the user as a clear CLI error naming the field
    proc = subprocess.run(
        _cli(
            "--shards",
            str(shards),
            "--out",
            str(tmp_path / "x"),
            "--preset",
            "tiny",
            "--set",
            "expect_fingerprint=abc",
        ),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert proc.returncode != 0 and "fingerprint" in proc.stderr


def test_ddp_two_gloo_ranks(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "pipeline.cli", "train", "--shards", str(shards), "--out", str(run), "--preset", "tiny"]
    cmd += ["--steps", "3", "--checkpoint-every", "3", "--device", "cpu", "--set", "projector_dim=32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_log(run)
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 logs once per step
    assert rows[-1]["samples_seen"] == 3 * 4 * 2  # two ranks x batch 4
    import torch as _torch

    state = _torch.load(latest_checkpoint(run) / "train_state.pt", weights_only=True)
    assert len(state["rng"]["noise"]) == 2 and state["loader"]["world_size"] == 2


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = _cli("--shards", str(shards), "--out", str(run), "--preset", "tiny", "--device", "cpu")
    cmd += [
        "--steps",
        "100000",
        "--checkpoint-every",
        "100000",
        "--log-every",
        "1",
        "--set",
        "projector_dim=32",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env()
    )
    deadline = time.time() + 90
    while time.time() < deadline and len(read_log(run)) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    step = latest_checkpoint(run)
    assert step is not None and "SIGTERM" in (out + err)
    assert int(step.name.split("-")[1]) >= 3


def test_training_gifs_are_reproduced_by_pipeline_sample(shards: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from PIL import Image, ImageSequence

    from pipeline.cli import main
    from stages.common.presets import tiny_models

    vae = tiny_models(tmp_path / "models", names=["vae"])["vae"]
    run = tmp_path / "run"
    train(tiny(shards, run, steps=2, sample_every=2, sample_steps=2, num_samples=4, vae=vae), progress=False)
    args = ["sample", "--run", str(run), "--checkpoint", "step-0000002", "--num", "4", "--steps", "2",
            "--seed", "0", "--vae", vae]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output

    def frames(path: Path) -> list[np.ndarray]:
        return [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(path))]

    during, after = (
        frames(run / "samples" / "step-0000002.gif"),
        frames(run / "samples" / "step-0000002" / "grid.gif"),
    )
    assert len(during) == LATENT_SHAPE[1] and len(during) == len(after)
    for a, b in zip(during, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_loader_with_workers_is_deterministic_and_resumable(shards: Path) -> None:
    from stages.train.data import LoaderSpec, iterate_steps, shard_urls, unpack

    index = read_shard_layout(shards)
    spec = LoaderSpec(
        shard_urls(str(shards), index), seed=3, batch_size=4, batches_per_step=1, segment_steps=4
    )
    spec.num_workers, spec.shuffle_buffer = 2, 8

    def take(start: int, n: int) -> list[torch.Tensor]:
        stream = iterate_steps(spec, start)
        try:
            return [unpack(next(stream)[0])[0].clone() for _ in range(n)]
        finally:
            stream.close()

    straight = take(0, 6)
    again = take(0, 6)
    resumed = take(2, 4)  # resume inside the first segment: replays 2 steps, then continues
    for a, b in zip(straight, again, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(straight[2:], resumed, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_bf16_cuda_run(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "gpu"
    train(tiny(shards, run, steps=3, device="cuda", num_workers=2), progress=False)
    rows = read_log(run)
    assert len(rows) == 3 and np.isfinite([r["loss"] for r in rows]).all()
