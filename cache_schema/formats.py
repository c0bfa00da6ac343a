"""Compact on-disk formats for alignment targets, PCA bases, and the reconstruction the trainer runs.

A clip's float16 targets of three encoders take 14.7 MB; the formats here shrink them:

- ``float16``: the tokens as they are (the lossless baseline).
- ``int8``: symmetric per-token quantisation, one float16 scale per token (``absmax / 127``).
- ``int4``: each group of 32 consecutive channels is rotated by the fixed orthonormal 32-point
  Hadamard matrix (as QuaRot/QuIP# do before 4-bit quantisation, so an outlier channel is spread
  over its group), then quantised symmetrically with one float16 scale per group; codes in
  [-7, 7] packed two per byte (low nibble = even channel). Nothing is fitted to data.

Scales are computed in float32 and rounded *up* to the next float16 (so ``|x / scale|`` never
exceeds the code range and a tiny nonzero scale never becomes 0); values are quantised against that
stored scale, so ``decode(encode(x))`` is exactly what a reader sees. Scales below float16's normal
range (absmax < ~7.7e-3 for int8, < ~4.3e-4 for an int4 group) lose relative precision; an
L2-normalised token with D <= 768 never gets there under int8 (its absmax is >= 1/sqrt(D)), and an
int4 group that small carries a negligible share of the token's norm. Inputs whose absmax would overflow the
float16 scale raise instead of saturating.

PCA (``--pca-dims``) is fitted on a sample of clips with a streaming float64 covariance (pairwise
update of Chan, Golub & LeVeque 1979, "Updating formulae and a pairwise algorithm for computing
sample variances") and its coefficients are stored in one of the formats above.

This module is part of the cache contract: it imports nothing from ``stages`` and imports torch
lazily (light CLI commands import the package).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class FormatSpec:
    """One target format: bits per value and channels per scale (None: one scale per token)."""

    name: str
    bits: int
    group: int | None
    description: str

    @property
    def has_scales(self) -> bool:
        return self.bits < 16

    @property
    def qmax(self) -> int:
        """Largest code magnitude (symmetric codes in [-qmax, qmax]); 0 for float16."""
        return (1 << (self.bits - 1)) - 1 if self.has_scales else 0


TARGET_FORMATS: dict[str, FormatSpec] = {
    "float16": FormatSpec("float16", 16, None, "float16 tokens, lossless (2 bytes/channel)"),
    "int8": FormatSpec("int8", 8, None, "int8 codes, one float16 scale per token (~1/2 of float16)"),
    "int4": FormatSpec(
        "int4",
        4,
        32,
        "4-bit codes packed 2/byte after a fixed Hadamard rotation of each 32 channels, one float16 scale "
        "per 32 channels (~1/3.5 of float16)",
    ),
}
DEFAULT_TARGET_FORMAT = "int8"


def check_format(name: str) -> FormatSpec:
    """The FormatSpec for ``name``; ValueError naming the choices otherwise."""
    spec = TARGET_FORMATS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown target format {name!r}; choose one of {sorted(TARGET_FORMATS)}")
    return spec


def check_dim(fmt: str, dim: int) -> int:
    """The stored token dim a format can hold (int4 packs two channels per byte: even dims only)."""
    spec = check_format(fmt)
    dim = int(dim)
    if dim < 1:
        raise ValueError(f"token dim must be >= 1, got {dim}")
    if spec.name == "int4" and dim % 2:
        raise ValueError(
            f"{dim} is odd; int4 packs two channels per byte, so the stored token dim must be even "
            f"(use {dim + 1})"
        )
    return dim


def stored_layout(fmt: str, dim: int) -> dict[str, tuple[int, str] | None]:
    """Last-axis size and numpy dtype of the stored ``values`` and ``scales`` (None: no scales)."""
    spec = check_format(fmt)
    dim = check_dim(fmt, dim)
    if spec.name == "float16":
        return {"values": (dim, "float16"), "scales": None}
    if spec.name == "int8":
        return {"values": (dim, "int8"), "scales": (1, "float16")}
    assert spec.group is not None
    return {"values": (dim // 2, "uint8"), "scales": (math.ceil(dim / spec.group), "float16")}


def bytes_per_token(fmt: str, dim: int) -> int:
    """Raw (uncompressed) bytes of values + scales for one token."""
    total = 0
    for part in stored_layout(fmt, dim).values():
        if part is not None:
            total += part[0] * np.dtype(part[1]).itemsize
    return total


def _as_tensor(x: Any) -> torch.Tensor:
    import torch

    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def _check_range(x: torch.Tensor, limit: float, fmt: str) -> None:
    """Raise on NaN/inf or values the format's float16 storage cannot represent (one device sync)."""
    if x.numel() == 0:
        return
    peak = float(x.abs().max())
    if not math.isfinite(peak):
        raise ValueError(f"cannot encode non-finite values as {fmt} (found absmax {peak})")
    if peak > limit:
        raise ValueError(f"absmax {peak:.4g} exceeds what {fmt} can store (<= {limit:.4g})")


