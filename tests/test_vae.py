"""VAEWrapper on the tiny preset: shapes, latents = posterior mean * scale, offline errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLCogVideoX
from helpers import random_clip

from stages.common.models.vae import VAEWrapper, WeightsNotFoundError
from stages.common.presets import tiny_models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    return tiny_models(tmp_path_factory.getbasetemp() / "align4gen-tiny", names=["vae", "video_vae"])


def test_image_vae_matches_diffusers_posterior_mean(tiny):
    vae = VAEWrapper.load(tiny["vae"], kind="image", scale=0.18215)
    assert (vae.latent_channels, vae.spatial_factor, vae.temporal_factor) == (4, 8, 1)
    assert vae.model_id == tiny["vae"] and not any(p.requires_grad for p in vae.model.parameters())
    x = random_clip()
    z = vae.encode(x)
    assert z.shape == (2, 4, 4, 8, 8) and z.dtype == torch.float16
    assert z.shape[1:] == vae.latent_shape(4, 64, 64)

    ref = AutoencoderKL.from_pretrained(tiny["vae"]).eval()
    pix = x.permute(0, 1, 4, 2, 3).reshape(8, 3, 64, 64).float() / 255.0 * 2.0 - 1.0
    with torch.no_grad():
        post = ref.encode(pix).latent_dist
    want = (post.mean * 0.18215).reshape(2, 4, 4, 8, 8).permute(0, 2, 1, 3, 4).half()
    torch.testing.assert_close(z, want, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(post.mean, post.sample(), atol=1e-4)  # the mean, not a sample

    frames = vae.decode(z)
    assert frames.shape == x.shape and frames.dtype == torch.uint8
    with torch.no_grad():
        dec = ref.decode(z[:, :, 1].float() / 0.18215).sample
    want_frame = ((dec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert (frames[:, 1].int() - want_frame.int()).abs().max() <= 1


def test_video_vae_compresses_time(tiny):
    vae = VAEWrapper.load(tiny["video_vae"], kind="video", scale=None)
    ref = AutoencoderKLCogVideoX.from_pretrained(tiny["video_vae"]).eval()
    assert vae.temporal_factor == 4 and vae.scale == pytest.approx(ref.config.scaling_factor)
    x = random_clip(b=1, t=8)
    z = vae.encode(x)
    assert z.shape == (1, 4, 2, 8, 8) and z.dtype == torch.float16
    assert z.shape[1:] == vae.latent_shape(8, 64, 64)
    pix = x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    with torch.no_grad():
        want = (ref.encode(pix).latent_dist.mean * ref.config.scaling_factor).half()
    torch.testing.assert_close(z, want, atol=1e-3, rtol=1e-3)
    out = vae.decode(z)
    assert out.shape == (1, 8, 64, 64, 3) and out.dtype == torch.uint8
    assert vae.latent_frames(9) == 3 and vae.latent_frames(16) == 4


def test_missing_weights_fail_fast_naming_the_flag(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="--vae") as e:
        VAEWrapper.load(tmp_path / "no-such-vae")
    assert "no-such-vae" in str(e.value) and e.value.flag == "--vae"
    t0 = time.monotonic()
    with pytest.raises(WeightsNotFoundError, match="nobody-align4gen/not-a-vae") as e:
        VAEWrapper.load("nobody-align4gen/not-a-vae", kind="image")
    assert "--vae PATH" in str(e.value)
    assert time.monotonic() - t0 < 10
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError):
        VAEWrapper.load(tmp_path / "empty")


def test_bad_frames_rejected(tiny):
    vae = VAEWrapper.load(tiny["vae"])
    with pytest.raises(TypeError):
        vae.encode(torch.zeros(1, 2, 64, 64, 3))
    with pytest.raises(ValueError, match="multiple"):
        vae.encode(torch.zeros(1, 2, 60, 64, 3, dtype=torch.uint8))
    with pytest.raises(ValueError):
        VAEWrapper.load(tiny["vae"], kind="3d")


def test_tiny_preset_is_deterministic_and_race_safe(tmp_path):
    roots = [tmp_path / "a", tmp_path / "a", tmp_path / "b"]
    out: list[dict[str, str]] = [{}, {}, {}]

    def run(i: int) -> None:
        out[i] = tiny_models(roots[i], names=["vae"])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert out[0] == out[1] and Path(out[0]["vae"]).is_dir()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["vae"]  # no temp folders left
    a = (Path(out[0]["vae"]) / "diffusion_pytorch_model.safetensors").read_bytes()
    b = (Path(out[2]["vae"]) / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == b
    with pytest.raises(ValueError, match="unknown tiny"):
        tiny_models(tmp_path / "c", names=["nope"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_encode_close_to_cpu(tiny):
    x = random_clip()
    cpu = VAEWrapper.load(tiny["vae"]).encode(x)
    gpu = VAEWrapper.load(tiny["vae"], device="cuda").encode(x)
    assert gpu.dtype == torch.float16 and gpu.shape == cpu.shape
    torch.testing.assert_close(gpu.float().cpu(), cpu.float(), atol=0.05, rtol=0.05)
    assert VAEWrapper.load(tiny["vae"], device="cuda").decode(gpu).shape == x.shape


# ----------------------------------------------------------------------------- pipeline repos

_SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
# loads the VAE by hub id from a hand-made offline cache in a fresh process (HF_HUB_CACHE is read
# when huggingface_hub is imported) and saves its latents of a fixed clip
_LOAD_BY_ID = """
import sys, torch
from huggingface_hub import try_to_load_from_cache  # a lookup in the local cache, never the network
from stages.common.models.vae import VAEWrapper
index = try_to_load_from_cache("org/tiny-cogvideox", "model_index.json")
assert isinstance(index, str) and "{snapshot}" in index, index
vae = VAEWrapper.load("org/tiny-cogvideox", kind="video", scale=None)
x = torch.randint(0, 256, (1, 8, 64, 64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
torch.save(vae.encode(x), sys.argv[1])
"""


def _pipeline_folder(root: Path, vae: str, index: bool = True) -> Path:
    """A diffusers pipeline layout as CogVideoX repos have: vae/ (+ model_index.json)."""
    shutil.copytree(vae, root / "vae")
    if index:
        spec = {"_class_name": "CogVideoXPipeline", "vae": ["diffusers", "AutoencoderKLCogVideoX"]}
        (root / "model_index.json").write_text(json.dumps(spec))
    return root


def test_video_vae_from_a_pipeline_folder_uses_its_vae_subfolder(tiny, tmp_path):
    x = random_clip(b=1, t=8)
    want = VAEWrapper.load(tiny["video_vae"], kind="video", scale=None).encode(x)
    for name, index in (("with-index", True), ("vae-only", False)):
        folder = _pipeline_folder(tmp_path / name, tiny["video_vae"], index=index)
        vae = VAEWrapper.load(str(folder), kind="video", scale=None)
        assert vae.model_id == str(folder) and vae.temporal_factor == 4
        torch.testing.assert_close(vae.encode(x), want, rtol=0, atol=0)


def test_video_vae_by_hub_id_of_a_pipeline_repo(tiny, tmp_path):
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-cogvideox"
    _pipeline_folder(repo / "snapshots" / _SNAPSHOT, tiny["video_vae"])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(_SNAPSHOT)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "z.pt"
    script = _LOAD_BY_ID.format(snapshot=_SNAPSHOT)
    repo_root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)], cwd=repo_root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    want = VAEWrapper.load(tiny["video_vae"], kind="video", scale=None).encode(random_clip(b=1, t=8))
    torch.testing.assert_close(torch.load(out), want, rtol=0, atol=0)


def test_pixel_patchify_is_exact_on_held_out_synthetic_clips():
    """kind="pixel" (patchify-F): decode(encode(x)) == x bit for bit on synthetic clips that no model
    saw, so the held-out PSNR is infinite (the issue asks >= 28 dB); latents are 3 F^2 channels."""
    import numpy as np

    from stages.common.synth import render_video

    vae = VAEWrapper.load("patchify-8", kind="pixel")
    clips = np.stack(
        [
            render_video(np.random.default_rng([7, 9000 + i]), i % 4, 8, 64, background)
            for i, background in enumerate(["flat", "textured", "flat", "textured"])
        ]  # fmt: skip
    )
    frames = torch.from_numpy(clips)
    latents = vae.encode(frames)
    assert latents.shape == (4, 192, 8, 8, 8) and latents.dtype == torch.float16
    assert vae.latent_shape(8, 64, 64) == (192, 8, 8, 8) and vae.spec()["spatial_factor"] == 8
    decoded = vae.decode(latents)
    mse = (decoded.float() - frames.float()).pow(2).mean().item()
    psnr = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
    assert psnr >= 28.0 and torch.equal(decoded, frames)
    # a space-to-depth rearrangement: latent channel c of block (i, j) is one pixel of the input
    assert latents[0, 0, 0, 0, 0].item() == pytest.approx(clips[0, 0, 0, 0, 0] / 127.5 - 1, abs=1e-3)
    with pytest.raises(ValueError, match="patchify-F"):
        VAEWrapper.load("patchify-x", kind="pixel")
