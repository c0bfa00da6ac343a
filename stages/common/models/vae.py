"""VAE wrapper (diffusers) and the shared "weights not found" error.

Why a wrapper: extract, sample and evaluate all need the same three things from a VAE:
uint8 video clips in, scaled posterior-mean latents out (fp16, the cache dtype), and the
way back to uint8 frames. Two kinds are supported:

- ``kind="image"``: diffusers ``AutoencoderKL`` applied frame by frame (Latte's choice,
  default ``stabilityai/sd-vae-ft-ema``, scale 0.18215, 8x spatial, no temporal compression).
- ``kind="video"``: diffusers ``AutoencoderKLCogVideoX`` (default ``THUDM/CogVideoX-2b``,
  ``subfolder="vae"``), causal 3D VAE with temporal compression ``k`` read from its config.
  Video VAEs usually ship inside a pipeline repo; any such repo (hub id or local folder) is
  recognised and its ``vae/`` subfolder used (``_pipeline_vae_subfolder``).
- ``kind="wan"``: diffusers ``AutoencoderKLWan`` (default the Wan2.1-T2V-1.3B pipeline's ``vae/``),
  causal 3D VAE, 8x spatial, 4x temporal (1 + (T-1)/4 latent frames; other T are refused). Its
  latents are normalised per channel as WanPipeline un-does before decoding:
  z = (mu - latents_mean) / latents_std, so the cache holds what the transformer trains on.
- ``kind="pixel"``: no network at all: an exact space-to-depth patchify (``patchify-F``,
  `stages.common.models.pixel`), as pixel-space diffusion transformers use. decode(encode(x)) == x.

diffusers is imported lazily so importing this module (and ``WeightsNotFoundError``) is cheap.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.common.registry import CAUSAL_VAE_KINDS, DEFAULT_VAE, VAE_KINDS
from stages.common.registry import SD_LATENT_SCALE as SD_SCALE


class WeightsNotFoundError(RuntimeError):
    """A model's weights are not available locally (offline run, missing path or unknown id)."""

    def __init__(self, model: str, flag: str, detail: str | None = None):
        self.model = str(model)
        self.flag = flag
        msg = (
            f"weights for model '{self.model}' were not found locally. Download them on a machine "
            f"with network access (e.g. `hf download {self.model}`) or point {flag} PATH at a "
            f"local copy (a folder written by save_pretrained)."
        )
        if detail:
            msg += f" [{detail.strip().splitlines()[0][:300]}]"
        super().__init__(msg)


def _looks_like_path(id_or_path: str) -> bool:
    """A string that can only be a filesystem path, never a hub id ("org/name" or "name")."""
    s = str(id_or_path)
    return s.startswith(("/", "./", "../", "~", ".\\")) or "\\" in s or s.count("/") > 1


def hub_kwargs(id_or_path: str | Path, model_flag: str) -> tuple[str, dict[str, Any]]:
    """Resolve a hub id or a local folder to from_pretrained arguments, failing fast if missing.

    A local folder (or ``HF_HUB_OFFLINE=1``) sets ``local_files_only=True`` so nothing ever
    waits on the network. A string that can only be a path but does not exist fails at once.
    """
    s = str(id_or_path)
    expanded = os.path.expanduser(s)
    if os.path.isdir(expanded):
        return expanded, {"local_files_only": True}
    if isinstance(id_or_path, Path) or _looks_like_path(s) or os.path.exists(expanded):
        if not os.path.exists(expanded):
            raise WeightsNotFoundError(s, model_flag, "no such local folder")
        raise WeightsNotFoundError(s, model_flag, "expected a folder written by save_pretrained")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return s, ({"local_files_only": True} if offline else {})


def load_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "these weights are not here" for transformers/diffusers loaders."""
    errs: list[type[BaseException]] = [OSError, EnvironmentError]
    try:
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        errs += [LocalEntryNotFoundError, HFValidationError]
    except ImportError:  # pragma: no cover - very old huggingface_hub
        pass
    return tuple(errs)


@contextlib.contextmanager
def weights_not_found_as_error(id_or_path: str | Path, flag: str):
    """Turn a loader's "these weights are not here" errors (load_errors) into a
    WeightsNotFoundError that says which flag points at the weights."""
    try:
        yield
    except load_errors() as e:
        raise WeightsNotFoundError(str(id_or_path), flag, f"{type(e).__name__}: {e}") from e


class FrozenModel:
    """A pretrained model run for inference only: eval mode, no gradients, inputs in batches of
    ``frame_batch`` frames on ``device``, bf16 autocast on CUDA when ``amp``. The VAE and the
    encoders share this (uint8 clips in, their own outputs out)."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: str | torch.device = "cpu",
        frame_batch: int = 32,
        amp: bool = True,
    ):
        self.model = model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.frame_batch = int(frame_batch)
        self.amp = bool(amp)

    def _autocast(self):
        if self.device.type == "cuda" and self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _param_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @staticmethod
    def _check_frames(frames: torch.Tensor) -> None:
        if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
            raise TypeError("frames must be a uint8 tensor [B,T,H,W,3]")
        if frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(f"frames must have shape [B,T,H,W,3], got {tuple(frames.shape)}")


