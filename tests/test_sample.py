"""`pipeline sample` end to end on a tiny saved VideoDiT and a tiny real diffusers VAE."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import make_run, randomize_zero_inits, tiny_dit
from PIL import Image

from pipeline.cli import main
from stages.common.flow import euler_sample, heun_sample
from stages.common.models.dit import VideoDiT
from stages.common.models.vae import VAEWrapper
from stages.common.models.videodit import VideoDiTAdapter
from stages.common.sampling import generate_latents, initial_noise, sample_labels
from stages.sample import SampleConfig, run_sample
from stages.sample.writers import NpzVideoWriter

torch.set_num_threads(1)

T, LATENT, CLASSES = 3, 8, 3  # latent frames, latent size; the tiny VAE is 2x spatial -> 16 px


def _dit(seed: int, num_classes: int = CLASSES) -> VideoDiT:
    torch.manual_seed(seed)
    model = tiny_dit(num_frames=T, sample_size=LATENT, num_classes=num_classes)
    return randomize_zero_inits(model, seed, scale=0.1).eval()


def _make_run(root: Path, vae: Path | None, num_classes: int = CLASSES) -> Path:
    """A run directory with distinct raw and EMA weights, and an older (not latest) checkpoint."""
    weights = {
        "step-0000010/model": _dit(1, num_classes),
        "step-0000010/ema": _dit(2, num_classes),
        "step-0000005/ema": _dit(3, num_classes),
    }
    return make_run(root / "run", vae, weights, latest="step-0000010")


def _read_mp4(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_cli_end_to_end_with_vae(tmp_path, tiny_vae):
    run = _make_run(tmp_path, tiny_vae)
    out = tmp_path / "samples"
    args = ["sample", "--run", str(run), "--out", str(out), "--num", "5", "--batch-size", "2", "--steps", "3",
            "--cfg", "2.0", "--guidance-interval", "0,0.7", "--seed", "7", "--set", "save_latents=true"]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "sampled 5 videos (ema weights" in result.output

    mp4s = sorted((out / "videos").glob("*.mp4"))
    assert [p.name for p in mp4s] == [
        "000000_c0.mp4",
        "000001_c1.mp4",
        "000002_c2.mp4",
        "000003_c0.mp4",
        "000004_c1.mp4",
    ]
    data = np.load(out / "videos.npz")
    videos, labels = data["videos"], data["labels"]
    assert videos.dtype == np.uint8 and videos.shape == (5, T, 16, 16, 3)
    assert labels.tolist() == [0, 1, 2, 0, 1]  # balanced round-robin over classes
    assert videos.std() > 0

    # the npz holds exactly the VAE decode of the sampled latents (at the run's latent scale)
    latents = np.load(out / "latents.npz")["latents"]
    assert latents.shape == (5, 4, T, LATENT, LATENT)
    vae = VAEWrapper.load(str(tiny_vae), scale=0.5)
    np.testing.assert_array_equal(vae.decode(torch.from_numpy(latents)).numpy(), videos)

    # mp4s decode back to the right clip (lossy H.264, so compare loosely)
    first = _read_mp4(mp4s[0])
    assert first.shape == (T, 16, 16, 3)
    assert np.abs(first.astype(float) - videos[0].astype(float)).mean() < 40

    gif = Image.open(out / "grid.gif")
    assert gif.n_frames == T and gif.size == (3 * 16 + 2 * 2, 2 * 16 + 2)  # 3x2 grid, 2 px gaps

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["cfg"] == 2.0 and saved["guidance_interval"] == [0.0, 0.7] and saved["run"] == str(run)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights"] == "ema" and summary["weights_dir"].endswith("step-0000010/ema")
    assert summary["latent_scale"] == 0.5 and summary["decoded"]


def test_latents_match_direct_sampling_and_ema_choice(tmp_path):
    run = _make_run(tmp_path, vae=None)
    base = dict(run=str(run), num=3, steps=4, seed=3, device="cpu")
    ema = run_sample(SampleConfig(out=str(tmp_path / "ema"), batch_size=1, **base))
    assert not ema["decoded"] and not (tmp_path / "ema" / "videos.npz").exists()
    z_ema = np.load(tmp_path / "ema" / "latents.npz")["latents"]

    # batch size does not change an ODE sample: each video's noise depends on (seed, index)
    run_sample(SampleConfig(out=str(tmp_path / "ema3"), batch_size=3, **base))
    np.testing.assert_allclose(np.load(tmp_path / "ema3" / "latents.npz")["latents"], z_ema, atol=1e-5)

    # the same numbers from the EMA model and the public sampler directly
    model = VideoDiT.from_pretrained(run / "checkpoints" / "step-0000010" / "ema").eval()
    noise = initial_noise(VideoDiTAdapter(model), range(3), seed=3)
    with torch.no_grad():
        direct = euler_sample(lambda x, t, y: model(x, t, y), noise, num_steps=4, y=torch.tensor([0, 1, 2]))
    np.testing.assert_allclose(z_ema, direct.numpy(), atol=1e-5)

    raw = run_sample(SampleConfig(out=str(tmp_path / "raw"), batch_size=3, ema=False, **base))
    assert raw["weights"] == "model"
    assert not np.allclose(np.load(tmp_path / "raw" / "latents.npz")["latents"], z_ema, atol=1e-3)


def test_checkpoint_paths_class_flag_and_samplers(tmp_path, tiny_vae):
    run = _make_run(tmp_path, tiny_vae)
    step = run / "checkpoints" / "step-0000005"
    # a step folder: finds the run's config (VAE) two levels up
    s = run_sample(
        SampleConfig(checkpoint=str(step), out=str(tmp_path / "a"), num=2, steps=2, class_=2, sampler="heun")
    )
    assert s["weights_dir"].endswith("step-0000005/ema") and s["decoded"]
    assert np.load(tmp_path / "a" / "videos.npz")["labels"].tolist() == [2, 2]
    # a bare save_pretrained folder, SDE sampler, explicit --vae
    s = run_sample(
        SampleConfig(
            checkpoint=str(step / "ema"),
            out=str(tmp_path / "b"),
            num=2,
            steps=3,
            sampler="euler-maruyama",
            vae=str(tiny_vae),
            latent_scale=0.5,
        )  # fmt: skip
    )
    assert s["weights"] == "pretrained" and s["decoded"]
    assert np.load(tmp_path / "b" / "videos.npz")["videos"].shape == (2, T, 16, 16, 3)
    with pytest.raises(ValueError, match="out of range"):
        run_sample(SampleConfig(run=str(run), out=str(tmp_path / "c"), num=1, steps=1, class_=3, vae="none"))


def test_unconditional_model(tmp_path):
    run = _make_run(tmp_path, vae=None, num_classes=0)
    s = run_sample(SampleConfig(run=str(run), num=2, steps=2))  # out defaults to RUN/samples/<checkpoint>
    assert s["class_counts"] == {-1: 2}
    assert np.load(run / "samples" / "step-0000010" / "latents.npz")["labels"].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="unconditional"):
        run_sample(SampleConfig(run=str(run), num=1, steps=1, cfg=3.0))


def test_clear_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["sample", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--run RUN or --checkpoint" in result.output
    result = runner.invoke(
        main, ["sample", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path)]
    )
    assert result.exit_code != 0 and "checkpoint not found" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(main, ["sample", "--run", str(tmp_path / "empty")])
    assert result.exit_code != 0 and "is not a training run" in result.output
    result = runner.invoke(main, ["sample", "--run", str(tmp_path), "--guidance-interval", "0.9,0.1"])
    assert result.exit_code != 0 and "guidance_interval" in result.output


def test_npz_writer_streams_and_checks(tmp_path):
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, size=(5, 2, 4, 6, 3), dtype=np.uint8)
    writer = NpzVideoWriter(tmp_path / "v.npz", 5, np.arange(5))
    writer.write(videos[:2])
    writer.write(videos[2:])
    writer.close()
    data = np.load(tmp_path / "v.npz")
    np.testing.assert_array_equal(data["videos"], videos)
    assert data["labels"].tolist() == [0, 1, 2, 3, 4]
    short = NpzVideoWriter(tmp_path / "w.npz", 3, np.arange(3))
    short.write(videos[:2])
    with pytest.raises(RuntimeError, match="incomplete"):
        short.close()


@pytest.mark.gpu
def test_sample_on_cuda_bf16(tmp_path, tiny_vae):
    run = _make_run(tmp_path, tiny_vae)
    s = run_sample(
        SampleConfig(
            run=str(run), out=str(tmp_path / "gpu"), num=3, steps=3, device="cuda", save_latents=True
        )
    )
    assert s["device"].startswith("cuda") and s["decoded"]
    cpu = run_sample(
        SampleConfig(run=str(run), out=str(tmp_path / "cpu"), num=3, steps=3, device="cpu", save_latents=True)
    )
    assert cpu["decoded"]
    z_gpu = np.load(tmp_path / "gpu" / "latents.npz")["latents"]
    z_cpu = np.load(tmp_path / "cpu" / "latents.npz")["latents"]
    assert np.abs(z_gpu - z_cpu).mean() < 0.05 * np.abs(z_cpu).mean() + 1e-3


# ----------------------------------------------------------------------------- shared generation


@pytest.mark.parametrize("sampler", ["euler", "euler-maruyama"])
def test_generate_latents_ignores_batch_size_and_balances_labels(sampler):
    model = _dit(1)
    adapter = VideoDiTAdapter(model)
    kwargs = dict(steps=3, sampler=sampler, seed=11, device="cpu")
    z2, labels2 = generate_latents(adapter, model, 7, batch_size=2, **kwargs)
    z3, labels3 = generate_latents(adapter, model, 7, batch_size=3, **kwargs)
    assert z2.dtype == torch.float32 and z2.device.type == "cpu" and z2.shape == (7, 4, T, LATENT, LATENT)
    torch.testing.assert_close(z2, z3, rtol=0, atol=1e-5)
    assert labels2.tolist() == labels3.tolist() == [0, 1, 2, 0, 1, 2, 0]  # balanced round-robin
    other, _ = generate_latents(adapter, model, 7, batch_size=3, **{**kwargs, "seed": 12})
    assert (other - z2).abs().mean() > 0.1
    # video i depends on (seed, i) only: the first 4 of 7 are the 4 of a shorter run
    z4, _ = generate_latents(adapter, model, 4, batch_size=4, **kwargs)
    torch.testing.assert_close(z4, z2[:4], rtol=0, atol=1e-5)


def test_generate_latents_matches_the_sampler_and_keeps_mode():
    model = _dit(2).train()
    adapter = VideoDiTAdapter(model)
    z, labels = generate_latents(adapter, model, 3, steps=4, sampler="heun", seed=5, class_=1, device="cpu")
    assert labels.tolist() == [1, 1, 1] and model.training  # mode restored
    noise = initial_noise(adapter, range(3), seed=5)
    model.eval()
    with torch.no_grad():
        direct = heun_sample(lambda x, t, y: model(x, t, y), noise, num_steps=4, y=torch.tensor([1, 1, 1]))
    torch.testing.assert_close(z, direct, rtol=0, atol=1e-5)
    uniform, _ = generate_latents(
        adapter, model, 3, steps=4, sampler="heun", convention="uniform", seed=5, class_=1
    )
    assert (uniform - z).abs().max() > 1e-4  # the conventions really differ for Heun
    assert sample_labels(4, 0).tolist() == [-1] * 4
    with pytest.raises(ValueError, match="convention 'sde'"):
        generate_latents(adapter, model, 1, steps=1, convention="sde")
    unconditional = _dit(1, num_classes=0)
    with pytest.raises(ValueError, match="unconditional"):
        generate_latents(VideoDiTAdapter(unconditional), unconditional, 1, steps=1, cfg_scale=2.0)


def test_sampler_convention_flag_is_validated_and_recorded(tmp_path):
    assert SampleConfig().sampler_convention == "repa"
    with pytest.raises(ValueError, match="sampler_convention: 'edm'"):
        SampleConfig(run="r", sampler_convention="edm").validate()

    run = _make_run(tmp_path, vae=None)
    out = tmp_path / "uniform"
    args = ["sample", "--run", str(run), "--out", str(out), "--num", "2", "--steps", "3", "--sampler", "heun",
            "--sampler-convention", "uniform", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "heun (uniform)" in result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["sampler_convention"] == "uniform"
    assert json.loads((out / "summary.json").read_text())["sampler_convention"] == "uniform"
    model = VideoDiT.from_pretrained(run / "checkpoints" / "step-0000010" / "ema")
    expected, _ = generate_latents(
        VideoDiTAdapter(model), model, 2, steps=3, sampler="heun", convention="uniform", seed=0
    )
    np.testing.assert_allclose(np.load(out / "latents.npz")["latents"], expected.numpy(), atol=1e-5)
    bad = CliRunner().invoke(main, [*args[:-4], "--sampler-convention", "edm"])
    assert bad.exit_code != 0 and "edm" in bad.output


def test_sample_outputs_never_touch_other_files(tmp_path):
    run = _make_run(tmp_path, vae=None)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    base = ["sample", "--run", str(run), "--num", "1", "--steps", "1"]
    result = CliRunner().invoke(main, [*base, "--out", str(user)])
    assert (
        result.exit_code == 1 and "notes.txt" in result.output and (user / "notes.txt").read_text() == "mine"
    )
    step = run / "checkpoints" / "step-0000010"
    result = CliRunner().invoke(main, [*base, "--out", str(step / "samples")])
    assert (
        result.exit_code == 1 and "inside --checkpoint" in result.output and not (step / "samples").exists()
    )
    # earlier samples are kept (tests/test_sample_safety.py covers the rule and --overwrite)
    out = tmp_path / "samples"
    assert CliRunner().invoke(main, [*base, "--out", str(out)]).exit_code == 0
    assert CliRunner().invoke(main, [*base, "--out", str(out), "--seed", "3"]).exit_code == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 0
