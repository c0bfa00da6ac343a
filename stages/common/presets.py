"""The ``tiny`` preset: small random-initialised instances of the real model classes.

Why: tests and the demo must exercise the exact loading and inference code a real run uses,
without the network. So each model is built from its real class with a tiny config, seeded,
saved with the library's own ``save_pretrained`` and later loaded back by ``VAEWrapper.load``
/ ``load_encoder`` like any downloaded checkpoint.

Shapes on 64 x 64 clips: VAE 8x spatial -> 8 x 8 latents (DiT grid 4 x 4 with patch 2);
dino 56 px / patch 14 -> 4 x 4; sam2 64 px / stride 16 -> 4 x 4; videomae 32 px / patch 16,
8 frames, tubelet 2 -> 4 x 2 x 2. The video VAE compresses time by 4.

The ``random-full`` preset (``full_size_random_models``) builds the real default models'
exact architectures (sd-vae-ft-ema, dinov2-base, sam2.1-hiera-base-plus, videomae-base) from
hand-written configs with random weights: for throughput and memory measurement on machines
that cannot download the checkpoints. Their features are meaningless.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

PRESET_VERSION = "tiny-v1"
FULL_PRESET_VERSION = "random-full-v1"
TINY_NAMES = ("vae", "video_vae", "dino", "sam2", "videomae")
_DONE = ".complete"
# torch's global RNG is shared by threads: one build at a time per process keeps seeds exact.
_BUILD_LOCK = threading.Lock()


def _home() -> Path:
    return Path(
        os.environ.get("ALIGN4GEN_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "align4gen")
    )


def default_root() -> Path:
    """``$ALIGN4GEN_HOME`` or ``~/.cache/align4gen``, subfolder ``tiny-v1``."""
    return _home() / PRESET_VERSION


# Configs of the tiny models: keyword arguments (diffusers VAEs) or a transformers config; the
# encoders' configs carry the input size their loader should use (INPUT_SIZE_KEY).
TINY_DINO: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=56
)


def _tiny_vae_config() -> dict[str, Any]:
    return dict(
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


def _tiny_video_vae_config() -> dict[str, Any]:
    return dict(
        block_out_channels=(8, 16, 16, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        sample_height=64,
        sample_width=64,
    )


def _tiny_dino_config() -> Any:
    from transformers import Dinov2Config

    cfg = Dinov2Config(**TINY_DINO)
    cfg.align4gen_input_size = 56
    return cfg


def _tiny_sam2_config() -> Any:
    """The full Sam2Model's config, as on the hub, so the encoder loader's key mapping is exercised."""
    from transformers import Sam2Config, Sam2HieraDetConfig, Sam2VisionConfig

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
    return cfg


def _tiny_videomae_config() -> Any:
    from transformers import VideoMAEConfig

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
    return cfg


_TINY_CONFIGS: dict[str, Callable[[], Any]] = {
    "vae": _tiny_vae_config,
    "video_vae": _tiny_video_vae_config,
    "dino": _tiny_dino_config,
    "sam2": _tiny_sam2_config,
    "videomae": _tiny_videomae_config,
}


def _model_classes() -> dict[str, Any]:
    from diffusers import AutoencoderKL, AutoencoderKLCogVideoX
    from transformers import Dinov2Model, Sam2Model, VideoMAEModel

    return {
        "vae": AutoencoderKL,
        "video_vae": AutoencoderKLCogVideoX,
        "dino": Dinov2Model,
        "sam2": Sam2Model,
        "videomae": VideoMAEModel,
    }


def _instantiate(name: str, cfg: Any) -> torch.nn.Module:
    """The model class of `name` built from keyword arguments (a dict) or a transformers config."""
    cls = _model_classes()[name]
    return cls(**cfg) if isinstance(cfg, dict) else cls(cfg)


def _saver(name: str, config: Callable[[], Any]) -> Callable[[Path], None]:
    """A builder that saves a freshly initialised `name` model of `config()` (fp32, like the real
    checkpoints, so a run loads and computes in the same dtypes) with save_pretrained."""

    def build(path: Path) -> None:
        _instantiate(name, config()).float().save_pretrained(path)

    return build


_BUILDERS: dict[str, Callable[[Path], None]] = {n: _saver(n, f) for n, f in _TINY_CONFIGS.items()}


def _build(
    name: str,
    target: Path,
    seed: int,
    builder: Callable[[Path], None] | None = None,
    version: str = PRESET_VERSION,
) -> None:
    """Build into a private temp folder, then rename into place (atomic; first writer wins)."""
    builder = builder or _BUILDERS[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            builder(tmp)
        (tmp / _DONE).write_text(f"{version} seed={seed}\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _DONE).exists():  # neither ours nor a finished concurrent build
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _ensure(
    base: Path, names: list[str], seed: int, builders: dict[str, Callable[[Path], None]], version: str
) -> dict[str, str]:
    """Build each missing model folder under ``base``; ``{name: folder}``."""
    paths: dict[str, str] = {}
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        for name in names:
            target = base / name
            if not (target / _DONE).exists():
                if target.exists():  # a stale, incomplete folder from an old layout: replace it
                    shutil.rmtree(target, ignore_errors=True)
                _build(name, target, seed, builders[name], version)
            paths[name] = str(target)
    finally:
        hf_logging.enable_progress_bar()
    return paths


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
    return _ensure(base, wanted, seed, _BUILDERS, PRESET_VERSION)


# ------------------------------------------------------------------ random-full preset
FULL_NAMES = ("vae", "dino", "sam2", "videomae")


def _sd_vae_config() -> dict[str, Any]:
    """stabilityai/sd-vae-ft-ema's config.json (its scaling factor is diffusers' default)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": 0.18215,
    }


