"""The ``tiny`` preset: small random-initialised instances of the real model classes.

Why: tests and the demo must exercise the exact loading and inference code a real run uses,
without the network. So each model is built from its real class with a tiny config, seeded,
saved with the library's own ``save_pretrained`` and later loaded back by ``VAEWrapper.load``
/ ``load_encoder`` like any downloaded checkpoint.

Shapes on 64 x 64 clips: VAE 8x spatial -> 8 x 8 latents (DiT grid 4 x 4 with patch 2);
dino 56 px / patch 14 -> 4 x 4; sam2 64 px / stride 16 -> 4 x 4; videomae 32 px / patch 16,
8 frames, tubelet 2 -> 4 x 2 x 2. The video VAE compresses time by 4.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

PRESET_VERSION = "tiny-v1"
TINY_NAMES = ("vae", "video_vae", "dino", "sam2", "videomae")
_DONE = ".complete"
# torch's global RNG is shared by threads: one build at a time per process keeps seeds exact.
_BUILD_LOCK = threading.Lock()


def default_root() -> Path:
    """``$ALIGN4GEN_HOME`` or ``~/.cache/align4gen``, subfolder ``tiny-v1``."""
    base = os.environ.get("ALIGN4GEN_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "align4gen")
    return Path(base) / PRESET_VERSION


def _tiny_vae(path: Path) -> None:
    from diffusers import AutoencoderKL

    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    )
    model.save_pretrained(path)


def _tiny_video_vae(path: Path) -> None:
    from diffusers import AutoencoderKLCogVideoX

    model = AutoencoderKLCogVideoX(
        block_out_channels=(8, 16, 16, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        sample_height=64,
        sample_width=64,
    )
    model.save_pretrained(path)


def _tiny_dino(path: Path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=14,
        image_size=56,
    )
    cfg.align4gen_input_size = 56
    Dinov2Model(cfg).save_pretrained(path)


def _tiny_sam2(path: Path) -> None:
    from transformers import Sam2Config, Sam2HieraDetConfig, Sam2Model, Sam2VisionConfig

    backbone = Sam2HieraDetConfig(
        hidden_size=8,
        num_attention_heads=1,
        image_size=[64, 64],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[4, 4, 4, 4],
        global_attention_blocks=[3],
        window_positional_embedding_background_size=[4, 4],
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=[64, 32, 16, 8],
        backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
        fpn_hidden_size=32,
    )
    cfg = Sam2Config(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": 32, "image_size": 64, "patch_size": 16},
        mask_decoder_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "mlp_dim": 32,
            "iou_head_hidden_dim": 32,
        },
    )
    cfg.vision_config.align4gen_input_size = 64
    # The full Sam2Model, as on the hub, so the encoder loader's key mapping is exercised.
    Sam2Model(cfg).save_pretrained(path)


def _tiny_videomae(path: Path) -> None:
    from transformers import VideoMAEConfig, VideoMAEModel

    cfg = VideoMAEConfig(
        image_size=32,
        patch_size=16,
        num_frames=8,
        tubelet_size=2,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        use_mean_pooling=False,
    )
    cfg.align4gen_input_size = 32
    VideoMAEModel(cfg).save_pretrained(path)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "vae": _tiny_vae,
    "video_vae": _tiny_video_vae,
    "dino": _tiny_dino,
    "sam2": _tiny_sam2,
    "videomae": _tiny_videomae,
}


def _build(name: str, target: Path, seed: int) -> None:
    """Build into a private temp folder, then rename into place (atomic; first writer wins)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _BUILDERS[name](tmp)
        (tmp / _DONE).write_text(f"{PRESET_VERSION} seed={seed}\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _DONE).exists():  # neither ours nor a finished concurrent build
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def tiny_models(
    root: str | Path | None = None, seed: int = 0, names: Iterable[str] | None = None
) -> dict[str, str]:
    """Create (once) and return ``{name: local folder}`` for the tiny VAE, video VAE and encoders.

    ``names`` restricts the set (default: all of ``TINY_NAMES``).

    Deterministic for a given ``seed``; safe to call from concurrent processes (torchrun ranks,
    parallel tests). Pass the paths to ``VAEWrapper.load`` / ``load_encoder``.
    """
    base = Path(root).expanduser() if root is not None else default_root()
    if seed:
        base = base / f"seed{seed}"
    wanted = list(TINY_NAMES if names is None else names)
    unknown = sorted(set(wanted) - set(TINY_NAMES))
    if unknown:
        raise ValueError(f"unknown tiny model(s) {unknown}; choose from {list(TINY_NAMES)}")
    paths: dict[str, str] = {}
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        for name in wanted:
            target = base / name
            if not (target / _DONE).exists():
                if target.exists():  # a stale, incomplete folder from an old layout: replace it
                    shutil.rmtree(target, ignore_errors=True)
                _build(name, target, seed)
            paths[name] = str(target)
    finally:
        hf_logging.enable_progress_bar()
    return paths
