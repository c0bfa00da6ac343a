"""Names and defaults that more than one place needs, defined once (DESIGN.md section 2).

The CLI builds its choices and help texts from these tables, and the stages read their
defaults from them, so a name or a default value is never written twice. This module is
import-light (no torch) because `pipeline --help` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

# --------------------------------------------------------------------------- VideoDiT sizes

# name -> (hidden size, depth, heads); widths and depths as in DiT/Latte, patch size 2.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 4, 4),
    # the CPU demo's pixel-space model: on 32 x 32 clips in patchify-8 latents (4 x 4 x 192) its patch 4
    # makes one token per frame, so every block mixes frames (temporal) or refines one frame's token
    "mini/4": (256, 4, 4),
    "S/2": (384, 12, 6),
    "B/2": (768, 12, 12),
    "L/2": (1024, 24, 16),
    "XL/2": (1152, 28, 16),
}
DEFAULT_MODEL = "XL/2"
# what the network outputs: SiT/REPA's velocity, or JiT's clean sample (stages/common/models/dit.py)
PREDICTIONS = ("velocity", "sample")

# Training step cost per clip (forward + backward, torch.utils.flop_counter, 16 x 256 x 256
# clips = 4 x 16 x 32 x 32 SD latents, no alignment head) and the clips/s one H100 sustains at
# 40% of its 989 TFLOP/s dense bf16 peak. This table is at Latte's grid (README); the dry run
# counts each model's FLOPs at the store's own grid (stages.common.models.dit_sizes.train_tflop_per_clip) to say
# how much target bandwidth a trainer needs (`extract --train-rate` overrides it).
H100_BF16_PEAK_TFLOPS = 989.0
ASSUMED_MFU = 0.40
TRAIN_TFLOP_PER_CLIP: dict[str, float] = {
    "tiny": 0.0066,
    "mini/4": 0.0200,
    "S/2": 0.55,
    "B/2": 2.16,
    "L/2": 7.59,
    "XL/2": 11.21,
}


LATTE_LATENT_SHAPE = (4, 16, 32, 32)  # C, T', h, w of the table above


def clips_per_s(tflop_per_clip: float) -> float:
    """Clips/s one H100 consumes at ASSUMED_MFU for a training step of this cost per clip."""
    return H100_BF16_PEAK_TFLOPS * ASSUMED_MFU / tflop_per_clip


def train_rate(model: str) -> float:
    """Clips/s one H100 consumes when training `model` on Latte's grid (the FLOP-count table)."""
    return clips_per_s(TRAIN_TFLOP_PER_CLIP[model])


# --------------------------------------------------------------------------- training

# learning-rate schedules (diffusers.optimization.get_scheduler's definitions, stages/train/lr.py)
LR_SCHEDULES = ("constant", "linear", "cosine")
# where every log.jsonl row also goes (stages/train/trackers.py); wandb is an optional extra
REPORT_TO = ("tensorboard", "wandb", "none")

# --------------------------------------------------------------------------- samplers

SAMPLER_NAMES = ("euler", "heun", "euler-maruyama")
DEFAULT_SAMPLER = "euler"
# where the samplers end and which time grid they use (stages/common/flow.py docstring)
SAMPLER_CONVENTIONS = ("repa", "uniform")
DEFAULT_SAMPLER_CONVENTION = "repa"

GIF_GRID_MAX = 16  # videos shown in a sample GIF grid (`pipeline sample` and training-time grids)
GIF_FPS = 8

# --------------------------------------------------------------------------- frozen encoders


@dataclass(frozen=True)
class EncoderDefaults:
    """What a user may leave out for one encoder: where its weights come from, its input size."""

    hub_id: str
    flag: str
    input_size: int | None  # None: follows the clip (DINOv2: patch grid = DiT grid, as REPA)
    summary: str


ENCODERS: dict[str, EncoderDefaults] = {
    "dino": EncoderDefaults(
        "facebook/dinov2-base",
        "--dino-model",
        None,
        "DINOv2 ViT-B/14 patch tokens per frame (D=768); input 224 px per 256 px of clip",
    ),
    "sam2": EncoderDefaults(
        "facebook/sam2.1-hiera-base-plus",
        "--sam2-model",
        512,
        "SAM2.1 Hiera B+ stride-16 FPN map per frame (D=256) at 512 px",
    ),
    "videomae": EncoderDefaults(
        "MCG-NJU/videomae-base",
        "--videomae-model",
        224,
        "VideoMAE ViT-B tubelet tokens (D=768), 16 frames at 224 px",
    ),
    "hog": EncoderDefaults(
        "maskfeat-hog",
        "--hog-model",
        None,
        "weight-free: MaskFeat's HOG per frame + normal-flow directions (D=36), one token per 8 x 8 px",
    ),
}
DEFAULT_ENCODERS = ("dino", "sam2", "videomae")

# --------------------------------------------------------------------------- VAE and clips

SD_LATENT_SCALE = 0.18215  # Stable Diffusion's VAE (Latte); video VAEs carry their own
WAN_MAX_TEXT_LENGTH = 512  # prompt tokens: WanPipeline's max_sequence_length default
DEFAULT_VAE: dict[str, str] = {
    "image": "stabilityai/sd-vae-ft-ema",
    "video": "THUDM/CogVideoX-2b",
    "pixel": "patchify-8",  # exact space-to-depth (stages/common/models/pixel.py): no weights
    "wan": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",  # AutoencoderKLWan in its pipeline's vae/
}
VAE_KINDS = tuple(DEFAULT_VAE)
CAUSAL_VAE_KINDS = ("video", "wan")  # frame 0 alone, then k frames per latent step


@dataclass(frozen=True)
class ClipDefaults:
    """Latte's clips: 16 frames, frame stride 3, 256 x 256 (shorter side, centre crop)."""

    frames: int = 16
    stride: int = 3
    size: int = 256
    clips_per_video: int = 1


CLIP_DEFAULTS = ClipDefaults()
PATCH_SIZE = 2
CLIP_PLACEMENTS = ("even", "random")

# --------------------------------------------------------------------------- alignment recipes

ALIGN_SCHEDULES = ("constant", "linear", "cosine")  # CREPA's shapes; HASTE's end step on top
TARGET_NORMS = ("token", "spatial")  # as cached (REPA) | iREPA's spatial z-score
PROJECTORS = ("mlp", "conv")  # REPA's MLP | iREPA's 3x3 conv on the token grid
ON_CORRUPT = ("stop", "skip")

# --------------------------------------------------------------------------- runtime

DEVICE_HELP = "auto | cpu | cuda | cuda:N"
