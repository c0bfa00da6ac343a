"""FVD feature detectors: StyleGAN-V's TorchScript I3D and an original VideoMAE-v2 checkpoint.

Both take uint8 videos [B, T, H, W, 3] and return float32 features [B, D]. Each applies its
own protocol's preprocessing so that stats computed anywhere are comparable:

- ``i3d`` (FVD, StyleGAN-V protocol): bilinear resize to 224x224, values in [-1, 1], the
  TorchScript model called with ``rescale=False, resize=False, return_features=True`` (400-d).
- ``videomae-v2`` (content-debiased FVD, Ge et al. 2024): 16 frames, bilinear 224x224, values
  in [0, 1] with no mean/std, ViT features mean-pooled over tokens then the checkpoint's
  ``fc_norm`` LayerNorm (1408-d for ViT-g/14).

The VideoMAE-v2 checkpoint is read in its original layout (``patch_embed.proj``,
``blocks.N.attn.qkv`` + ``q_bias``/``v_bias``, ``norm1``, ``mlp.fc1``, ``fc_norm``, ``head``)
and mapped onto ``transformers.VideoMAEModel``; the architecture is inferred from the tensors.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DETECTORS = ("i3d", "videomae-v2")
_HASH_CACHE: dict[tuple[str, int, int], str] = {}

# embed dim -> heads of the published ViT sizes (S, B, L, H, g); others fall back to 64-d heads
KNOWN_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
VIDEOMAE_LN_EPS = 1e-6  # the VideoMAE-v2 definition builds its LayerNorms with eps=1e-6


class DetectorError(ValueError):
    """A detector that cannot be built from what it was given."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a weights file, memoised per (path, size, mtime) since checkpoints are GBs."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with p.open("rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def _as_tensor(videos: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(videos)
    if x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 videos of shape [B, T, H, W, 3], got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 videos, got {x.dtype}")
    return x


def resize_frames(videos: torch.Tensor, size: int) -> torch.Tensor:
    """[B, T, H, W, 3] uint8 -> float [B, T, 3, size, size] in [0, 255], bilinear, no antialias
    (what both reference protocols do: F.interpolate, align_corners=False)."""
    b, t, h, w, c = videos.shape
    x = videos.reshape(b * t, h, w, c).permute(0, 3, 1, 2).float()
    if (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.reshape(b, t, c, size, size)


@dataclass
class Detector:
    """Base: name, weights hash and the protocol fields a detector fixes."""

    name: str
    weights: str
    weights_sha256: str
    input_size: int
    device: torch.device
    dtype: torch.dtype = torch.float32
    feature_dim: int | None = None
    frames: int | None = None  # frames the model requires (None: any)

    def protocol(self) -> dict[str, Any]:
        return {"detector": self.name, "weights_sha256": self.weights_sha256}

    def _autocast(self):
        enabled = self.device.type == "cuda" and self.dtype != torch.float32
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=enabled)

    @torch.no_grad()
    def features(self, videos: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 [B, T, H, W, 3] -> float32 [B, D]."""
        x = _as_tensor(videos)
        if self.frames is not None and x.shape[1] != self.frames:
            raise ValueError(f"detector {self.name} needs {self.frames} frames per video, got {x.shape[1]}")
        with self._autocast():
            out = self._forward(x)
        out = out.float().cpu().numpy()
        self.feature_dim = int(out.shape[1])
        return out

    def _forward(self, videos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class I3DDetector(Detector):
    """StyleGAN-V's TorchScript I3D (i3d_torchscript.pt)."""

    model: Any = None

    def _forward(self, videos: torch.Tensor) -> torch.Tensor:
        x = resize_frames(videos.to(self.device), self.input_size)  # [B, T, 3, S, S]
        x = (x * (2.0 / 255.0) - 1.0).permute(0, 2, 1, 3, 4).contiguous()  # [B, 3, T, S, S] in [-1, 1]
        out = self.model(x, rescale=False, resize=False, return_features=True)
        if out.ndim != 2:
            raise DetectorError(f"I3D model returned shape {tuple(out.shape)}, expected [B, features]")
        return out


def load_i3d(path: str | Path, device: str | torch.device = "cpu") -> I3DDetector:
    """Load the TorchScript I3D from a local file."""
    p = _require_file(path, "i3d", "StyleGAN-V's i3d_torchscript.pt")
    device = torch.device(device)
    try:
        model = torch.jit.load(str(p), map_location=device).eval()
    except RuntimeError as exc:
        raise DetectorError(
            f"{p} is not a TorchScript model (expected StyleGAN-V's i3d_torchscript.pt): {exc}"
        ) from None
    return I3DDetector(
        name="i3d", weights=str(p), weights_sha256=sha256_file(p), input_size=224, device=device, model=model
    )


# --------------------------------------------------------------------------- VideoMAE-v2


@dataclass
class VideoMAEArch:
    """Architecture read off an original VideoMAE-v2 state dict."""

    hidden_size: int
    depth: int
    num_heads: int
    intermediate_size: int
    patch_size: int
    tubelet_size: int
    qv_bias: bool
    learned_pos_embed: bool


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def read_videomae_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an original checkpoint: a plain state dict or one under 'model'/'module'."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(p))
    else:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:  # original training checkpoints also pickle argparse args
            warnings.warn(
                f"{p}: weights-only load failed ({type(exc).__name__}); loading the full pickle. "
                "Only do this for checkpoints you trust.",
                stacklevel=2,
            )
            obj = torch.load(str(p), map_location="cpu", weights_only=False)
    if isinstance(obj, dict):
        for key in ("model", "module", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DetectorError(f"{p} does not hold a VideoMAE-v2 state dict (tensors by name)")
    return _strip_prefixes(dict(obj))


def infer_videomae_arch(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> VideoMAEArch:
    """Hidden size, depth, heads, MLP width, patch and tubelet size from the tensors."""
    if "patch_embed.proj.weight" not in sd:
        if any(k.startswith("encoder.") for k in sd):
            raise DetectorError(
                "this looks like a VideoMAE-v2 *pre-training* checkpoint (encoder./decoder. keys); "
                "content-debiased FVD uses the fine-tuned one (vit_g_hybrid_pt_1200e_ssv2_ft.pth)"
            )
        raise DetectorError("not a VideoMAE-v2 checkpoint: no 'patch_embed.proj.weight'")
    w = sd["patch_embed.proj.weight"]  # [D, 3, tubelet, p, p]
    if w.ndim != 5 or w.shape[1] != 3 or w.shape[3] != w.shape[4]:
        raise DetectorError(f"patch_embed.proj.weight has shape {tuple(w.shape)}, expected [D, 3, t, p, p]")
    hidden, tubelet, patch = int(w.shape[0]), int(w.shape[2]), int(w.shape[3])
    block_ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not block_ids or block_ids != set(range(max(block_ids) + 1)):
        raise DetectorError(f"checkpoint blocks are missing or not contiguous: {sorted(block_ids)}")
    qkv = sd["blocks.0.attn.qkv.weight"]
    if tuple(qkv.shape) != (3 * hidden, hidden):
        raise DetectorError(
            f"blocks.0.attn.qkv.weight has shape {tuple(qkv.shape)}; only head_dim * heads == hidden "
            f"({hidden}) is supported"
        )
    if "blocks.0.attn.scale" in sd:
        raise DetectorError("cosine-attention VideoMAE-v2 variants are not supported")
    if num_heads is None:
        num_heads = KNOWN_HEADS.get(hidden, hidden // 64 if hidden % 64 == 0 else 0)
        if not num_heads:
            raise DetectorError(
                f"cannot infer the head count for hidden size {hidden}; pass num_heads (--set num_heads=H)"
            )
    if hidden % num_heads:
        raise DetectorError(f"hidden size {hidden} is not a multiple of num_heads={num_heads}")
    if "fc_norm.weight" not in sd:
        raise DetectorError(
            "checkpoint has no 'fc_norm' (mean-pooling head); content-debiased FVD needs the "
            "fine-tuned VideoMAE-v2 with use_mean_pooling=True"
        )
    return VideoMAEArch(
        hidden_size=hidden,
        depth=max(block_ids) + 1,
        num_heads=int(num_heads),
        intermediate_size=int(sd["blocks.0.mlp.fc1.weight"].shape[0]),
        patch_size=patch,
        tubelet_size=tubelet,
        qv_bias="blocks.0.attn.q_bias" in sd,
        learned_pos_embed="pos_embed" in sd,
    )


def map_videomae_keys(
    sd: dict[str, torch.Tensor], arch: VideoMAEArch
) -> tuple[dict[str, torch.Tensor], dict]:
    """Original names -> transformers VideoMAEModel names. Returns (model state, fc_norm state).

    Layer scale (gamma_1/gamma_2), when present, is folded into the attention output and the
    second MLP layer, which is exact since it multiplies their outputs channel-wise.
    """
    d = arch.hidden_size
    out: dict[str, torch.Tensor] = {
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
    }
    used = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"}
    for i in range(arch.depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."

        def take(name: str, _src: str = src) -> torch.Tensor:
            key = _src + name
            if key not in sd:
                raise DetectorError(f"checkpoint is missing '{key}'")
            used.add(key)
            return sd[key]

        q, k, v = take("attn.qkv.weight").split(d, dim=0)
        out[dst + "attention.attention.query.weight"] = q
        out[dst + "attention.attention.key.weight"] = k
        out[dst + "attention.attention.value.weight"] = v
        if arch.qv_bias:
            out[dst + "attention.attention.query.bias"] = take("attn.q_bias")
            out[dst + "attention.attention.value.bias"] = take("attn.v_bias")
        proj_w, proj_b = take("attn.proj.weight"), take("attn.proj.bias")
        fc2_w, fc2_b = take("mlp.fc2.weight"), take("mlp.fc2.bias")
        if src + "gamma_1" in sd:
            g1, g2 = take("gamma_1"), take("gamma_2")
            proj_w, proj_b = proj_w * g1[:, None], proj_b * g1
            fc2_w, fc2_b = fc2_w * g2[:, None], fc2_b * g2
        out[dst + "attention.output.dense.weight"] = proj_w
        out[dst + "attention.output.dense.bias"] = proj_b
        out[dst + "output.dense.weight"] = fc2_w
        out[dst + "output.dense.bias"] = fc2_b
        out[dst + "intermediate.dense.weight"] = take("mlp.fc1.weight")
        out[dst + "intermediate.dense.bias"] = take("mlp.fc1.bias")
        out[dst + "layernorm_before.weight"] = take("norm1.weight")
        out[dst + "layernorm_before.bias"] = take("norm1.bias")
        out[dst + "layernorm_after.weight"] = take("norm2.weight")
        out[dst + "layernorm_after.bias"] = take("norm2.bias")
    fc_norm = {"weight": sd["fc_norm.weight"], "bias": sd["fc_norm.bias"]}
    used |= {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    leftover = sorted(k for k in sd if k not in used)
    if leftover:
        raise DetectorError(f"checkpoint has tensors this loader does not understand: {leftover[:8]}")
    return out, fc_norm


@dataclass
class VideoMAEv2Detector(Detector):
    """transformers VideoMAEModel + the checkpoint's fc_norm over mean-pooled tokens."""

    model: Any = None
    fc_norm: Any = None

    def _forward(self, videos: torch.Tensor) -> torch.Tensor:
        x = resize_frames(videos.to(self.device), self.input_size) / 255.0  # [B, T, 3, S, S] in [0, 1]
        hidden = self.model(pixel_values=x).last_hidden_state
        return self.fc_norm(hidden.mean(dim=1))


def load_videomae_v2(
    path: str | Path,
    device: str | torch.device = "cpu",
    num_heads: int | None = None,
    num_frames: int = 16,
    image_size: int = 224,
) -> VideoMAEv2Detector:
    """Build the detector from an original VideoMAE-v2 fine-tuned checkpoint (.pth/.pt/.safetensors)."""
    from transformers import VideoMAEConfig, VideoMAEModel

    p = _require_file(path, "videomae-v2", "vit_g_hybrid_pt_1200e_ssv2_ft.pth")
    sd = read_videomae_state_dict(p)
    arch = infer_videomae_arch(sd, num_heads)
    if image_size % arch.patch_size or num_frames % arch.tubelet_size:
        raise DetectorError(
            f"input {num_frames}x{image_size}x{image_size} is not divisible by tubelet {arch.tubelet_size} "
            f"and patch {arch.patch_size}"
        )
    config = VideoMAEConfig(
        image_size=image_size,
        patch_size=arch.patch_size,
        num_channels=3,
        num_frames=num_frames,
        tubelet_size=arch.tubelet_size,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.depth,
        num_attention_heads=arch.num_heads,
        intermediate_size=arch.intermediate_size,
        hidden_act="gelu",
        layer_norm_eps=VIDEOMAE_LN_EPS,
        qv_bias=arch.qv_bias,
        use_mean_pooling=True,
    )
    model = VideoMAEModel(config)
    mapped, fc_norm_sd = map_videomae_keys(sd, arch)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise DetectorError(
            f"VideoMAE-v2 mapping mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    n_patches = model.embeddings.num_patches
    if arch.learned_pos_embed:
        pos = sd["pos_embed"].float()
        if tuple(pos.shape) != (1, n_patches, arch.hidden_size):
            raise DetectorError(
                f"pos_embed has shape {tuple(pos.shape)} but {num_frames} frames at {image_size}px give "
                f"{n_patches} tokens of {arch.hidden_size}"
            )
        model.embeddings.position_embeddings = pos
    fc_norm = torch.nn.LayerNorm(arch.hidden_size, eps=VIDEOMAE_LN_EPS)
    fc_norm.load_state_dict(fc_norm_sd)
    device = torch.device(device)
    return VideoMAEv2Detector(
        name="videomae-v2",
        weights=str(p),
        weights_sha256=sha256_file(p),
        input_size=image_size,
        device=device,
        frames=num_frames,
        feature_dim=arch.hidden_size,
        model=model.eval().to(device),
        fc_norm=fc_norm.eval().to(device),
    )


def _require_file(path: str | Path | None, name: str, what: str) -> Path:
    if not path:
        raise DetectorError(f"detector '{name}' needs its weights: pass --detector-weights PATH ({what})")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DetectorError(
            f"weights for detector '{name}' not found at {p}; download {what} and pass --detector-weights PATH"
        )
    return p


def load_detector(
    name: str, weights: str | Path | None, device: str | torch.device = "cpu", **options: Any
) -> Detector:
    """`i3d` or `videomae-v2` from a local weights file."""
    if name == "i3d":
        return load_i3d(weights, device)  # type: ignore[arg-type]
    if name in ("videomae-v2", "videomae"):
        return load_videomae_v2(weights, device, **options)  # type: ignore[arg-type]
    raise DetectorError(f"unknown detector '{name}'; choose one of {', '.join(DETECTORS)}")
