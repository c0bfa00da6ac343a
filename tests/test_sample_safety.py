"""`pipeline sample` and `evaluate` under bad conditions: earlier samples in --out, damaged
checkpoints (truncated, bit-flipped, with and without checksums), a sampler killed with -9."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import make_run, randomize_zero_inits, subprocess_env, tiny_dit

from cache_schema.checkpoint import write_manifest
from pipeline.cli import main
from stages.common.tiny_i3d import make_tiny_i3d

torch.set_num_threads(1)


def _run(root: Path, vae: Path | None = None, checksums: bool = True) -> Path:
    """A run with two checkpoints (step 5 and the latest, step 10), with checksums or without
    (a checkpoint written before they existed)."""
    weights = {}
    for step, seed in ((5, 3), (10, 1)):
        torch.manual_seed(seed)
        model = randomize_zero_inits(tiny_dit(num_frames=3, sample_size=8, num_classes=3), seed, scale=0.1)
        weights[f"step-{step:07d}/model"] = model
        weights[f"step-{step:07d}/ema"] = model
    run = make_run(root / "run", vae, weights, latest="step-0000010")
    if checksums:
        for step in ("step-0000005", "step-0000010"):
            write_manifest(run / "checkpoints" / step)
    return run


def _sample(*args: str):
    return CliRunner().invoke(main, ["sample", "--num", "1", "--steps", "1", *args])


def test_earlier_samples_are_kept_unless_overwrite(tmp_path: Path) -> None:
    run = _run(tmp_path)
    out = tmp_path / "samples"
    assert _sample("--run", str(run), "--out", str(out)).exit_code == 0
    before = (out / "latents.npz").read_bytes()
    result = _sample("--run", str(run), "--out", str(out), "--seed", "3")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "already holds samples (num 1, seed 0, steps 1" in result.output and "--overwrite" in result.output
    assert (out / "latents.npz").read_bytes() == before  # nothing was changed
    # the same with the default output folder RUN/samples/<checkpoint>, and with another count
    assert _sample("--run", str(run)).exit_code == 0
    default = run / "samples" / "step-0000010"
    result = _sample("--run", str(run), "--num", "2")
    assert result.exit_code == 1 and f"--out {default} already holds samples" in result.output
    # --overwrite replaces them
    result = _sample("--run", str(run), "--out", str(out), "--seed", "3", "--overwrite")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3
    # ... but never a folder that also holds a file align4gen did not write
    (out / "notes.txt").write_text("mine")
    result = _sample("--run", str(run), "--out", str(out), "--overwrite")
    assert (
        result.exit_code == 1 and "notes.txt" in result.output and (out / "notes.txt").read_text() == "mine"
    )


def _flip(path: Path, count: int = 8) -> None:
    """Flip `count` bytes in the middle of the file's tensor data."""
    data = bytearray(path.read_bytes())
    at = len(data) * 2 // 3
    data[at : at + count] = bytes(b ^ 0xFF for b in data[at : at + count])
    path.write_bytes(bytes(data))


def _float_at(value: float):
    """Damage that overwrites the first two float32 weights of the patch embedding with `value`."""

    def damage(path: Path) -> None:
        data = bytearray(path.read_bytes())
        size = int.from_bytes(data[:8], "little")  # safetensors: header length, JSON header, data
        header = json.loads(data[8 : 8 + size])
        at = 8 + size + header["patch_embed.weight"]["data_offsets"][0]
        data[at : at + 8] = np.array([value, value], "<f4").tobytes()
        path.write_bytes(bytes(data))

    return damage


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


WEIGHTS = "diffusion_pytorch_model.safetensors"


NAN, HUGE = _float_at(float("nan")), _float_at(3e38)


@pytest.mark.parametrize(
    "checksums,damage",
    [(True, _truncate), (True, _flip), (False, _truncate), (False, NAN), (False, HUGE)],
    ids=["truncated", "flipped", "old-truncated", "old-nan", "old-overflow"],
)
def test_a_damaged_checkpoint_is_named(tmp_path: Path, checksums: bool, damage) -> None:
    run = _run(tmp_path, checksums=checksums)
    weights = run / "checkpoints" / "step-0000010" / "ema" / WEIGHTS
    damage(weights)
    result = _sample("--run", str(run), "--out", str(tmp_path / "s"))
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    error = lines[-1]
    assert error.startswith("Error: ") and "Traceback" not in result.output, result.output
    assert "--checkpoint step-0000005" in error  # the way out: another checkpoint
    if checksums:
        assert f"{weights} is damaged" in error
    elif damage is _truncate:
        assert f"{weights} cannot be read" in error
    elif damage is NAN:  # no checksum to catch them: the weights are not finite
        assert f"{weights.parent} holds non-finite weights" in error
    else:  # finite weights that overflow: the samples are not finite
        assert f"sampling from {weights.parent} gave non-finite values" in error
    # the raw-model weights of the same checkpoint are intact and still sample
    assert _sample("--run", str(run), "--out", str(tmp_path / "raw"), "--no-ema").exit_code == 0


def test_killed_sampler_leaves_no_torn_file_and_reruns(tmp_path: Path, tiny_vae: Path) -> None:
    run = _run(tmp_path, vae=tiny_vae)
    out = tmp_path / "samples"
    args = [sys.executable, "-m", "pipeline.cli", "sample", "--run", str(run), "--out", str(out),
            "--num", "400", "--steps", "1", "--batch-size", "4", "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = out / "videos.npz.partial"
    deadline = time.time() + 600  # a loaded machine takes long to import torch
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert partial.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "videos.npz").exists()  # a torn archive never carries the final name
    # the same command again completes (an unfinished set of the same config is ours to redo)
    rerun = subprocess.run(
        [*args[:9], "12", *args[10:]], env=subprocess_env(), capture_output=True, text=True
    )
    assert rerun.returncode == 1 and "unfinished samples of another config" in rerun.stderr
    rerun = subprocess.run(args, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert np.load(out / "videos.npz")["videos"].shape[0] == 400 and not partial.exists()


def test_evaluate_names_a_torn_videos_file(tmp_path: Path) -> None:
    torn = tmp_path / "videos.npz"
    np.savez(torn, videos=np.zeros((4, 8, 16, 16, 3), np.uint8), labels=np.arange(4))
    torn.write_bytes(torn.read_bytes()[:5000])  # what a killed writer leaves
    real = tmp_path / "real.npz"
    np.savez(real, videos=np.random.default_rng(0).integers(0, 256, (4, 8, 16, 16, 3), np.uint8))
    weights = make_tiny_i3d(tmp_path / "i3d.pt")
    args = ["evaluate", "fvd", "--real", str(real), "--fake", str(torn), "--no-cache",
            "--detector-weights", str(weights), "--set", "frames=8", "--set", "resolution=16",
            "--set", "num_videos=4", "--set", "progress=false"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and f"{torn} cannot be read" in error[0] and "truncated or damaged" in error[0]