def _dinov2_base_config() -> Any:
    """facebook/dinov2-base: ViT-B/14, 518 px position grid, layer scale, no registers."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        mlp_ratio=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=518,
        patch_size=14,
        num_channels=3,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
    )


def _sam2_base_plus_config() -> Any:
    """facebook/sam2.1-hiera-base-plus: Hiera B+ trunk (112 wide, 2 heads, stages 2-3-16-3) and
    a 256-wide FPN neck, plus the prompt encoder and mask decoder at their (hub) defaults."""
    from transformers import Sam2Config, Sam2HieraDetConfig, Sam2VisionConfig

    backbone = Sam2HieraDetConfig(
        hidden_size=112,
        num_attention_heads=2,
        image_size=[1024, 1024],
        patch_kernel_size=[7, 7],
        patch_stride=[4, 4],
        patch_padding=[3, 3],
        query_stride=[2, 2],
        num_query_pool_stages=3,
        blocks_per_stage=[2, 3, 16, 3],
        embed_dim_per_stage=[112, 224, 448, 896],
        num_attention_heads_per_stage=[2, 4, 8, 16],
        window_size_per_stage=[8, 4, 14, 7],
        global_attention_blocks=[12, 16, 20],
        window_positional_embedding_background_size=[14, 14],
        mlp_ratio=4.0,
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=[896, 448, 224, 112],
        backbone_feature_sizes=[[256, 256], [128, 128], [64, 64]],
        fpn_hidden_size=256,
        fpn_top_down_levels=[2, 3],
        num_feature_levels=3,
    )
    return Sam2Config(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": 256, "image_size": 1024, "patch_size": 16},
        mask_decoder_config={"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8},
    )


def _videomae_base_config() -> Any:
    """MCG-NJU/videomae-base's encoder: ViT-B/16, 16 frames, tubelet 2, 224 px, final norm."""
    from transformers import VideoMAEConfig

    return VideoMAEConfig(
        image_size=224,
        patch_size=16,
        num_channels=3,
        num_frames=16,
        tubelet_size=2,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        qkv_bias=True,
        layer_norm_eps=1e-12,
        use_mean_pooling=False,
    )


_FULL_CONFIGS: dict[str, Callable[[], Any]] = {
    "vae": _sd_vae_config,
    "dino": _dinov2_base_config,
    "sam2": _sam2_base_plus_config,
    "videomae": _videomae_base_config,
}


def full_size_config(name: str) -> Any:
    """The hand-written config of one ``random-full`` model (a transformers config, or the
    diffusers AutoencoderKL keyword arguments for ``vae``)."""
    if name not in _FULL_CONFIGS:
        raise ValueError(f"unknown full-size model '{name}'; choose from {list(FULL_NAMES)}")
    return _FULL_CONFIGS[name]()


