"""Frozen vision encoders that provide the alignment targets.

Each wrapper owns its preprocessing (shorter side resized to its input size and centre
cropped, [0, 1] scaling, its mean/std), runs in eval mode with ``requires_grad=False`` and
bf16 autocast on CUDA, and returns patch tokens on its own grid, without CLS/register tokens:
``features(uint8 [B,T,H,W,3]) -> float32 [B, t, h, w, D]``.

========  ===============================  ======  ===============  ==========================
name      default hub id (flag)            input   grid per clip    notes
========  ===============================  ======  ===============  ==========================
dino      facebook/dinov2-base             224     T x 16 x 16      ViT-B/14, D=768, per frame,
          (--dino-model)                                            CLS (+registers) dropped
sam2      facebook/sam2.1-hiera-base-plus  512     T x 32 x 32      Hiera B+, stride-16 image-
          (--sam2-model)                                            encoder (FPN) map, D=256,
                                                                    per frame
videomae  MCG-NJU/videomae-base            224     8 x 14 x 14      ViT-B, 16 frames, tubelet 2,
          (--videomae-model)                                        patch 16, D=768
========  ===============================  ======  ===============  ==========================

SAM2 runs at 512 rather than its native 1024 by default: 1024 gives a 64 x 64 stride-16 map
that is resampled down to the DiT grid (16 x 16 for 256 px clips) anyway, at 4x the cost;
Hiera's windowed position embedding is interpolated, so any multiple of 32 works
(``input_size=`` / ``--set``). SAM2's "backbone features" are the stride-16 output of its image
encoder (Hiera trunk + FPN neck), i.e. what SAM2 feeds its decoders, before the no-memory
embedding is added. VideoMAE clips with a frame count other than the model's ``num_frames``
are resampled in time (nearest frame index) to ``num_frames`` first.

An input size saved in a model's config as ``align4gen_input_size`` (the tiny preset does
this) overrides the default; an explicit ``input_size`` overrides both.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from stages.common.models.vae import FrozenModel, WeightsNotFoundError, hub_kwargs, weights_not_found_as_error

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE_KEY = "align4gen_input_size"


def resize_center_crop(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """float [N,3,H,W] -> [N,3,size,size]: shorter side to ``size`` (antialiased), centre crop."""
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        # shorter side -> size, longer side floored (the torchvision/PIL convention)
        nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        kw: dict[str, Any] = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        x = F.interpolate(x, size=(nh, nw), mode=mode, antialias=True, **kw)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        x = x[..., top : top + size, left : left + size]
    return x


class FrozenEncoder(FrozenModel):
    """Common loading, preprocessing and batching; subclasses define ``_tokens``."""

    name: ClassVar[str] = ""
    flag: ClassVar[str] = ""
    default_id: ClassVar[str] = ""
    default_input_size: ClassVar[int] = 224
    resize_mode: ClassVar[str] = "bicubic"
    mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN
    std: ClassVar[tuple[float, float, float]] = IMAGENET_STD

    def __init__(
        self,
        model: torch.nn.Module,
        model_id: str,
        input_size: int,
        dim: int,
        device: str | torch.device = "cpu",
        frame_batch: int = 32,
    ):
        super().__init__(model.to(device), device, frame_batch)
        self.model_id = str(model_id)
        self.input_size = int(input_size)
        self.dim = int(dim)

    # --------------------------------------------------------------- loading
    @classmethod
    def _from_pretrained(
        cls,
        klass: Any,
        id_or_path: str | Path,
        dtype: torch.dtype | None,
        warn_missing: bool = True,
        **extra: Any,
    ):
        src, kwargs = hub_kwargs(id_or_path, cls.flag)
        if dtype is not None:
            kwargs["dtype"] = dtype
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            with weights_not_found_as_error(id_or_path, cls.flag):
                model, info = klass.from_pretrained(src, output_loading_info=True, **kwargs, **extra)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        missing = list(info.get("missing_keys", []))
        if missing and warn_missing:
            warnings.warn(
                f"{cls.name}: {len(missing)} weights missing from '{id_or_path}' and randomly "
                f"initialised (first: {missing[:3]})",
                stacklevel=4,  # the caller of load()
            )
        return model, missing

    @classmethod
    def load(
        cls,
        id_or_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        input_size: int | None = None,
    ) -> FrozenEncoder:
        """Load from a hub id or a local folder (default ``default_id``). Input size: ``input_size``,
        else the one saved in the config (INPUT_SIZE_KEY), else the encoder's own default."""
        id_or_path = id_or_path or cls.default_id
        model = cls._load_model(id_or_path, dtype)
        size = input_size or cls._saved_input_size(model.config) or cls._native_input_size(model.config)
        return cls(model, str(id_or_path), size, device=device)

    @classmethod
    def _load_model(cls, id_or_path: str | Path, dtype: torch.dtype | None) -> torch.nn.Module:
        """The pretrained model behind this encoder, checked to be the right kind."""
        raise NotImplementedError

    @classmethod
    def _native_input_size(cls, config: Any) -> int:
        return cls.default_input_size

    @staticmethod
    def _saved_input_size(config: Any) -> int | None:
        v = getattr(config, INPUT_SIZE_KEY, None)
        return int(v) if v else None

    # ----------------------------------------------------------- processing
    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N,H,W,3] -> normalised float [N,3,S,S] on the model's device and dtype."""
        x = frames.to(self.device).permute(0, 3, 1, 2).float() / 255.0
        x = resize_center_crop(x, self.input_size, self.resize_mode).clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self._param_dtype())

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [N,3,S,S] -> tokens [N,h,w,D] (image encoders)."""
        raise NotImplementedError

    def grid(self, frames: int) -> tuple[int, int, int]:
        """The encoder's own (t, h, w) token grid for a clip of ``frames`` frames."""
        raise NotImplementedError

    @torch.no_grad()
    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [B,T,H,W,3] -> float32 patch tokens [B,t,h,w,D] (per frame: t = T), on the model's device."""
        self._check_frames(frames)
        b, t = frames.shape[:2]
        flat = frames.reshape(b * t, *frames.shape[2:])
        out = []
        for i in range(0, flat.shape[0], self.frame_batch):
            pixels = self.preprocess(flat[i : i + self.frame_batch])
            with self._autocast():
                out.append(self._tokens(pixels).float())
        tok = torch.cat(out)
        return tok.reshape(b, t, *tok.shape[1:]).contiguous()

    def spec(self) -> dict[str, Any]:
        """This encoder's entry in the cache spec."""
        return {"name": self.name, "id": self.model_id, "input_size": self.input_size, "dim": self.dim}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_id={self.model_id!r}, input_size={self.input_size}, dim={self.dim})"
        )


