"""Representation alignment (REPA family): projectors, target normalisation, loss weights and schedules.

Sources (read, not copied; each item names the repository, file and function followed):

* REPA (sihyun-yu/REPA): MLP projector `build_mlp` (models/sit.py), loss = negative cosine between the
  L2-normalised projection and the L2-normalised encoder token, mean over tokens, batch and encoders
  (loss.py), scaled by one `proj_coeff` (train.py).
* HASTE (NUS-HPC-AI-Lab/HASTE): alignment is switched off for good once `global_step >=
  early_stop_point` (train.py), i.e. it acts on optimizer steps 1..early_stop_point (1-based).
* iREPA (End2End-Diffusion/iREPA, commit 99ad4ac): spatial z-score of the encoder's raw patch tokens
  over the token axis (ldm/utils.py and jit/spnorm.py `spatial_zscore`, applied in ldm/train.py and
  jit/engine_jit.py to `x_norm_patchtokens`) and a single Conv2d projector on the token grid
  (ldm/models/sit.py and jit/projectors.py `ProjectionLayer`; kernel 3 in README.md and
  jit/main_jit.py, 1 by default in ldm/train.py).
* CREPA in SimpleTuner (bghira/SimpleTuner, simpletuner/helpers/training/crepa.py `CrepaScheduler`):
  constant / linear / cosine decay of the coefficient driven by the count of completed steps, optional
  linear warm-up, step cut-off.

The head lives outside the model, so the saved inference model carries no trace of it; checkpoints keep
it separately for resuming.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stages.common.registry import ALIGN_SCHEDULES, PROJECTORS, TARGET_NORMS

# iREPA ldm/train.py: --zscore-alpha default 0.6 (jit/main_jit.py: 0.8); eps as in `spatial_zscore`.
SPATIAL_ALPHA = 0.6
SPATIAL_EPS = 1e-6


# --------------------------------------------------------------------------- loss weights


def _check_lambda(name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"alignment lambda for {name!r} must be a finite number >= 0, got {value!r}")
    return v


def _parse_map(value: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, number = item.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(
                f"cannot read {item!r} in lambdas {value!r}; write NAME=VALUE,NAME=VALUE or one number"
            )
        if name in pairs:
            raise ValueError(f"encoder {name!r} is given twice in lambdas {value!r}")
        pairs[name] = number.strip()
    if not pairs:
        raise ValueError(f"no lambda in {value!r}")
    return pairs


def parse_lambdas(value: str | float | Mapping[str, float], encoders: Sequence[str]) -> dict[str, float]:
    """Per-encoder alignment weights from `--align-lambda`.

    One number (``0.5`` or ``"0.5"``) applies to every encoder; with one shared value the loss is
    exactly REPA's ``proj_coeff * mean_e(-cos_e)``. A map (``"dino=0.5,sam2=0.25"`` or a dict) must name
    only chosen encoders; chosen encoders it leaves out get 0.0 (still measured, never trained on) and a
    warning names them. Negative or non-finite values are refused.
    """
    names = list(encoders)
    if not names:
        raise ValueError("alignment needs at least one encoder")
    if isinstance(value, bool):
        raise ValueError(f"alignment lambda must be a number or NAME=VALUE list, got {value!r}")
    if isinstance(value, int | float):
        return {n: _check_lambda(n, value) for n in names}
    if isinstance(value, str):
        text = value.strip()
        if "=" not in text:
            try:
                shared = float(text)
            except ValueError:
                raise ValueError(
                    f"cannot read lambdas {value!r}; write one number or NAME=VALUE,NAME=VALUE"
                ) from None
            return {n: _check_lambda(n, shared) for n in names}
        raw: Mapping[str, object] = _parse_map(text)
    elif isinstance(value, Mapping):
        raw = value
    else:
        raise ValueError(
            f"alignment lambda must be a number, a string or a mapping, got {type(value).__name__}"
        )
    unknown = [n for n in raw if n not in names]
    if unknown:
        raise ValueError(
            f"lambdas name encoder(s) {', '.join(map(repr, unknown))} that are not chosen; "
            f"the chosen encoders are {', '.join(names)}"
        )
    out: dict[str, float] = {}
    for n in names:
        if n not in raw:
            out[n] = 0.0
            continue
        try:
            number = float(raw[n])  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"alignment lambda for {n!r} is not a number: {raw[n]!r}") from None
        out[n] = _check_lambda(n, number)
    missing = [n for n in names if n not in raw]
    if missing:
        warnings.warn(
            f"encoder(s) {', '.join(missing)} get alignment lambda 0.0 (not listed in {value!r}); "
            "they are measured but not trained on",
            stacklevel=2,
        )
    return out


# --------------------------------------------------------------------------- schedule


def alignment_active(step: int, until: int | None) -> bool:
    """True while optimizer step `step` (1-based) is at most `until` (HASTE's termination: alignment
    runs while ``global_step < early_stop_point``, global_step counting completed steps)."""
    if step < 1:
        raise ValueError(f"optimizer steps are counted from 1, got step {step}")
    if until is not None and until < 1:
        raise ValueError(f"--align-until must be >= 1 (or unset for no cut-off), got {until}")
    return until is None or step <= until


def schedule_weight(
    step: int, schedule: str, until: int | None, total_steps: int, *, warmup: int = 0
) -> float:
    """Multiplier in [0, 1] for every lambda at optimizer step `step` (1-based).

    Following SimpleTuner's CrepaScheduler, the clock is s = step - 1 (steps completed before this
    one), so step 1 always has weight 1. With L = `until` if given, else `total_steps`:

    * warm-up (optional, CREPA ``crepa_warmup_steps``): s < warmup -> s / warmup, for every schedule;
    * constant: 1;
    * linear:   1 - p,                with p = min((s - warmup) / (L - warmup), 1);
    * cosine:   (1 + cos(pi * p)) / 2.

    After `until` the weight is 0 for good (HASTE / CREPA cut-off). Since the decay reaches 0 at
    s = L = until, i.e. at step until + 1, the decay and the cut-off meet without a jump; without
    `until` the decay spans the run (CREPA's default decay length is max_train_steps).
    """
    if schedule not in ALIGN_SCHEDULES:
        raise ValueError(
            f"unknown alignment schedule {schedule!r}; choose one of {', '.join(ALIGN_SCHEDULES)}"
        )
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not alignment_active(step, until):
        return 0.0
    span = until if until is not None else total_steps
    if warmup < 0 or (warmup and warmup >= span):
        raise ValueError(f"warmup must be >= 0 and shorter than the decay span {span}, got {warmup}")
    s = step - 1
    if s < warmup:
        return s / warmup
    if schedule == "constant":
        return 1.0
    p = min((s - warmup) / (span - warmup), 1.0)
    if schedule == "linear":
        return 1.0 - p
    return 0.5 * (1.0 + math.cos(math.pi * p))


# --------------------------------------------------------------------------- targets


def spatial_normalize(
    target: torch.Tensor, alpha: float = SPATIAL_ALPHA, eps: float = SPATIAL_EPS
) -> torch.Tensor:
    """iREPA's spatial z-score, per frame: [..., H, W, D] -> float32 of the same shape.

    For each frame and channel, over its H*W tokens: (x - alpha * mean) / (std + eps), std with
    Bessel's correction (torch.std default), as iREPA `spatial_zscore` (ldm/utils.py) applies it to
    an image's patch tokens (no CLS token is involved: only patch tokens are aligned). iREPA is an image
    method; for video each frame is treated as one image, so nothing is pooled across time. The
    cosine loss L2-normalises the result afterwards, as iREPA's CosineProjectionLoss does.
    `target` must be the encoder's raw tokens, as iREPA's: the trainer rebuilds them from the cache
    (unit token x its stored norm, `cache_schema.formats.reconstruct_raw`); z-scoring unit tokens
    instead gives other targets, since rescaling tokens one by one changes the mean and std.
    """
    if target.ndim < 3:
        raise ValueError(f"spatial_normalize expects [..., H, W, D], got shape {tuple(target.shape)}")
    h, w = target.shape[-3], target.shape[-2]
    if h * w < 2:
        raise ValueError(f"spatial normalisation needs at least 2 tokens per frame, got a {h}x{w} grid")
    x = target.float()
    mean = x.mean(dim=(-3, -2), keepdim=True)
    std = x.std(dim=(-3, -2), keepdim=True)
    return (x - alpha * mean) / (std + eps)


def normalize_target(target: torch.Tensor, kind: str, alpha: float = SPATIAL_ALPHA) -> torch.Tensor:
    """ "token": as stored (L2-normalised per token at extraction); "spatial": :func:`spatial_normalize`."""
    if kind == "token":
        return target
    if kind == "spatial":
        return spatial_normalize(target, alpha=alpha)
    raise ValueError(f"unknown target normalisation {kind!r}; choose one of {', '.join(TARGET_NORMS)}")


# --------------------------------------------------------------------------- projectors


class Projector(nn.Sequential):
    """hidden -> width -> width -> encoder dim with SiLU (REPA's `build_mlp`, width 2048 by default)."""

    def __init__(self, hidden_size: int, width: int, out_dim: int):
        super().__init__(
            nn.Linear(hidden_size, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, out_dim),
        )


class ConvProjector(nn.Module):
    """iREPA's conv projector applied per frame: one Conv2d(hidden, D, k x k, stride 1, padding k // 2)
    with bias on the (H, W) token grid, no activation and no hidden width (iREPA `ProjectionLayer`,
    projection_layer_type="conv"). Tokens are in row-major (row, col) order, as the patch grid."""

    def __init__(self, hidden_size: int, out_dim: int, grid_hw: tuple[int, int], kernel_size: int = 3):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"conv projector kernel must be odd and >= 1 (to keep the grid), got {kernel_size}"
            )
        self.grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        self.conv = nn.Conv2d(hidden_size, out_dim, kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, H*W, C] -> [B, T, H*W, D]."""
        b, t, n, c = hidden.shape
        h, w = self.grid_hw
        if n != h * w:
            raise ValueError(f"conv projector was built for a {h}x{w} grid ({h * w} tokens), got {n} tokens")
        x = hidden.reshape(b * t, h, w, c).permute(0, 3, 1, 2)
        y = self.conv(x)
        return y.permute(0, 2, 3, 1).reshape(b, t, n, -1)


def _key(name: str) -> str:
    # ModuleDict keys may not contain dots.
    return name.replace(".", "_")


class AlignmentHead(nn.Module):
    """One projector per encoder and the weighted negative-cosine loss.

    loss = (1/E) * sum_e w_e * (-mean cos_e) over the E encoders of the head (REPA's mean over encoders;
    one shared w reproduces REPA's ``proj_coeff * proj_loss``). Cosines are taken in float32 between
    the L2-normalised projection and the L2-normalised (optionally spatially normalised) target, mean
    over all tokens of all frames and clips. Encoders with w_e == 0 are measured under no_grad, so
    their projector receives no gradient (its .grad stays None).
    """

    def __init__(
        self,
        hidden_size: int,
        encoder_dims: Mapping[str, int],
        width: int = 2048,
        projector: str = "mlp",
        grid: tuple[int, int, int] | None = None,
        target_norm: str = "token",
        *,
        kernel_size: int = 3,
        spatial_alpha: float = SPATIAL_ALPHA,
    ):
        super().__init__()
        if not encoder_dims:
            raise ValueError("alignment needs at least one encoder")
        if projector not in PROJECTORS:
            raise ValueError(f"unknown projector {projector!r}; choose one of {', '.join(PROJECTORS)}")
        if target_norm not in TARGET_NORMS:
            raise ValueError(
                f"unknown target normalisation {target_norm!r}; choose one of {', '.join(TARGET_NORMS)}"
            )
        if projector == "conv" and grid is None:
            raise ValueError("the conv projector needs the token grid (T, H, W)")
        keys = [_key(n) for n in encoder_dims]
        if len(set(keys)) != len(keys):
            raise ValueError(f"encoder names {list(encoder_dims)} collide once dots become underscores")
        for name, dim in encoder_dims.items():
            if int(dim) < 1:
                raise ValueError(f"encoder {name!r} has feature dim {dim}; it must be >= 1")
        self.names = list(encoder_dims)
        self.encoder_dims = {n: int(d) for n, d in encoder_dims.items()}
        self.projector_kind, self.target_norm, self.spatial_alpha = projector, target_norm, spatial_alpha
        self.grid = None if grid is None else tuple(int(g) for g in grid)
        modules: dict[str, nn.Module] = {}
        for name, dim in self.encoder_dims.items():
            if projector == "mlp":
                modules[_key(name)] = Projector(hidden_size, width, dim)
            else:
                modules[_key(name)] = ConvProjector(hidden_size, dim, self.grid[1:], kernel_size)
        self.projectors = nn.ModuleDict(modules)

    def _check(self, hidden: torch.Tensor, targets: Mapping[str, torch.Tensor], weights: Mapping[str, float]):
        if hidden.ndim != 4:
            raise ValueError(f"hidden must be [B, T, H*W, C], got shape {tuple(hidden.shape)}")
        b, t, n, _ = hidden.shape
        if self.grid is not None and (t, n) != (self.grid[0], self.grid[1] * self.grid[2]):
            raise ValueError(
                f"hidden has T={t}, {n} tokens per frame; the head was built for grid {self.grid}"
            )
        if set(weights) != set(self.names):
            raise ValueError(f"weights are for {sorted(weights)} but the head aligns {self.names}")
        for name in self.names:
            if name not in targets:
                raise ValueError(f"no target for encoder {name!r}; targets hold {sorted(targets)}")
            tgt = targets[name]
            if tgt.ndim != 5 or tgt.shape[:2] != (b, t) or tgt.shape[2] * tgt.shape[3] != n:
                raise ValueError(
                    f"target of {name!r} has shape {tuple(tgt.shape)}; expected [{b}, {t}, H, W, D] with H*W = {n} "
                    "(the cache grid must match the model's patch grid)"
                )
            if tgt.shape[-1] != self.encoder_dims[name]:
                raise ValueError(
                    f"target of {name!r} has dim {tgt.shape[-1]}, the head expects {self.encoder_dims[name]}"
                )
            _check_lambda(name, weights[name])

    def _cosine(self, name: str, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        projected = self.projectors[_key(name)](hidden)  # [B, T, N, D]
        target = normalize_target(target, self.target_norm, self.spatial_alpha)
        p = F.normalize(projected.float().flatten(0, 2), dim=-1)
        z = F.normalize(target.float().flatten(0, 3), dim=-1)
        return (p * z).sum(dim=-1).mean()

    def forward(
        self, hidden: torch.Tensor, targets: Mapping[str, torch.Tensor], weights: Mapping[str, float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """hidden [B, T, H*W, C], targets {encoder: [B, T, H, W, D]}, weights {encoder: w >= 0}
        -> (weighted alignment loss, {encoder: detached mean cosine}). Extra targets are ignored."""
        self._check(hidden, targets, weights)
        terms: list[torch.Tensor] = []
        cos: dict[str, torch.Tensor] = {}
        for name in self.names:
            w = float(weights[name])
            if w == 0.0:
                with torch.no_grad():
                    cos[name] = self._cosine(name, hidden, targets[name])
                continue
            c = self._cosine(name, hidden, targets[name])
            terms.append(-w * c)
            cos[name] = c.detach()
        if terms:
            loss = torch.stack(terms).sum() / len(self.names)
        else:
            loss = torch.zeros((), device=hidden.device)
        return loss, cos
