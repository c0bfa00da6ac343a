"""`pipeline export`: the folder loads with diffusers alone, in a fresh process that imports
nothing of align4gen, and generates the videos `pipeline sample` generates with the same seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import checkpoint_weights, make_run, randomize_zero_inits, tiny_dit

from pipeline.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

T, LATENT, CLASSES = 3, 8, 3

# Runs in a fresh interpreter: imports diffusers (which loads the folder's own modules) and
# nothing else; reports whether any align4gen package was imported.
LOADER = """
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from diffusers import DiffusionPipeline
folder, out, steps, seed, cfg = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
videos = pipe(num_videos=4, num_inference_steps=steps, seed=seed, guidance_scale=cfg).videos
latents = pipe(num_videos=4, num_inference_steps=steps, seed=seed, guidance_scale=cfg, output_type="latent")
np.savez(out, videos=videos, latents=latents.videos, labels=latents.labels)
ours = sorted({m.split(".")[0] for m in sys.modules} & {"stages", "cache_schema", "pipeline"})
print(json.dumps({"class": type(pipe).__name__, "ours": ours,
                  "scheduler": type(pipe.scheduler).__name__}))
"""


def _dit(seed: int):
    torch.manual_seed(seed)
    model = tiny_dit(num_frames=T, sample_size=LATENT, num_classes=CLASSES)
    return randomize_zero_inits(model, seed, scale=0.1).eval()


@pytest.fixture
def run(tmp_path: Path, tiny_vae: Path) -> Path:
    weights = {"step-0000010/model": _dit(1), "step-0000010/ema": _dit(2), "step-0000020/ema": _dit(3)}
    return make_run(tmp_path / "run", tiny_vae, weights, latest="step-0000020")


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result


def load_in_fresh_process(folder: Path, out: Path, steps: int, seed: int, cfg: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(out.parent / "hf-modules"))
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder), str(out), str(steps), str(seed), str(cfg)],
        capture_output=True, text=True, env=env, cwd=out.parent, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_exported_folder_reproduces_pipeline_sample_without_align4gen(run: Path, tmp_path: Path, cfg) -> None:
    steps, seed = 3, 7  # a 3-step grid (1, 2/3, 1/3, 0) is not exact in float32
    folder = tmp_path / "exported"
    invoke("export", str(run), "--checkpoint", "step-0000010", "--out", str(folder))
    invoke("sample", "--run", str(run), "--checkpoint", "step-0000010", "--num", "4", "--steps", str(steps),
           "--seed", str(seed), "--cfg", str(cfg), "--out", str(tmp_path / "sampled"),
           "--set", "save_latents=true")  # fmt: skip
    info = load_in_fresh_process(folder, tmp_path / "exported.npz", steps, seed, cfg)
    assert info == {"class": "VideoDiTPipeline", "ours": [], "scheduler": "FlowMatchEulerDiscreteScheduler"}

    got = np.load(tmp_path / "exported.npz")
    want = np.load(tmp_path / "sampled" / "latents.npz")
    np.testing.assert_array_equal(got["labels"], want["labels"])
    # the same Euler grid; dt rounds once in float32 in diffusers' scheduler, once from float64 in ours
    np.testing.assert_allclose(got["latents"], want["latents"], rtol=1e-5, atol=1e-5)
    videos = np.load(tmp_path / "sampled" / "videos.npz")["videos"]
    assert got["videos"].shape == videos.shape and got["videos"].dtype == np.uint8
    assert np.abs(got["videos"].astype(int) - videos.astype(int)).max() <= 1


def test_export_ships_the_chosen_weights_and_refuses_what_it_cannot_do(run: Path, tmp_path: Path) -> None:
    invoke("export", str(run), "--out", str(tmp_path / "latest"))  # latest: step 20, EMA
    invoke(
        "export",
        str(run),
        "--checkpoint",
        "step-0000010",
        "--weights",
        "model",
        "--out",
        str(tmp_path / "raw"),
    )
    for folder, source in (("latest", "step-0000020/ema"), ("raw", "step-0000010/model")):
        got = checkpoint_weights(tmp_path / folder / "transformer")
        want = checkpoint_weights(run / "checkpoints" / source)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    index = json.loads((tmp_path / "latest" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_videodit", "VideoDiTPipeline"] and index["latent_scale"] == 0.5

    result = CliRunner().invoke(main, ["export", str(run), "--checkpoint", "step-0000020", "--weights", "model",
                                       "--out", str(tmp_path / "none")])  # fmt: skip
    assert result.exit_code == 1 and "nor a checkpoint with model/ inside" in result.output
    result = CliRunner().invoke(
        main, ["export", str(run), "--checkpoint", "step-0000099", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 1 and "checkpoint step-0000099 is not in" in result.output
    assert "step-0000010, step-0000020" in result.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "mine")])
    assert result.exit_code == 1 and "notes.txt" in result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
