"""Flow matching on the linear path of SiT/REPA, and samplers over a learned velocity field.

Convention: t = 0 is data, t = 1 is noise, x_t = (1 - t) x0 + t eps with eps ~ N(0, I); the model
learns the velocity v = E[eps - x0 | x_t], and sampling integrates dx/dt = v from t = 1 to t = 0.

Score from velocity (used by the SDE sampler). Write x0_hat = E[x0 | x_t] and eps_hat =
E[eps | x_t]. Then x_t = (1 - t) x0_hat + t eps_hat and v = eps_hat - x0_hat. Substituting
x0_hat = eps_hat - v gives x_t = eps_hat - (1 - t) v, so eps_hat = x_t + (1 - t) v. Since
x_t | x0 ~ N((1 - t) x0, t^2 I), Tweedie's formula gives the score
grad log p_t(x) = -eps_hat / t = -(x + (1 - t) v) / t.

SDE with the same marginals: for any diffusion g(t), dx = [v + g^2/2 * score] dt + g dW (forward
in t) keeps p_t. Its reverse-time form, run from t = 1 to 0, is dx = [v - g^2/2 * score] dt + g dW.
We take g(t)^2 = 2 * diffusion_norm * t, which vanishes at the data end, so the drift is
v + diffusion_norm * (x + (1 - t) v): no division by t anywhere.

Sampler conventions (`convention=`, SAMPLER_CONVENTIONS). "repa" follows REPA's own sampler code,
sihyun-yu/REPA `samplers.py` (`euler_sampler`, `euler_maruyama_sampler`, called by `generate.py`).
REPA uses the SiT linear path with our orientation: alpha_t = 1 - t, sigma_t = t (t = 1 noise,
t = 0 data), model output v = eps - x0, integration from t = 1 down to 0; its score
(reverse_alpha_ratio * v - x) / var with var = t reduces to -(x + (1 - t) v) / t, and its
`compute_diffusion(t) = 2 t` is our g^2 at diffusion_norm = 1. So no sign or time flip is needed:
  - Euler (`euler_sampler`, heun=False): grid linspace(1, 0, N + 1), N evaluations. Same in both
    conventions.
  - Heun (`euler_sampler`, heun=True): same grid, but the trapezoidal corrector is skipped on the
    last step (i = N - 1), which is a plain Euler step to t = 0, so the model is never evaluated
    at t = 0: 2N - 1 evaluations. REPA decides whether the corrector's evaluation (at t_next) is
    guided by the step's start time t_cur; "repa" does the same.
  - Euler-Maruyama (`euler_maruyama_sampler`): grid linspace(1, 0.04, N) followed by 0, i.e. N - 1
    stochastic steps on [1, 0.04] with drift v - g^2/2 * score and noise sqrt(g^2 |dt|) z, then one
    last step from 0.04 to 0 that takes the same SDE drift (score term included, g^2 = 2 * 0.04)
    and adds no noise (REPA returns this `mean_x`). N evaluations, N - 1 noise draws. REPA mixes
    guidance into the drift rather than into v; the drift is affine in v, so the two agree.
REPA integrates in float64; we keep float32 state (latents), which changes only rounding.
"uniform" is this module's earlier rule: every sampler on linspace(1, 0, N + 1); Heun corrects on
every step (2N evaluations, the last at t = 0); Euler-Maruyama makes N - 1 stochastic steps and
ends with a plain Euler ODE step x + dt * v (no score term, no noise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, TypedDict

import torch

from stages.common.models.adapter import Condition
from stages.common.progress import tqdm
from stages.common.registry import SAMPLER_CONVENTIONS, SAMPLER_NAMES

if TYPE_CHECKING:  # typing.Unpack is Python 3.11+
    from typing_extensions import Unpack

# y: class ids (the null one is `null_class`), or a model adapter's Condition (null: its drop mask)
VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | Condition | None], torch.Tensor]


# ----------------------------------------------------------------------------- training


def sample_timesteps(
    n: int,
    schedule: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """n flow times in (0, 1): uniform, or logit-normal (sigmoid of N(mean, std^2), SD3-style)."""
    gen_device = generator.device if generator is not None else device
    if schedule == "uniform":
        t = torch.rand(n, generator=generator, device=gen_device)
    elif schedule in ("logit_normal", "logit-normal"):
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=gen_device))
    else:
        raise ValueError(f"unknown timestep schedule {schedule!r}; use 'uniform' or 'logit_normal'")
    return t.to(device) if device is not None else t


def _expand(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample t [B] (or a scalar) against x [B, ...]."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps."""
    t = _expand(t, x0)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """d x_t / dt on the linear path: eps - x0."""
    return eps - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean squared velocity error: a scalar ("mean") or one value per sample ("none")."""
    err = (pred.float() - target.float()).pow(2)
    if reduction == "mean":
        return err.mean()
    if reduction == "none":
        return err.flatten(1).mean(1)
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


# ----------------------------------------------------------------------------- guidance


class GuidedVelocity:
    """Classifier-free guidance: v_u + scale * (v_c - v_u), both branches in one forward pass.

    Guidance applies only to samples whose t lies in `guidance_interval` = (t_lo, t_hi)
    (inclusive); elsewhere, and when the scale is 1 or there are no labels, the conditional
    velocity is returned from a single plain forward. The unconditional branch gets class id
    `null_class`, or with `null_by_drop` (y a Condition) the same condition marked dropped, so the
    model's adapter supplies its own null condition (Condition.with_null).
    """

    def __init__(
        self,
        velocity_fn: VelocityFn,
        null_class: int | None,
        cfg_scale: float = 1.0,
        guidance_interval: Sequence[float] | None = None,
        null_by_drop: bool = False,
    ):
        if guidance_interval is not None:
            if len(guidance_interval) != 2 or not 0.0 <= guidance_interval[0] <= guidance_interval[1] <= 1.0:
                raise ValueError(
                    f"guidance_interval must be (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1, got {guidance_interval}"
                )
        if cfg_scale != 1.0 and null_class is None and not null_by_drop:
            raise ValueError("classifier-free guidance (cfg_scale != 1) needs a class-conditional model")
        self.velocity_fn = velocity_fn
        self.null_class = null_class
        self.null_by_drop = null_by_drop
        self.cfg_scale = float(cfg_scale)
        self.interval = tuple(float(v) for v in guidance_interval) if guidance_interval is not None else None

    def _active(self, t: torch.Tensor) -> torch.Tensor:
        if self.interval is None:
            return torch.ones_like(t, dtype=torch.bool)
        return (t >= self.interval[0]) & (t <= self.interval[1])

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | Condition | None,
        guide_t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Guided velocity at (x, t); `guide_t` (default t) is the time tested against the
        interval, so a Heun corrector can follow its step's start time as REPA does."""
        if self.cfg_scale == 1.0 or y is None:
            return self.velocity_fn(x, t, y)
        active = self._active(t if guide_t is None else guide_t)
        if not bool(active.any()):
            return self.velocity_fn(x, t, y)
        if self.null_by_drop:
            both = y.with_null()
        else:
            both = torch.cat([y, torch.full_like(y, self.null_class)])
        v = self.velocity_fn(torch.cat([x, x]), torch.cat([t, t]), both)
        v_cond, v_uncond = v.chunk(2)
        guided = v_uncond + self.cfg_scale * (v_cond - v_uncond)
        return torch.where(_expand(active, x).bool(), guided, v_cond)


