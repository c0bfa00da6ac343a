"""The extract stage's config and its presets."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_ENCODERS = ["dino", "sam2", "videomae"]
CODECS = ("zstd", "blosc", "none")


@dataclass
class ExtractConfig:
    """Everything `pipeline extract` needs; the fingerprinted part is built from it by `build_spec`."""

    data: str = ""
    out: str = ""
    encoders: list[str] = field(default_factory=lambda: list(DEFAULT_ENCODERS))
    preset: str | None = None
    # clip sampling (Latte: 16 frames, stride 3, 256x256)
    frames: int = 16
    stride: int = 3
    clips_per_video: int = 1
    size: int = 256
    # VAE
    vae: str = "stabilityai/sd-vae-ft-ema"
    vae_kind: str = "image"
    latent_scale: float | None = None  # None: 0.18215 (SD VAE) or the video VAE's own scaling_factor
    # encoders: hub id or local path (None = the encoder's default hub id); input sizes
    dino_model: str | None = None
    sam2_model: str | None = None
    videomae_model: str | None = None
    dino_size: int | None = None
    sam2_size: int | None = None
    videomae_size: int | None = None
    # DiT token grid = latent grid / patch
    patch_size: int = 2
    fusion: str = "concat"
    # storage
    block_size: int = 16
    codec: str = "zstd"
    codec_level: int = 3
    # compute
    batch_size: int = 4
    num_workers: int = 4
    device: str = "auto"
    dry_run: bool = False
    overwrite: bool = False
    progress: bool = True


PRESETS: dict[str, dict] = {
    # tiny random-initialised models of the real classes; CPU-sized clips
    "tiny": {
        "frames": 8,
        "stride": 1,
        "size": 64,
        "block_size": 4,
        "batch_size": 2,
        "num_workers": 0,
        "device": "cpu",
    },
    # full-size random-initialised copies of the default models (throughput/memory measurement
    # without downloads; features are meaningless); the real clip defaults
    "random-full": {},
}


def preset_values(name: str | None) -> dict:
    if name is None:
        return {}
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose from {', '.join(PRESETS)}")
    return dict(PRESETS[name], preset=name)