def full_size_model(name: str) -> torch.nn.Module:
    """A randomly initialised full-size model (on the current default device: build it under
    ``torch.device("meta")`` to count parameters without allocating them)."""
    return _instantiate(name, full_size_config(name))


def full_size_random_models(
    root: str | Path | None = None, seed: int = 0, names: Iterable[str] | None = None
) -> dict[str, str]:
    """Create (once) and return ``{name: local folder}`` for full-size random-initialised copies
    of the default models: ``vae`` (sd-vae-ft-ema), ``dino`` (dinov2-base), ``sam2``
    (sam2.1-hiera-base-plus), ``videomae`` (videomae-base), under ``root/random-full-v1``.

    For throughput and memory measurement only: the architectures, shapes and costs are the
    real ones, the random weights give meaningless features. Deterministic for a ``seed``,
    safe across concurrent processes, fp32 safetensors (about 1.3 GB for all four); loaded by
    ``VAEWrapper.load`` / ``load_encoder`` like a downloaded checkpoint.
    """
    base = (Path(root).expanduser() if root is not None else _home()) / FULL_PRESET_VERSION
    if seed:
        base = base / f"seed{seed}"
    wanted = list(FULL_NAMES if names is None else names)
    unknown = sorted(set(wanted) - set(FULL_NAMES))
    if unknown:
        raise ValueError(f"unknown full-size model(s) {unknown}; choose from {list(FULL_NAMES)}")
    builders = {n: _saver(n, _FULL_CONFIGS[n]) for n in wanted}
    return _ensure(base, wanted, seed, builders, FULL_PRESET_VERSION)


# ------------------------------------------------------------------ tiny Wan pipeline
WAN_PRESET_VERSION = "tiny-wan-v1"
# The tiny tokenizer's words: the built-in synthetic set's captions and a few common ones; any other
# word is spelled letter by letter (T5's unigram fallback), so every caption tokenises.
_TINY_WAN_WORDS = (
    "a an the of on in with video clip object small large slowly quickly moves moving drifts drifting "
    "left right up down zoom zooming rotate rotating orbit orbiting pulse pulsing clockwise counterclockwise circle square triangle red green blue yellow "
    "flat textured gradient background"
).split()


def _tiny_wan_tokenizer() -> Any:
    """A T5 tokenizer built from a word list (no sentencepiece file, no download): Wan's UMT5 reads
    T5's unigram layout, <pad>=0, </s>=1, <unk>=2."""
    import string

    from transformers import T5TokenizerFast

    space = "\u2581"  # sentencepiece's word-start marker
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (space, -2.0)]
    pieces += [(space + w, -1.0) for w in _TINY_WAN_WORDS]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits]
    pieces += [(space + c, -4.0) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def _save_tiny_wan_pipeline(path: Path) -> None:
    """A WanPipeline of the real classes (WanTransformer3DModel, AutoencoderKLWan, UMT5EncoderModel,
    T5 tokenizer, Wan's flow UniPC scheduler) at toy widths, saved with WanPipeline.save_pretrained."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _tiny_wan_tokenizer()
    text_cfg = UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
    )  # fmt: skip
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )  # fmt: skip
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=UMT5EncoderModel(text_cfg).float(), transformer=transformer.float(),
        vae=vae.float(), scheduler=scheduler,
    )  # fmt: skip
    pipe.save_pretrained(path)


def tiny_wan_pipeline(root: str | Path | None = None, seed: int = 0) -> str:
    """Create (once) and return the folder of a tiny random WanPipeline in diffusers' layout
    (transformer/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json): what
    `--base PIPELINE` reads, loadable by `WanPipeline.from_pretrained`. Seeded, cached, built
    atomically like `tiny_models`."""
    base = Path(root).expanduser() if root is not None else default_root()
    if seed:
        base = base / f"seed{seed}"
    builders = {"wan": _save_tiny_wan_pipeline}
    return _ensure(base, ["wan"], seed, builders, WAN_PRESET_VERSION)["wan"]
