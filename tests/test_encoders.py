"""Frozen encoders on the tiny preset: grids, equality with direct model calls, offline errors."""

from __future__ import annotations

import time

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from helpers import random_clip
from transformers import (
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    Sam2Model,
    VideoMAEModel,
)

from stages.common.models.encoders import ENCODERS, load_encoder
from stages.common.models.vae import WeightsNotFoundError
from stages.common.presets import TINY_DINO, tiny_models

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    names = ["dino", "sam2", "videomae"]
    return tiny_models(tmp_path_factory.getbasetemp() / "align4gen-tiny", names=names)


def _reference_pixels(frames: torch.Tensor, size: int, mode: TF.InterpolationMode) -> torch.Tensor:
    """Independent preprocessing: torchvision resize (shorter side) + centre crop + normalise."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    x = TF.resize(x, [size], interpolation=mode, antialias=True)
    x = TF.center_crop(x, [size, size]).clamp(0, 1)
    return TF.normalize(x, MEAN, STD)


@pytest.mark.parametrize(
    "name,grid,dim", [("dino", (8, 4, 4), 32), ("sam2", (8, 4, 4), 32), ("videomae", (4, 2, 2), 32)]
)
def test_grid_shape_and_frozen(tiny, name, grid, dim):
    enc = load_encoder(name, tiny[name])
    assert enc.name == name and enc.model_id == tiny[name] and enc.dim == dim
    assert enc.grid(8) == grid
    f = enc.features(random_clip(b=2, t=8))
    assert f.shape == (2, *grid, dim) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert not enc.model.training and not any(p.requires_grad for p in enc.model.parameters())
    assert enc.spec() == {"name": name, "id": tiny[name], "input_size": enc.input_size, "dim": dim}


def test_dino_equals_direct_call(tiny):
    enc = load_encoder("dino", tiny["dino"])
    assert enc.input_size == 56
    x = random_clip(b=1, t=3, h=48, w=80)  # non-square: shorter side resized, centre crop
    ref = Dinov2Model.from_pretrained(tiny["dino"]).eval()
    pix = _reference_pixels(x[0], 56, TF.InterpolationMode.BICUBIC)
    with torch.no_grad():
        want = ref(pixel_values=pix).last_hidden_state[:, 1:].reshape(3, 4, 4, 32)
    torch.testing.assert_close(enc.features(x)[0], want, atol=1e-5, rtol=1e-4)
    # an explicit input size overrides the saved one (DINOv2 interpolates its position embedding)
    assert load_encoder("dino", tiny["dino"], input_size=28).features(x).shape == (1, 3, 2, 2, 32)


def test_dino_with_registers_drops_cls_and_registers(tmp_path):
    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(**{**TINY_DINO, "image_size": 28}, num_register_tokens=2)
    Dinov2WithRegistersModel(cfg).save_pretrained(tmp_path / "reg")
    enc = load_encoder("dino", tmp_path / "reg", input_size=28)
    x = random_clip(b=1, t=2, h=32, w=32)
    ref = Dinov2WithRegistersModel.from_pretrained(tmp_path / "reg").eval()
    with torch.no_grad():
        out = ref(pixel_values=_reference_pixels(x[0], 28, TF.InterpolationMode.BICUBIC)).last_hidden_state
    assert out.shape[1] == 1 + 2 + 4
    torch.testing.assert_close(enc.features(x)[0], out[:, 3:].reshape(2, 2, 2, 32), atol=1e-5, rtol=1e-4)


def test_sam2_equals_full_model_stride16_map(tiny):
    enc = load_encoder("sam2", tiny["sam2"])
    assert enc.input_size == 64
    x = random_clip(b=1, t=2, h=96, w=96)
    full = Sam2Model.from_pretrained(tiny["sam2"]).eval()
    pix = _reference_pixels(x[0], 64, TF.InterpolationMode.BILINEAR)
    with torch.no_grad():
        fpn = full.vision_encoder(pix).fpn_hidden_states
    stride16 = [f for f in fpn if f.shape[-1] == 64 // 16]
    assert len(stride16) == 1
    torch.testing.assert_close(enc.features(x)[0], stride16[0].permute(0, 2, 3, 1), atol=1e-5, rtol=1e-4)
    # input size is configurable (multiples of 32): 128 px -> 8 x 8 map
    assert load_encoder("sam2", tiny["sam2"], input_size=128).features(x).shape == (1, 2, 8, 8, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        load_encoder("sam2", tiny["sam2"], input_size=100)


def test_videomae_equals_direct_call_and_resamples_frames(tiny):
    enc = load_encoder("videomae", tiny["videomae"])
    assert (enc.input_size, enc.num_frames) == (32, 8)
    ref = VideoMAEModel.from_pretrained(tiny["videomae"]).eval()
    x = random_clip(b=2, t=16, h=40, w=40)
    # 16 frames -> the model's 8 by nearest index of linspace(0, 15, 8)
    picked = x[:, [0, 2, 4, 6, 9, 11, 13, 15]]
    pix = torch.stack([_reference_pixels(c, 32, TF.InterpolationMode.BILINEAR) for c in picked])
    with torch.no_grad():
        want = ref(pixel_values=pix).last_hidden_state.reshape(2, 4, 2, 2, 32)
    got = enc.features(x)
    assert got.shape == (2, 4, 2, 2, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(enc.features(picked), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_missing_weights_fail_fast_naming_the_flag(tmp_path, name):
    flag = ENCODERS[name].flag
    with pytest.raises(WeightsNotFoundError, match=flag) as e:
        load_encoder(name, tmp_path / "missing")
    assert str(tmp_path / "missing") in str(e.value)
    t0 = time.monotonic()
    with pytest.raises(WeightsNotFoundError, match=f"{flag} PATH") as e:
        load_encoder(name, f"nobody-align4gen/not-a-{name}")
    assert (
        f"nobody-align4gen/not-a-{name}" in str(e.value) and e.value.model == f"nobody-align4gen/not-a-{name}"
    )
    assert time.monotonic() - t0 < 10


def test_wrong_model_and_bad_input(tiny):
    with pytest.raises(ValueError, match="unknown encoder"):
        load_encoder("clip", tiny["dino"])
    with pytest.raises(ValueError, match="not DINOv2"):
        load_encoder("dino", tiny["videomae"])
    with pytest.raises(ValueError, match="SAM2"):
        load_encoder("sam2", tiny["dino"])
    enc = load_encoder("dino", tiny["dino"])
    with pytest.raises(TypeError):
        enc.features(torch.zeros(1, 2, 32, 32, 3))
    with pytest.raises(ValueError):
        enc.features(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_cuda_bf16_close_to_cpu(tiny, name):
    x = random_clip(b=1, t=8)
    cpu = load_encoder(name, tiny[name]).features(x)
    gpu = load_encoder(name, tiny[name], device="cuda").features(x)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(gpu.cpu(), cpu, dim=-1)
    assert cos.min() > 0.98