# ----------------------------------------------------------------------------- samplers


def _prepare(
    velocity_fn: VelocityFn,
    cfg_scale: float,
    guidance_interval: Sequence[float] | None,
    null_class: int | None,
    null_by_drop: bool = False,
) -> VelocityFn:
    if cfg_scale == 1.0 and guidance_interval is None:
        return velocity_fn
    return GuidedVelocity(velocity_fn, null_class, cfg_scale, guidance_interval, null_by_drop)


REPA_SDE_LAST_T = 0.04  # REPA's Euler-Maruyama stops its stochastic steps here (samplers.py)


def _check_convention(convention: str) -> None:
    if convention not in SAMPLER_CONVENTIONS:
        raise ValueError(
            f"unknown sampler convention {convention!r}; choose from {', '.join(SAMPLER_CONVENTIONS)}"
        )


def time_grid(sampler: str, num_steps: int, convention: str = "repa", shift: float = 1.0) -> list[float]:
    """The num_steps + 1 times a sampler steps through, from 1 (noise) to 0 (data); module doc.
    `shift` (a model's timestep shift, Objective.shift; 1 = none) maps each t to
    shift t / (1 + (shift - 1) t), the same map its training times went through (as diffusers'
    FlowMatchEulerDiscreteScheduler shifts its sigmas)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"the timestep shift must be > 0, got {shift}")
    _check_convention(convention)
    if _key(sampler) == "euler-maruyama" and convention == "repa":
        head = torch.linspace(1.0, REPA_SDE_LAST_T, num_steps, dtype=torch.float64).tolist()
        ts = [*head, 0.0]
    else:
        ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    if shift == 1.0:
        return ts
    return [shift * t / (1 + (shift - 1) * t) for t in ts]


def _steps(sampler: str, num_steps: int, convention: str, progress: bool, shift: float = 1.0) -> tqdm:
    """(t, t_next) pairs of the grid, as a progress bar that advances while being iterated."""
    ts = time_grid(sampler, num_steps, convention, shift)
    steps = list(zip(ts[:-1], ts[1:], strict=True))
    return tqdm(steps, desc=sampler, disable=not progress, leave=False)


def _v(
    fn: VelocityFn,
    x: torch.Tensor,
    t: float,
    y: torch.Tensor | Condition | None,
    guide_t: float | None = None,
) -> torch.Tensor:
    tt = torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)
    if guide_t is not None and isinstance(fn, GuidedVelocity):
        gt = torch.full_like(tt, float(guide_t))
        return fn(x, tt, y, guide_t=gt).to(x.dtype)
    return fn(x, tt, y).to(x.dtype)


class SampleOptions(TypedDict, total=False):
    """Keyword options every sampler takes (defaults in `_start`): class labels or a Condition `y`,
    classifier-free guidance (`cfg_scale`, `guidance_interval`, `null_class` or `null_by_drop`), a
    progress bar, the grid convention, the model's timestep shift."""

    y: torch.Tensor | Condition | None
    cfg_scale: float
    guidance_interval: Sequence[float] | None
    null_class: int | None
    null_by_drop: bool
    progress: bool
    convention: str
    shift: float