class DinoEncoder(FrozenEncoder):
    """DINOv2 (with or without registers) patch tokens, per frame, final layer norm applied."""

    name = "dino"
    flag = "--dino-model"
    default_id = "facebook/dinov2-base"  # input 224, bicubic resize: the base defaults

    def __init__(self, model: torch.nn.Module, model_id: str, input_size: int, **kw: Any):
        cfg = model.config
        self.patch = int(cfg.patch_size)
        self.num_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        if input_size % self.patch:
            raise ValueError(f"dino input size {input_size} is not a multiple of its patch {self.patch}")
        super().__init__(model, model_id, input_size, int(cfg.hidden_size), **kw)

    @classmethod
    def _load_model(cls, id_or_path: str | Path, dtype: torch.dtype | None) -> torch.nn.Module:
        from transformers import AutoModel

        model, _ = cls._from_pretrained(AutoModel, id_or_path, dtype)
        if model.config.model_type not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(f"'{id_or_path}' is a {model.config.model_type} model, not DINOv2")
        return model

    def grid(self, frames: int) -> tuple[int, int, int]:
        g = self.input_size // self.patch
        return (frames, g, g)

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=pixels).last_hidden_state[:, self.num_prefix :]
        g = self.input_size // self.patch
        return hidden.reshape(pixels.shape[0], g, g, -1)