def _repo_has(src: str, filename: str, local_only: bool) -> bool:
    """Whether a local folder or a hub repo (cache only when `local_only`) holds `filename`."""
    if os.path.isdir(src):
        return os.path.isfile(os.path.join(src, filename))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:  # a small file; from_pretrained would fetch it anyway
        hf_hub_download(src, filename, local_files_only=local_only)
    except (*load_errors(), EntryNotFoundError, ValueError):  # absent, not cached, offline, unreachable
        return False
    return True


def _pipeline_vae_subfolder(src: str, local_only: bool) -> str | None:
    """ "vae" when `src` is a diffusers pipeline (model_index.json at the root, or no root
    config.json but a vae/config.json), as CogVideoX repos are; None for a bare VAE."""
    if _repo_has(src, "model_index.json", local_only):
        return "vae"
    if not _repo_has(src, "config.json", local_only) and _repo_has(src, "vae/config.json", local_only):
        return "vae"
    return None


@dataclass(frozen=True)
class _Info:
    kind: str
    model_id: str
    scale: float
    latent_channels: int
    spatial_factor: int
    temporal_factor: int


def _wan_stats(cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoencoderKLWan's per-channel latents_mean and latents_std, shaped [1, C, 1, 1, 1]."""
    shape = (1, int(cfg.z_dim), 1, 1, 1)
    return torch.tensor(cfg.latents_mean).view(shape), torch.tensor(cfg.latents_std).view(shape)


class VAEWrapper(FrozenModel):
    """uint8 clips <-> scaled fp16 latents, for an image VAE (per frame) or a video VAE."""

    def __init__(
        self,
        model: torch.nn.Module,
        kind: str,
        model_id: str,
        scale: float,
        device: str | torch.device = "cpu",
        frame_batch: int = 32,
        amp: bool = True,
    ):
        if kind not in VAE_KINDS:
            raise ValueError(f"VAE kind must be one of {', '.join(VAE_KINDS)}, got {kind!r}")
        super().__init__(model, device, frame_batch, amp)
        self.kind = kind
        if kind == "pixel":
            channels, spatial, temporal = 3 * model.factor**2, model.factor, 1
        elif kind == "wan":  # the factors WanPipeline reads
            cfg = model.config
            channels, spatial, temporal = (
                int(cfg.z_dim),
                int(cfg.scale_factor_spatial),
                int(cfg.scale_factor_temporal),
            )
            self._wan_stats = _wan_stats(cfg)
        else:
            cfg = model.config
            channels, spatial = int(cfg.latent_channels), 2 ** (len(cfg.block_out_channels) - 1)
            temporal = int(getattr(cfg, "temporal_compression_ratio", 1) or 1) if kind == "video" else 1
        self.info = _Info(
            kind=kind,
            model_id=str(model_id),
            scale=float(scale),
            latent_channels=channels,
            spatial_factor=spatial,
            temporal_factor=temporal,
        )

    def _param_dtype(self) -> torch.dtype:
        return torch.float32 if self.kind == "pixel" else super()._param_dtype()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        id_or_path: str | Path | None = None,
        kind: str = "image",
        scale: float | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        subfolder: str | None = None,
        flag: str = "--vae",
        amp: bool = True,
    ) -> VAEWrapper:
        """Load from a hub id or a local save_pretrained folder (for a video VAE also a pipeline
        repo or folder, whose ``vae/`` subfolder is used unless ``subfolder`` is given).

        ``scale=None`` takes ``scaling_factor`` from the model config (SD's 0.18215 for
        sd-vae-ft-ema; right for video VAEs, whose scale differs), and 1 for pixel space. ``amp`` runs under bf16 autocast on CUDA
        (faster; latents are stored in fp16 anyway); pass False for full fp32 on GPU.
        """
        if kind not in VAE_KINDS:
            raise ValueError(f"VAE kind must be one of {', '.join(VAE_KINDS)}, got {kind!r}")
        if kind == "pixel":
            from stages.common.models.pixel import PIXEL_SCALE, Patchify, parse_pixel_id

            factor = parse_pixel_id(None if id_or_path is None else str(id_or_path))
            model_id = f"patchify-{factor}"
            scale = PIXEL_SCALE if scale is None else scale
            return cls(Patchify(factor).to(device), kind, model_id, scale, device=device, amp=amp)
        if id_or_path is None:
            id_or_path = DEFAULT_VAE[kind]
            if kind in CAUSAL_VAE_KINDS and subfolder is None:
                subfolder = "vae"
        import diffusers

        klass = {"image": diffusers.AutoencoderKL, "video": diffusers.AutoencoderKLCogVideoX}.get(kind)
        klass = klass or diffusers.AutoencoderKLWan
        src, kwargs = hub_kwargs(id_or_path, flag)
        if kind in CAUSAL_VAE_KINDS and subfolder is None:
            subfolder = _pipeline_vae_subfolder(src, bool(kwargs.get("local_files_only")))
        if subfolder:
            kwargs["subfolder"] = subfolder
        with weights_not_found_as_error(id_or_path, flag):
            model = klass.from_pretrained(src, torch_dtype=dtype, low_cpu_mem_usage=False, **kwargs)
        if scale is None:  # Wan normalises per channel (latents_mean / latents_std), no global scale
            scale = 1.0 if kind == "wan" else float(getattr(model.config, "scaling_factor", SD_SCALE))
        return cls(model.to(device), kind, str(id_or_path), scale, device=device, amp=amp)

    # --------------------------------------------------------------- properties
    @property
    def model_id(self) -> str:
        return self.info.model_id

    @property
    def scale(self) -> float:
        return self.info.scale

    @property
    def latent_channels(self) -> int:
        return self.info.latent_channels

    @property
    def spatial_factor(self) -> int:
        return self.info.spatial_factor

    @property
    def temporal_factor(self) -> int:
        return self.info.temporal_factor

    def latent_frames(self, frames: int) -> int:
        """Latent frames for a clip of ``frames`` frames (causal video VAEs keep frame 0 alone)."""
        k = self.temporal_factor
        if k == 1:
            return frames
        if self.kind == "wan":
            if frames < 1 or (frames - 1) % k:
                raise ValueError(
                    f"the Wan VAE '{self.model_id}' encodes frame 0 alone and then {k} frames per latent "
                    f"frame: clips need 1 + {k}*j frames (e.g. {1 + k}, {1 + 4 * k}, 81), got {frames}"
                )
            return 1 + (frames - 1) // k
        return frames // k if frames % k == 0 else (frames - 1) // k + 1

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', h, w) of one clip's latents, without running the model."""
        f = self.spatial_factor
        if height % f or width % f:
            raise ValueError(f"frame size {height}x{width} is not a multiple of the VAE factor {f}")
        return (self.latent_channels, self.latent_frames(frames), height // f, width // f)

    def spec(self) -> dict[str, Any]:
        """The VAE part of the cache spec (see the cache contract)."""
        return {
            "id": self.model_id,
            "scale": self.scale,
            "latent_channels": self.latent_channels,
            "spatial_factor": self.spatial_factor,
            "temporal_factor": self.temporal_factor,
        }

    # -------------------------------------------------------------- conversion
    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [B,T,H,W,3] -> fp16 latents [B,C,T',h,w] = posterior mean * scale (on the VAE's device)."""
        self._check_frames(frames)
        b, t, h, w, _ = frames.shape
        f = self.spatial_factor
        if h % f or w % f:
            raise ValueError(f"frame size {h}x{w} is not a multiple of the VAE factor {f}")
        self.latent_frames(t)  # a Wan VAE refuses T with (T - 1) % 4 != 0
        x = frames.to(self.device).permute(0, 1, 4, 2, 3).to(self._param_dtype())  # B,T,3,H,W
        x = x / 127.5 - 1.0
        with self._autocast():
            if self.kind == "pixel":
                z = self.model(x.reshape(b * t, 3, h, w)).float()
                z = z.reshape(b, t, -1, h // f, w // f).permute(0, 2, 1, 3, 4)
            elif self.kind == "image":
                flat = x.reshape(b * t, 3, h, w)
                means = [
                    self.model.encode(flat[i : i + self.frame_batch]).latent_dist.mean
                    for i in range(0, flat.shape[0], self.frame_batch)
                ]
                z = torch.cat(means).float().reshape(b, t, -1, h // f, w // f).permute(0, 2, 1, 3, 4)
            else:
                z = self.model.encode(x.permute(0, 2, 1, 3, 4)).latent_dist.mean.float()
        if self.kind == "wan":
            mean, std = (s.to(z.device) for s in self._wan_stats)
            z = (z - mean) / std
        return (z * self.scale).to(torch.float16).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B,C,T',h,w] (scaled) -> uint8 frames [B,T,H,W,3] on the CPU."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must have shape [B,{self.latent_channels},T',h,w], got {tuple(latents.shape)}"
            )
        z = latents.to(self.device, self._param_dtype()) / self.scale
        if self.kind == "wan":  # as WanPipeline, operation for operation: latents / (1 / std) + mean
            mean, std = self._wan_stats
            z = z / (1.0 / std).to(z.device, z.dtype) + mean.to(z.device, z.dtype)
        b, c, t, h, w = z.shape
        with self._autocast():
            if self.kind == "pixel":
                x = self.model.inverse(z.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w).float())
                x = x.reshape(b, t, 3, x.shape[-2], x.shape[-1])
            elif self.kind == "image":
                flat = z.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
                outs = [
                    self.model.decode(flat[i : i + self.frame_batch]).sample.float()
                    for i in range(0, flat.shape[0], self.frame_batch)
                ]
                x = torch.cat(outs).reshape(b, t, 3, outs[0].shape[-2], outs[0].shape[-1])
            else:
                x = self.model.decode(z).sample.float().permute(0, 2, 1, 3, 4)  # B,T,3,H,W
        x = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        return x.permute(0, 1, 3, 4, 2).contiguous().cpu()
