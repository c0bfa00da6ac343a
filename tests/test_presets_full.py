"""The random-full preset: full-size configs of the real default models, checked on the meta
device (no weights allocated or written) against the checkpoints' known sizes and grids."""

from __future__ import annotations

import pytest
import torch

from stages.common.models.encoders import DinoEncoder, Sam2Encoder, VideoMAEEncoder
from stages.common.presets import (
    FULL_NAMES,
    full_size_config,
    full_size_model,
    full_size_random_models,
)


def _meta(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return full_size_model(name)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {name: _meta(name) for name in FULL_NAMES}


def test_built_on_meta_without_memory(models):
    for name, model in models.items():
        assert all(p.device.type == "meta" for p in model.parameters()), name


def test_parameter_counts_match_the_checkpoints(models):
    # known sizes of the hub checkpoints (exact counts of these architectures)
    assert _count(models["vae"]) == 83_653_863  # sd-vae-ft-ema, ~83.7M
    assert _count(models["dino"]) == 86_580_480  # dinov2-base, ~86.6M
    assert _count(models["videomae"]) == 86_227_200  # videomae-base encoder, ~86.2M
    sam2 = models["sam2"]
    # Hiera B+ trunk ~68.7M; + FPN neck = the image encoder ~69.1M; Sam2Model (no memory) ~73.3M
    assert _count(sam2.vision_encoder.backbone) == 68_675_712
    assert _count(sam2.vision_encoder) == 69_106_816
    assert _count(sam2) == 73_328_401


def test_feature_grids_at_default_input_sizes(models):
    with torch.device("meta"):
        dino = DinoEncoder(models["dino"], "random-full/dino", 224, device="meta")
        assert dino._tokens(torch.empty(2, 3, 224, 224)).shape == (2, 16, 16, 768)
        assert dino.grid(16) == (16, 16, 16)

        sam2 = Sam2Encoder(models["sam2"].vision_encoder, "random-full/sam2", 512, device="meta")
        assert sam2.dim == 256
        assert sam2._tokens(torch.empty(2, 3, 512, 512)).shape == (2, 32, 32, 256)  # stride 16

        vmae = VideoMAEEncoder(models["videomae"], "random-full/videomae", 224, device="meta")
        assert vmae.grid(16) == (8, 14, 14) and vmae.dim == 768
        out = models["videomae"](pixel_values=torch.empty(1, 16, 3, 224, 224)).last_hidden_state
        assert out.shape == (1, 8 * 14 * 14, 768)

        latent = models["vae"].encode(torch.empty(2, 3, 256, 256)).latent_dist.mean
        assert latent.shape == (2, 4, 32, 32)  # 8x spatial, 4 channels


def test_unknown_names_fail_before_building(tmp_path):
    with pytest.raises(ValueError, match="unknown full-size model"):
        full_size_random_models(root=tmp_path, names=["dino", "nope"])
    with pytest.raises(ValueError, match="unknown full-size model"):
        full_size_config("video_vae")  # tiny only: no full-size video VAE
    assert not (tmp_path / "random-full-v1").exists()


def test_random_full_preset_builds_only_what_flags_leave(tmp_path, monkeypatch):
    from stages.extract.config import ExtractConfig, preset_values
    from stages.extract.models import model_sources

    monkeypatch.setenv("ALIGN4GEN_HOME", str(tmp_path))
    values = preset_values("random-full")
    cfg = ExtractConfig(
        **values,
        vae="/given/vae",
        dino_model="/given/dino",
        sam2_model="/given/sam2",
        videomae_model="/given/videomae",
    )
    assert (cfg.frames, cfg.stride, cfg.size) == (16, 3, 256)  # the real clip defaults
    sources = model_sources(cfg)
    # hog has no weights: its source is the built-in id, never a download
    assert sources == {
        **{k: f"/given/{k}" for k in ("vae", "dino", "sam2", "videomae")},
        "hog": "maskfeat-hog",
    }
    assert not (tmp_path / "random-full-v1").exists()  # nothing built: every flag won