SAM2_SIZE_UNIT = 32  # Hiera's windowed position embedding is interpolated at multiples of 32


class Sam2Encoder(FrozenEncoder):
    """SAM2.1 image encoder (Hiera + FPN neck), stride-16 feature map, per frame."""

    name = "sam2"
    flag = "--sam2-model"
    default_id = "facebook/sam2.1-hiera-base-plus"
    default_input_size = 512
    resize_mode = "bilinear"
    stride = 16

    def __init__(self, model: torch.nn.Module, model_id: str, input_size: int, **kw: Any):
        if input_size % SAM2_SIZE_UNIT:
            raise ValueError(f"sam2 input size {input_size} must be a multiple of {SAM2_SIZE_UNIT}")
        super().__init__(model, model_id, input_size, int(model.config.fpn_hidden_size), **kw)

    @classmethod
    def _load_model(cls, id_or_path: str | Path, dtype: torch.dtype | None) -> torch.nn.Module:
        from transformers import Sam2VisionModel
        from transformers.utils import logging as hf_logging

        # Hub checkpoints hold the whole Sam2Model; only its `vision_encoder.*` weights are read.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the unused mask decoder / memory keys are expected
        try:
            model, missing = cls._from_pretrained(
                Sam2VisionModel, id_or_path, dtype, warn_missing=False, key_mapping={r"^vision_encoder\.": ""}
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        if missing:
            raise ValueError(
                f"'{id_or_path}' does not hold SAM2 image-encoder weights ({len(missing)} missing, "
                f"e.g. {missing[:2]}); pass a SAM2 checkpoint with {cls.flag}"
            )
        return model

    def grid(self, frames: int) -> tuple[int, int, int]:
        g = self.input_size // self.stride
        return (frames, g, g)

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        # fpn_hidden_states run high -> low resolution; the last kept level is stride 16.
        fmap = out.fpn_hidden_states[-1]
        if fmap.shape[-1] != self.input_size // self.stride:
            raise RuntimeError(f"sam2 feature map {tuple(fmap.shape)} is not stride {self.stride}")
        return fmap.permute(0, 2, 3, 1)


class VideoMAEEncoder(FrozenEncoder):
    """VideoMAE encoder tokens on its tubelet grid [B, F/tubelet, S/p, S/p, D]."""

    name = "videomae"
    flag = "--videomae-model"
    default_id = "MCG-NJU/videomae-base"
    resize_mode = "bilinear"  # input size: the model's image_size

    def __init__(self, model: torch.nn.Module, model_id: str, input_size: int, **kw: Any):
        cfg = model.config
        self.num_frames = int(cfg.num_frames)
        self.tubelet = int(cfg.tubelet_size)
        self.patch = int(cfg.patch_size)
        if input_size != int(cfg.image_size):
            raise ValueError(
                f"videomae has fixed position embeddings for {cfg.image_size} px input; got input_size={input_size}"
            )
        super().__init__(model, model_id, input_size, int(cfg.hidden_size), **kw)

    @classmethod
    def _load_model(cls, id_or_path: str | Path, dtype: torch.dtype | None) -> torch.nn.Module:
        from transformers import VideoMAEModel

        return cls._from_pretrained(VideoMAEModel, id_or_path, dtype)[0]

    @classmethod
    def _native_input_size(cls, config: Any) -> int:
        return int(config.image_size)  # fixed position embeddings

    def grid(self, frames: int) -> tuple[int, int, int]:
        g = self.input_size // self.patch
        return (self.num_frames // self.tubelet, g, g)

    def frame_indices(self, frames: int) -> torch.Tensor:
        """Nearest source frame for each of the model's ``num_frames`` inputs."""
        if frames == self.num_frames:
            return torch.arange(frames)
        return torch.linspace(0, frames - 1, self.num_frames).round().long()

    @torch.no_grad()
    def features(self, frames: torch.Tensor) -> torch.Tensor:
        self._check_frames(frames)
        b, t = frames.shape[:2]
        frames = frames[:, self.frame_indices(t)]
        t_out, g, _ = self.grid(t)
        clips_per_batch = max(1, self.frame_batch // self.num_frames)
        out = []
        for i in range(0, b, clips_per_batch):
            chunk = frames[i : i + clips_per_batch]
            n = chunk.shape[0]
            pixels = self.preprocess(chunk.reshape(n * self.num_frames, *chunk.shape[2:]))
            pixels = pixels.reshape(n, self.num_frames, *pixels.shape[1:])  # B,F,3,S,S
            with self._autocast():
                hidden = self.model(pixel_values=pixels).last_hidden_state
            out.append(hidden.float().reshape(n, t_out, g, g, -1))
        return torch.cat(out).contiguous()


class HogEncoder(FrozenEncoder):
    """Weight-free: MaskFeat's HOG per frame plus a normal-flow direction histogram
    (stages.common.models.hog), one token per cell and frame. `input_size` 0 (the default) keeps the
    clip's own resolution; another value resizes frames to it first (a multiple of the cell)."""

    name = "hog"
    flag = "--hog-model"
    default_id = "maskfeat-hog"  # built in memory: there are no weights to download
    resize_mode = "bilinear"

    def __init__(self, model: torch.nn.Module, model_id: str, input_size: int, **kw: Any):
        self.cell = int(model.config.cell)
        if input_size % self.cell:
            raise ValueError(f"hog input size {input_size} is not a multiple of its cell {self.cell}")
        super().__init__(model, model_id, input_size, int(model.dim), **kw)

    @classmethod
    def load(
        cls,
        id_or_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        input_size: int | None = None,
    ) -> FrozenEncoder:
        from stages.common.models.hog import HogFlow

        source = str(id_or_path or cls.default_id)
        if source == cls.default_id:
            model = HogFlow()
        elif Path(source).is_dir():
            model = HogFlow.from_pretrained(source)
        else:
            raise WeightsNotFoundError(
                source,
                cls.flag,
                f"hog is built in as '{cls.default_id}'; any other source must be a folder "
                "saved by HogFlow.save_pretrained (e.g. `pipeline models build`'s random-hog)",
            )
        return cls(model, source, int(input_size or 0), device=device)

    def _param_dtype(self) -> torch.dtype:
        return torch.float32

    def grid(self, frames: int, size: int | None = None) -> tuple[int, int, int]:
        """(frames, cells, cells) for square frames of `size` px (the input size when it is set)."""
        side = self.input_size or size
        if not side:
            raise ValueError("hog follows the clip's size: pass size=")
        return (frames, side // self.cell, side // self.cell)

    @torch.no_grad()
    def features(self, frames: torch.Tensor) -> torch.Tensor:
        self._check_frames(frames)
        b, t, h, w, _ = frames.shape
        x = frames.to(self.device).permute(0, 1, 4, 2, 3).float().flatten(0, 1) / 255.0
        if self.input_size and (h, w) != (self.input_size, self.input_size):
            x = resize_center_crop(x, self.input_size, self.resize_mode).clamp(0.0, 1.0)
        return self.model(x.unflatten(0, (b, t)))


ENCODERS: dict[str, type[FrozenEncoder]] = {
    DinoEncoder.name: DinoEncoder,
    Sam2Encoder.name: Sam2Encoder,
    VideoMAEEncoder.name: VideoMAEEncoder,
    HogEncoder.name: HogEncoder,
}


def load_encoder(
    name: str,
    id_or_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    input_size: int | None = None,
) -> FrozenEncoder:
    """Load a frozen encoder by registry name from a hub id or a local save_pretrained folder."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder '{name}'; choose from {sorted(ENCODERS)}")
    return ENCODERS[name].load(id_or_path, device=device, dtype=dtype, input_size=input_size)