def _scale_up_f16(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """float16 scale >= absmax/qmax (rounded up by one ulp where float16 rounding went down)."""
    import torch

    s32 = (absmax.float() / qmax).clamp(max=FLOAT16_MAX)
    s16 = s32.to(torch.float16)
    low = s16.float() < s32
    bumped = (s16.view(torch.int16) + 1).view(torch.float16)
    return torch.where(low, bumped, s16)


def _quantise(x: torch.Tensor, s16: torch.Tensor, qmax: int) -> torch.Tensor:
    """round(x / scale) clamped to [-qmax, qmax]; zero scale (all-zero slice) gives code 0."""
    import torch

    s = s16.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(x / safe).clamp_(-qmax, qmax).to(torch.int8)


def _pad_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """[..., D] -> [..., ceil(D/group), group], zero-padding the last group."""
    import torch.nn.functional as F

    d = x.shape[-1]
    pad = (-d) % group
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], (d + pad) // group, group)


def _hadamard(n: int, device: Any) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix H_n / sqrt(n) (symmetric: its own inverse)."""
    import torch

    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _rotate_groups(g: torch.Tensor, dim: int) -> torch.Tensor:
    """Rotate each complete group [..., G, group] by the group-size Hadamard matrix (a short last
    group stays as it is). Why: an outlier channel (DINOv2 has a few) would otherwise set its
    group's scale and flatten the other 31 channels to code 0; the rotation spreads it over the
    group, so 4-bit codes keep ~0.996 cosine with or without outliers. Fixed, not fitted to data."""
    import torch

    full = dim // g.shape[-1]
    h = _hadamard(g.shape[-1], g.device)
    if full == g.shape[-2]:
        return g @ h
    return torch.cat([g[..., :full, :] @ h, g[..., full:, :]], dim=-2)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [..., D] in [-8, 7] -> uint8 [..., D/2], low nibble = even channel."""
    import torch

    nib = (q & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def _unpack_nibbles(v: torch.Tensor) -> torch.Tensor:
    """uint8 [..., D/2] -> int8 codes [..., D] (4-bit two's complement, sign-extended)."""
    import torch

    lo = (v & 0xF).to(torch.int8)
    hi = (v >> 4).to(torch.int8)
    codes = torch.stack((lo, hi), dim=-1).flatten(-2)
    return (codes ^ 8) - 8


def encode(x: Any, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens [..., D] (float, torch or numpy) -> (values, scales | None) with the stored dtypes."""
    import torch

    spec = check_format(fmt)
    x = _as_tensor(x)
    if not x.is_floating_point():
        raise ValueError(f"encode needs floating-point tokens, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError("encode needs tokens with a channel axis [..., D], got a scalar")
    check_dim(fmt, x.shape[-1])
    x = x.float()
    if spec.name == "float16":
        _check_range(x, FLOAT16_MAX, fmt)
        return x.to(torch.float16), None
    _check_range(x, FLOAT16_MAX * spec.qmax, fmt)
    if spec.group is None:
        s16 = _scale_up_f16(x.abs().amax(dim=-1, keepdim=True), spec.qmax)
        return _quantise(x, s16, spec.qmax), s16
    g = _rotate_groups(_pad_groups(x, spec.group), x.shape[-1])
    s16 = _scale_up_f16(g.abs().amax(dim=-1), spec.qmax)
    q = _quantise(g, s16.unsqueeze(-1), spec.qmax).flatten(-2)[..., : x.shape[-1]]
    return _pack_nibbles(q), s16


def _check_stored(values: torch.Tensor, scales: torch.Tensor | None, fmt: str, dim: int) -> None:
    """Shapes and dtypes of stored tensors against stored_layout (no device sync)."""
    stored = stored_layout(fmt, dim)
    vdim, vdt = stored["values"]
    if values.shape[-1:] != (vdim,) or str(values.dtype).removeprefix("torch.") != vdt:
        raise ValueError(
            f"{fmt} values for dim {dim} must be [..., {vdim}] {vdt}, got {tuple(values.shape)} {values.dtype}"
        )
    if stored["scales"] is None:
        if scales is not None:
            raise ValueError(f"{fmt} stores no scales, got a tensor of shape {tuple(scales.shape)}")
        return
    sdim, _ = stored["scales"]
    want = (*values.shape[:-1], sdim)
    if scales is None or tuple(scales.shape) != want:
        got = None if scales is None else tuple(scales.shape)
        raise ValueError(f"{fmt} scales for values {tuple(values.shape)} must have shape {want}, got {got}")


def decode(values: Any, scales: Any, fmt: str, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Stored (values, scales) -> tokens [..., dim] in ``dtype`` (float32 by default), on values' device."""
    import torch

    spec = check_format(fmt)
    values = _as_tensor(values)
    scales = None if scales is None else _as_tensor(scales)
    _check_stored(values, scales, fmt, dim)
    dtype = torch.float32 if dtype is None else dtype
    if spec.name == "float16":
        return values.to(dtype)
    assert scales is not None
    s = scales.to(device=values.device, dtype=torch.float32)
    if spec.group is None:
        return (values.float() * s).to(dtype)
    g = _pad_groups(_unpack_nibbles(values).float(), spec.group) * s.unsqueeze(-1)
    return _rotate_groups(g, dim).flatten(-2)[..., :dim].to(dtype)


# --------------------------------------------------------------------------------------------- PCA


@dataclass
class PCABasis:
    """Mean and top-k principal directions of per-token features (float32, orthonormal rows)."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance_ratio: float

    def __post_init__(self) -> None:
        self.mean = np.ascontiguousarray(self.mean, dtype=np.float32)
        self.components = np.ascontiguousarray(self.components, dtype=np.float32)
        self.explained_variance_ratio = float(self.explained_variance_ratio)
        if self.mean.ndim != 1 or self.components.ndim != 2:
            raise ValueError(
                f"PCABasis needs mean [D] and components [k, D], got {self.mean.shape} {self.components.shape}"
            )
        k, d = self.components.shape
        if d != self.mean.shape[0] or not 1 <= k <= d:
            raise ValueError(
                f"components {self.components.shape} do not fit mean of dim {self.mean.shape[0]}"
            )

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def sha256(self) -> str:
        """Hash of the little-endian float32 bytes of mean then components (goes into the contract)."""
        h = hashlib.sha256(self.mean.astype("<f4").tobytes())
        h.update(self.components.astype("<f4").tobytes())
        return h.hexdigest()

    def to_npz_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            mean=self.mean,
            components=self.components,
            explained_variance_ratio=np.float64(self.explained_variance_ratio),
        )
        return buf.getvalue()

    @classmethod
    def from_npz_bytes(cls, data: bytes) -> PCABasis:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            missing = {"mean", "components", "explained_variance_ratio"} - set(z.files)
            if missing:
                raise ValueError(f"PCA basis npz lacks {sorted(missing)} (has {sorted(z.files)})")
            return cls(z["mean"], z["components"], float(z["explained_variance_ratio"]))


if TYPE_CHECKING:
    BasisLike = PCABasis | Mapping[str, torch.Tensor]


class CovarianceAccumulator:
    """Streaming float64 mean and scatter matrix of tokens; ``fit(k)`` gives the PCA basis.

    Chunks are merged with the pairwise update of Chan, Golub & LeVeque (1979), which stays
    accurate when the mean is large relative to the spread (unlike sum-of-outer-products).
    """

    def __init__(self) -> None:
        self.n_seen = 0
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None

    def update(self, x: Any) -> None:
        """Add tokens [..., D] (numpy or torch; torch chunks are reduced on their own device)."""
        import torch

        t = _as_tensor(x)
        if t.ndim < 1 or t.shape[-1] < 1:
            raise ValueError(f"update needs tokens [..., D], got shape {tuple(t.shape)}")
        t = t.reshape(-1, t.shape[-1]).to(torch.float64)
        nb = int(t.shape[0])
        if nb == 0:
            return
        if self._mean is not None and t.shape[1] != self._mean.shape[0]:
            raise ValueError(f"token dim {t.shape[1]} differs from earlier chunks' {self._mean.shape[0]}")
        mb_t = t.mean(dim=0)
        c = t - mb_t
        mb, sb = mb_t.cpu().numpy(), (c.T @ c).cpu().numpy()
        if self._mean is None or self._scatter is None:
            self._mean, self._scatter, self.n_seen = mb, sb, nb
            return
        na, n = self.n_seen, self.n_seen + nb
        delta = mb - self._mean
        self._scatter = self._scatter + sb + np.outer(delta, delta) * (na * nb / n)
        self._mean = self._mean + delta * (nb / n)
        self.n_seen = n

    @property
    def mean(self) -> np.ndarray:
        if self._mean is None:
            raise ValueError("no tokens seen yet")
        return self._mean.copy()

    def covariance(self) -> np.ndarray:
        """Sample covariance [D, D] (float64, divisor n - 1)."""
        if self._scatter is None or self.n_seen < 2:
            raise ValueError(f"covariance needs >= 2 tokens, have {self.n_seen}")
        return self._scatter / (self.n_seen - 1)

    def fit(self, k: int) -> PCABasis:
        """Top-k eigenvectors of the covariance, signs fixed (largest-magnitude entry positive)."""
        cov = self.covariance()
        d = cov.shape[0]
        if not 1 <= int(k) <= d:
            raise ValueError(f"PCA dims k must be in [1, {d}], got {k}")
        evals, evecs = np.linalg.eigh(cov)
        evals, evecs = np.clip(evals[::-1], 0.0, None), evecs[:, ::-1]
        total = float(evals.sum())
        if total <= 0.0:
            raise ValueError("tokens have zero variance: PCA is undefined")
        comps = evecs[:, : int(k)].T.copy()
        peak = np.argmax(np.abs(comps), axis=1)
        comps *= np.sign(comps[np.arange(comps.shape[0]), peak])[:, None]
        return PCABasis(self._mean, comps, float(evals[: int(k)].sum() / total))  # type: ignore[arg-type]


def basis_tensors(basis: BasisLike, device: Any = None) -> dict[str, torch.Tensor]:
    """The basis as float32 tensors on ``device``: move once, pass to reconstruct every step."""
    import torch

    if isinstance(basis, PCABasis):
        mean, comps = torch.from_numpy(basis.mean), torch.from_numpy(basis.components)
    else:
        missing = {"mean", "components"} - set(basis)
        if missing:
            raise ValueError(f"basis dict lacks {sorted(missing)}")
        mean, comps = _as_tensor(basis["mean"]), _as_tensor(basis["components"])
    return {
        "mean": mean.to(device=device, dtype=torch.float32),
        "components": comps.to(device=device, dtype=torch.float32),
    }


def pca_project(x: Any, basis: BasisLike) -> torch.Tensor:
    """Tokens [..., D] -> coefficients [..., k] (float32, on x's device)."""
    x = _as_tensor(x)
    b = basis_tensors(basis, x.device)
    if x.shape[-1] != b["mean"].shape[0]:
        raise ValueError(f"tokens of dim {x.shape[-1]} do not match a PCA basis of dim {b['mean'].shape[0]}")
    return (x.float() - b["mean"]) @ b["components"].T


def pca_reconstruct(coeffs: Any, basis: BasisLike) -> torch.Tensor:
    """Coefficients [..., k] -> tokens [..., D] (float32, on coeffs' device)."""
    coeffs = _as_tensor(coeffs)
    b = basis_tensors(basis, coeffs.device)
    if coeffs.shape[-1] != b["components"].shape[0]:
        raise ValueError(
            f"{coeffs.shape[-1]} coefficients do not match a PCA basis of k={b['components'].shape[0]}"
        )
    return coeffs.float() @ b["components"] + b["mean"]


# ------------------------------------------------------------------------------- on-device rebuild


def resample_time(x: torch.Tensor, frames: int) -> torch.Tensor:
    """[B,t,H,W,D] -> [B,frames,H,W,D]: group mean when t is a multiple of frames, else linear
    interpolation (align_corners=False). Extraction brings tokens to the DiT grid with this same
    function (stages.common.resample.resample_temporal), so a reader rebuilds what it stored."""
    import torch.nn.functional as F

    b, t, h, w, d = x.shape
    if t == frames:
        return x
    if t % frames == 0:
        return x.reshape(b, frames, t // frames, h, w, d).mean(dim=2)
    y = x.permute(0, 2, 3, 4, 1).reshape(b, h * w * d, t)
    y = F.interpolate(y, size=frames, mode="linear", align_corners=False)
    return y.reshape(b, h, w, d, frames).permute(0, 4, 1, 2, 3)


def reconstruct(
    values: Any,
    scales: Any,
    fmt: str,
    stored_dim: int,
    frames: int,
    basis: BasisLike | None = None,
) -> torch.Tensor:
    """Stored [B,T_e,H,W,*] -> float32 unit-norm targets [B,frames,H,W,D] on values' device.

    decode -> PCA reconstruct (if ``basis``) -> resample time to ``frames`` -> L2-normalise per
    token (eps 1e-6, zero stays zero). All steps before the norm are linear, so this equals
    resampling then normalising the float tokens, as extraction does.
    """
    x = _decoded_tokens(values, scales, fmt, stored_dim, frames, basis)
    return (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)).contiguous()


def _decoded_tokens(values: Any, scales: Any, fmt: str, stored_dim: int, frames: int, basis) -> torch.Tensor:
    """decode -> PCA reconstruct (if ``basis``) -> resample time to ``frames``: the linear part that
    `reconstruct` and `reconstruct_raw` share."""
    values = _as_tensor(values)
    if values.ndim != 5:
        raise ValueError(f"reconstruct needs batched values [B,T_e,H,W,*], got shape {tuple(values.shape)}")
    frames = int(frames)
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    x = decode(values, scales, fmt, stored_dim)
    if basis is not None:
        x = pca_reconstruct(x, basis)
    return resample_time(x, frames)


def encode_norms(norms: Any) -> torch.Tensor:
    """Token norms [...] (float) -> float16 as stored; refuses what float16 cannot hold."""
    import torch

    x = _as_tensor(norms).float()
    _check_range(x, FLOAT16_MAX, "float16 token norms")
    return x.to(torch.float16)


def reconstruct_raw(
    values: Any,
    scales: Any,
    fmt: str,
    stored_dim: int,
    frames: int,
    basis: BasisLike | None = None,
    norms: Any = None,
) -> torch.Tensor:
    """Stored [B,T_e,H,W,*] -> float32 raw tokens [B,frames,H,W,D]: the encoder's tokens on the DiT
    grid before their L2 normalisation (what iREPA's spatial z-score takes).

    With ``norms`` [B,T_e,H,W] (layout raw_tokens = "norms"): the unit target of :func:`reconstruct`
    times each token's stored norm. Without (raw_tokens = "values", an encoder stored at its own time
    grid): the values are the raw tokens, decoded and resampled in time, not normalised."""
    import torch

    if norms is None:
        return _decoded_tokens(values, scales, fmt, stored_dim, frames, basis).contiguous()
    unit = reconstruct(values, scales, fmt, stored_dim, frames, basis)
    n = _as_tensor(norms).to(device=unit.device, dtype=torch.float32)
    if tuple(n.shape) != tuple(unit.shape[:-1]):
        raise ValueError(
            f"token norms {tuple(n.shape)} do not match the targets' tokens {tuple(unit.shape[:-1])}"
        )
    return unit * n.unsqueeze(-1)


# ---------------------------------------------------------------------------------------- fidelity


def token_cosines(a: Any, b: Any) -> torch.Tensor:
    """Cosine per token along the last axis (float32); two zero tokens count as 1, one as 0."""
    import torch

    a, b = _as_tensor(a).float(), _as_tensor(b).float().to(_as_tensor(a).device)
    if a.shape != b.shape:
        raise ValueError(f"token_cosines needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(dim=-1) / (na * nb).clamp_min(1e-30)
    both_zero = (na == 0) & (nb == 0)
    return torch.where(both_zero, torch.ones_like(cos), cos)


def fidelity_summary(cosines: Any) -> dict[str, float | int]:
    """Mean, 1st percentile and count of per-token cosines (what `info` and the docs report)."""
    c = cosines.detach().cpu().numpy() if hasattr(cosines, "detach") else np.asarray(cosines)
    c = c.astype(np.float64).ravel()
    if c.size == 0:
        raise ValueError("fidelity_summary needs at least one cosine")
    return {"mean": float(c.mean()), "p1": float(np.percentile(c, 1)), "tokens": int(c.size)}