class _Setup(NamedTuple):
    fn: VelocityFn
    y: torch.Tensor | Condition | None
    steps: tqdm
    convention: str


def _start(
    sampler: str,
    velocity_fn: VelocityFn,
    num_steps: int,
    y: torch.Tensor | Condition | None = None,
    cfg_scale: float = 1.0,
    guidance_interval: Sequence[float] | None = None,
    null_class: int | None = None,
    null_by_drop: bool = False,
    progress: bool = False,
    convention: str = "repa",
    shift: float = 1.0,
) -> _Setup:
    """What every sampler starts from: the (guided) velocity and the steps of its (shifted) time grid."""
    fn = _prepare(velocity_fn, cfg_scale, guidance_interval, null_class, null_by_drop)
    return _Setup(fn, y, _steps(sampler, num_steps, convention, progress, shift), convention)


def euler_sample(
    velocity_fn: VelocityFn, noise: torch.Tensor, num_steps: int = 50, **options: Unpack[SampleOptions]
) -> torch.Tensor:
    """Euler ODE integration of dx/dt = v from t = 1 (noise) to t = 0 (data): num_steps
    evaluations on linspace(1, 0, num_steps + 1) under either convention (REPA's is the same)."""
    fn, y, steps, _ = _start("euler", velocity_fn, num_steps, **options)
    x = noise.float()
    for t, t_next in steps:
        x = x + (t_next - t) * _v(fn, x, t, y)
    return x


def heun_sample(
    velocity_fn: VelocityFn, noise: torch.Tensor, num_steps: int = 50, **options: Unpack[SampleOptions]
) -> torch.Tensor:
    """Heun's second-order ODE method (trapezoidal corrector). "repa": no corrector on the last
    step (2 * num_steps - 1 evaluations, none at t = 0); "uniform": every step (2 * num_steps)."""
    fn, y, steps, convention = _start("heun", velocity_fn, num_steps, **options)
    x = noise.float()
    for i, (t, t_next) in enumerate(steps):
        dt = t_next - t
        v = _v(fn, x, t, y)
        x_pred = x + dt * v
        if convention == "repa" and i == len(steps) - 1:
            x = x_pred
            continue
        guide_t = t if convention == "repa" else None
        x = x + dt * 0.5 * (v + _v(fn, x_pred, t_next, y, guide_t=guide_t))
    return x


def _sde_noise(
    like: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None
) -> torch.Tensor:
    """Standard normal noise shaped like `like`: one generator for the batch, or one per sample
    (then a sample's noise does not depend on the batch it is in)."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else like.device
        z = torch.randn(like.shape, generator=generator, device=device)
    else:
        if len(generator) != like.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]}")
        z = torch.stack([torch.randn(like.shape[1:], generator=g, device=g.device) for g in generator])
    return z.to(like.device, like.dtype)


def euler_maruyama_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    num_steps: int = 50,
    diffusion_norm: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    **options: Unpack[SampleOptions],
) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE with g(t)^2 = 2 * diffusion_norm * t (module doc).

    num_steps evaluations; the last step adds no noise. "repa": stochastic steps down to
    t = 0.04, then the SDE drift's mean step to 0; "uniform": uniform grid, plain ODE last step.
    """
    fn, y, steps, convention = _start("euler-maruyama", velocity_fn, num_steps, **options)
    x = noise.float()
    for i, (t, t_next) in enumerate(steps):
        dt = t_next - t  # negative
        v = _v(fn, x, t, y)
        # v - g^2/2 * score with score = -(x + (1 - t) v) / t and g^2 = 2 * norm * t
        drift = v + diffusion_norm * (x + (1 - t) * v)
        if i == len(steps) - 1:
            x = x + dt * (drift if convention == "repa" else v)
            continue
        z = _sde_noise(x, generator)
        x = x + dt * drift + (2 * diffusion_norm * t * -dt) ** 0.5 * z
    return x


# registry name -> sampler (the names are defined once in stages.common.registry)
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = dict(
    zip(SAMPLER_NAMES, (euler_sample, heun_sample, euler_maruyama_sample), strict=True)
)


def _key(name: str) -> str:
    return name.replace("_", "-").lower()


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """Sampler function by name: "euler", "heun" or "euler-maruyama"."""
    key = _key(name)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    return SAMPLERS[key]
