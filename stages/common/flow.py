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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


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


def score_from_velocity(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """grad log p_t(x) = -(x + (1 - t) v) / t for the linear path (derivation in the module doc)."""
    t = _expand(t, x)
    return -(x + (1 - t) * v) / t


# ----------------------------------------------------------------------------- guidance


class GuidedVelocity:
    """Classifier-free guidance: v_u + scale * (v_c - v_u), both branches in one forward pass.

    Guidance applies only to samples whose t lies in `guidance_interval` = (t_lo, t_hi)
    (inclusive); elsewhere, and when the scale is 1 or there are no labels, the conditional
    velocity is returned from a single plain forward.
    """

    def __init__(
        self,
        velocity_fn: VelocityFn,
        null_class: int | None,
        cfg_scale: float = 1.0,
        guidance_interval: Sequence[float] | None = None,
    ):
        if guidance_interval is not None:
            if len(guidance_interval) != 2 or not 0.0 <= guidance_interval[0] <= guidance_interval[1] <= 1.0:
                raise ValueError(
                    f"guidance_interval must be (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1, got {guidance_interval}"
                )
        if cfg_scale != 1.0 and null_class is None:
            raise ValueError("classifier-free guidance (cfg_scale != 1) needs a class-conditional model")
        self.velocity_fn = velocity_fn
        self.null_class = null_class
        self.cfg_scale = float(cfg_scale)
        self.interval = tuple(float(v) for v in guidance_interval) if guidance_interval is not None else None

    def _active(self, t: torch.Tensor) -> torch.Tensor:
        if self.interval is None:
            return torch.ones_like(t, dtype=torch.bool)
        return (t >= self.interval[0]) & (t <= self.interval[1])

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.cfg_scale == 1.0 or y is None:
            return self.velocity_fn(x, t, y)
        active = self._active(t)
        if not bool(active.any()):
            return self.velocity_fn(x, t, y)
        null = torch.full_like(y, self.null_class)
        v = self.velocity_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        v_cond, v_uncond = v.chunk(2)
        guided = v_uncond + self.cfg_scale * (v_cond - v_uncond)
        return torch.where(_expand(active, x).bool(), guided, v_cond)


# ----------------------------------------------------------------------------- samplers


def _prepare(
    velocity_fn: VelocityFn,
    cfg_scale: float,
    guidance_interval: Sequence[float] | None,
    null_class: int | None,
) -> VelocityFn:
    if cfg_scale == 1.0 and guidance_interval is None:
        return velocity_fn
    return GuidedVelocity(velocity_fn, null_class, cfg_scale, guidance_interval)


def _grid(num_steps: int, device: torch.device) -> torch.Tensor:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64, device=device)


def _v(fn: VelocityFn, x: torch.Tensor, t: float, y: torch.Tensor | None) -> torch.Tensor:
    tt = torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)
    return fn(x, tt, y).to(x.dtype)


def euler_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    num_steps: int = 50,
    y: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
    guidance_interval: Sequence[float] | None = None,
    null_class: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Euler ODE integration of dx/dt = v from t = 1 (noise) to t = 0 (data): num_steps evaluations."""
    fn = _prepare(velocity_fn, cfg_scale, guidance_interval, null_class)
    ts = _grid(num_steps, noise.device).tolist()
    x = noise.float()
    for t, t_next in tqdm(
        list(zip(ts[:-1], ts[1:], strict=True)), desc="euler", disable=not progress, leave=False
    ):
        x = x + (t_next - t) * _v(fn, x, t, y)
    return x


def heun_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    num_steps: int = 50,
    y: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
    guidance_interval: Sequence[float] | None = None,
    null_class: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Heun's second-order ODE method (trapezoidal corrector): 2 * num_steps evaluations."""
    fn = _prepare(velocity_fn, cfg_scale, guidance_interval, null_class)
    ts = _grid(num_steps, noise.device).tolist()
    x = noise.float()
    for t, t_next in tqdm(
        list(zip(ts[:-1], ts[1:], strict=True)), desc="heun", disable=not progress, leave=False
    ):
        dt = t_next - t
        v = _v(fn, x, t, y)
        x_pred = x + dt * v
        x = x + dt * 0.5 * (v + _v(fn, x_pred, t_next, y))
    return x


def euler_maruyama_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    num_steps: int = 50,
    y: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
    guidance_interval: Sequence[float] | None = None,
    null_class: int | None = None,
    progress: bool = False,
    diffusion_norm: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE with g(t)^2 = 2 * diffusion_norm * t (module doc).

    The last step to t = 0 is a plain Euler ODE step, so no fresh noise lands on the output.
    """
    fn = _prepare(velocity_fn, cfg_scale, guidance_interval, null_class)
    ts = _grid(num_steps, noise.device).tolist()
    x = noise.float()
    steps = list(zip(ts[:-1], ts[1:], strict=True))
    for i, (t, t_next) in enumerate(tqdm(steps, desc="euler-maruyama", disable=not progress, leave=False)):
        dt = t_next - t  # negative
        v = _v(fn, x, t, y)
        if i == len(steps) - 1:
            x = x + dt * v
            continue
        # v - g^2/2 * score with score = -(x + (1 - t) v) / t and g^2 = 2 * norm * t
        drift = v + diffusion_norm * (x + (1 - t) * v)
        z = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
        x = x + dt * drift + (2 * diffusion_norm * t * -dt) ** 0.5 * z.to(x.device, x.dtype)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": euler_sample,
    "heun": heun_sample,
    "euler-maruyama": euler_maruyama_sample,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """Sampler function by name: "euler", "heun" or "euler-maruyama"."""
    key = name.replace("_", "-").lower()
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    return SAMPLERS[key]
