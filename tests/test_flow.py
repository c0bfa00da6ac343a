"""Flow matching math and samplers, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from stages.common.flow import (
    REPA_SDE_LAST_T,
    SAMPLER_CONVENTIONS,
    SAMPLERS,
    GuidedVelocity,
    euler_maruyama_sample,
    euler_sample,
    flow_loss,
    get_sampler,
    heun_sample,
    interpolate,
    sample_timesteps,
    time_grid,
    velocity_target,
)

torch.set_num_threads(1)


def test_interpolate_and_target_by_hand():
    x0 = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    eps = torch.tensor([[3.0, 0.0], [-1.0, 2.0]])
    t = torch.tensor([0.25, 1.0])
    xt = interpolate(x0, eps, t)
    expected = torch.tensor([[0.75 * 1 + 0.25 * 3, 0.75 * -2 + 0.0], [-1.0, 2.0]])
    torch.testing.assert_close(xt, expected)
    torch.testing.assert_close(velocity_target(x0, eps), torch.tensor([[2.0, 2.0], [-1.5, -2.0]]))
    # ends of the path: t=0 is data, t=1 is noise; the target is the path's time derivative
    torch.testing.assert_close(interpolate(x0, eps, 0.0), x0)
    torch.testing.assert_close(interpolate(x0, eps, 1.0), eps)
    h = 1e-3
    fd = (interpolate(x0, eps, 0.4 + h) - interpolate(x0, eps, 0.4 - h)) / (2 * h)
    torch.testing.assert_close(fd, velocity_target(x0, eps), atol=1e-3, rtol=1e-3)


def test_interpolate_broadcasts_per_sample_over_video_dims():
    x0, eps = torch.zeros(3, 4, 2, 5, 5), torch.ones(3, 4, 2, 5, 5)
    xt = interpolate(x0, eps, torch.tensor([0.1, 0.5, 0.9]))
    assert torch.allclose(xt[1], torch.full_like(xt[1], 0.5))
    assert torch.allclose(xt[2], torch.full_like(xt[2], 0.9))


def test_flow_loss():
    pred, target = torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    assert flow_loss(pred, target).item() == pytest.approx((1 + 4 + 0 + 4) / 4)
    torch.testing.assert_close(flow_loss(pred, target, reduction="none"), torch.tensor([2.5, 2.0]))


def test_sample_timesteps():
    g = torch.Generator().manual_seed(0)
    u = sample_timesteps(20000, "uniform", generator=g)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    ln = sample_timesteps(20000, "logit_normal", generator=g, mean=0.0, std=1.0)
    logits = torch.log(ln / (1 - ln))
    assert abs(logits.mean().item()) < 0.03 and abs(logits.std().item() - 1.0) < 0.03
    shifted = sample_timesteps(20000, "logit_normal", generator=g, mean=1.0)
    assert shifted.median() > 0.7  # sigmoid(1) = 0.73
    a = sample_timesteps(5, generator=torch.Generator().manual_seed(1))
    b = sample_timesteps(5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="schedule"):
        sample_timesteps(3, "cosine")


# Data x0 ~ N(mu, s^2 I): the linear path has Gaussian marginals N((1-t) mu, sigma_t^2 I) with
# sigma_t^2 = (1-t)^2 s^2 + t^2, and the exact velocity field (the ODE that transports them) is
#   v(x, t) = -mu + (t - (1-t) s^2) / sigma_t^2 * (x - (1-t) mu),
# whose flow maps noise z at t=1 to mu + s z at t=0.
MU, S = 1.5, 0.5


def _sigma2(t):
    return (1 - t) ** 2 * S**2 + t**2


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
    t = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return -MU + (t - (1 - t) * S**2) / _sigma2(t) * (x - (1 - t) * MU)


def test_velocity_field_matches_conditional_expectation():
    """Monte Carlo check that the closed form is E[eps - x0 | x_t] (so the tests below are meaningful)."""
    g = torch.Generator().manual_seed(0)
    n, t = 400_000, 0.4
    x0 = MU + S * torch.randn(n, generator=g, dtype=torch.float64)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    xt = interpolate(x0, eps, t)
    target = velocity_target(x0, eps)
    # E[target | x_t] is affine in x_t: least squares fit recovers slope and intercept
    A = torch.stack([xt, torch.ones_like(xt)], 1)
    coef = torch.linalg.lstsq(A, target[:, None]).solution.squeeze()
    slope = (t - (1 - t) * S**2) / _sigma2(t)
    assert coef[0].item() == pytest.approx(slope, abs=0.01)
    assert coef[1].item() == pytest.approx(-MU - slope * (1 - t) * MU, abs=0.01)


@pytest.mark.parametrize("convention, heun_tol", [("repa", 2e-3), ("uniform", 1e-3)])
def test_euler_and_heun_land_on_the_exact_map(convention, heun_tol):
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = MU + S * z
    err = {}
    for name, fn in (("euler", euler_sample), ("heun", heun_sample)):
        for steps in (10, 40):
            out = fn(gaussian_velocity, z, num_steps=steps, convention=convention).double()
            err[name, steps] = (out - exact).abs().max().item()
    assert err["euler", 40] < 0.07
    assert err["heun", 40] < heun_tol
    assert err["heun", 10] < err["euler", 10] / 5  # second order beats first order at equal steps
    assert err["euler", 40] < err["euler", 10] / 3  # first order: error ~ 1/steps
    # second order: error ~ 1/steps^2 (REPA's Euler last step is a local O(h^2) error too)
    assert err["heun", 40] < err["heun", 10] / 8


def test_euler_maruyama_matches_marginals():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 1, generator=g)
    out = euler_maruyama_sample(gaussian_velocity, z, num_steps=100, generator=g)
    assert out.mean().item() == pytest.approx(MU, abs=0.03)
    assert out.std().item() == pytest.approx(S, abs=0.03)
    # stochastic: not the deterministic ODE map
    assert (out - (MU + S * z)).abs().mean() > 0.05
    # uniform convention, diffusion_norm=0: exactly Euler on the same grid
    torch.testing.assert_close(
        euler_maruyama_sample(
            gaussian_velocity, z[:16], num_steps=20, diffusion_norm=0.0, generator=g, convention="uniform"
        ),
        euler_sample(gaussian_velocity, z[:16], num_steps=20),
    )
    uniform = euler_maruyama_sample(
        gaussian_velocity, z, num_steps=100, generator=torch.Generator().manual_seed(1), convention="uniform"
    )
    assert uniform.mean().item() == pytest.approx(MU, abs=0.03)
    assert uniform.std().item() == pytest.approx(S, abs=0.03)


def _class_field(x, t, y):
    """A toy conditional field: class k pulls towards k, the null class (3) towards 0."""
    target = torch.where(y == 3, torch.zeros_like(y), y).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x - target + 0.1 * t.reshape(-1, *([1] * (x.ndim - 1)))


def test_cfg_scale_one_equals_conditional():
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1])
    plain = euler_sample(_class_field, z, num_steps=8, y=y)
    guided = euler_sample(_class_field, z, num_steps=8, y=y, cfg_scale=1.0, null_class=3)
    torch.testing.assert_close(plain, guided)
    gv = GuidedVelocity(_class_field, null_class=3, cfg_scale=1.0)
    t = torch.full((4,), 0.5)
    torch.testing.assert_close(gv(z, t, y), _class_field(z, t, y))


def test_guided_velocity_formula_and_single_batched_call():
    calls = []

    def field(x, t, y):
        calls.append(x.shape[0])
        return _class_field(x, t, y)

    x, y = torch.randn(3, 2), torch.tensor([0, 1, 2])
    t = torch.full((3,), 0.5)
    gv = GuidedVelocity(field, null_class=3, cfg_scale=4.0)
    out = gv(x, t, y)
    assert calls == [6]  # cond + uncond in one forward
    v_c, v_u = _class_field(x, t, y), _class_field(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(out, v_u + 4.0 * (v_c - v_u))


def test_guidance_interval():
    x, y = torch.randn(2, 2), torch.tensor([1, 2])
    gv = GuidedVelocity(_class_field, null_class=3, cfg_scale=3.0, guidance_interval=(0.2, 0.6))
    for tv, guided in ((0.1, False), (0.2, True), (0.5, True), (0.6, True), (0.9, False)):
        t = torch.full((2,), tv)
        v_c, v_u = _class_field(x, t, y), _class_field(x, t, torch.full_like(y, 3))
        expected = v_u + 3.0 * (v_c - v_u) if guided else v_c
        torch.testing.assert_close(gv(x, t, y), expected)
    # mixed t in one batch: guidance per sample
    t = torch.tensor([0.1, 0.5])
    out = gv(x, t, y)
    v_c, v_u = _class_field(x, t, y), _class_field(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(out[0], v_c[0])
    torch.testing.assert_close(out[1], (v_u + 3.0 * (v_c - v_u))[1])
    with pytest.raises(ValueError, match="guidance_interval"):
        GuidedVelocity(_class_field, 3, 2.0, (0.8, 0.2))
    with pytest.raises(ValueError, match="class-conditional"):
        GuidedVelocity(_class_field, None, 2.0)


def test_sampler_lookup_and_step_check():
    assert get_sampler("heun") is heun_sample
    assert get_sampler("euler_maruyama") is euler_maruyama_sample
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("dpm")
    with pytest.raises(ValueError, match="num_steps"):
        euler_sample(gaussian_velocity, torch.zeros(1, 1), num_steps=0)
    assert math.isfinite(heun_sample(gaussian_velocity, torch.zeros(1, 1), num_steps=1).item())


# ----------------------------------------------------------------------------- conventions
# REPA's samplers.py (sihyun-yu/REPA) against the "uniform" rule: grids, evaluation counts, and
# closed forms on the linear field v = c x, where every step multiplies x by a known factor.
C = 0.7


def _recording(field):
    calls: list[tuple[float, int]] = []

    def fn(x, t, y=None):
        calls.append((round(float(t[0]), 12), x.shape[0]))
        return field(x, t, y)

    return fn, calls


def _linear(x, t, y=None):
    return C * x


def _grid(n: int, stop: float = 0.0) -> list[float]:
    if stop:
        return [*torch.linspace(1.0, stop, n, dtype=torch.float64).tolist(), 0.0]
    return torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64).tolist()


def _expected_times(sampler: str, convention: str, n: int) -> list[float]:
    """Times the velocity is evaluated at, written out from REPA's loops / our old rule."""
    if sampler == "euler-maruyama":
        ts = _grid(n, REPA_SDE_LAST_T) if convention == "repa" else _grid(n)
        return ts[:-1]
    ts = _grid(n)
    if sampler == "euler":
        return ts[:-1]
    out = []
    for i in range(n):
        out.append(ts[i])
        if convention == "uniform" or i < n - 1:  # REPA: `if heun and (i < num_steps - 1)`
            out.append(ts[i + 1])
    return out


@pytest.mark.parametrize("convention", SAMPLER_CONVENTIONS)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_time_grid_and_evaluation_count(sampler, convention):
    n = 5
    fn, calls = _recording(_linear)
    extra = {"generator": torch.Generator().manual_seed(0)} if sampler == "euler-maruyama" else {}
    SAMPLERS[sampler](fn, torch.ones(2, 3), num_steps=n, convention=convention, **extra)
    times = [t for t, _ in calls]
    expected = _expected_times(sampler, convention, n)
    assert times == pytest.approx(expected, abs=1e-6)
    counts = {"euler": n, "heun": 2 * n - (convention == "repa"), "euler-maruyama": n}
    assert len(times) == counts[sampler]
    assert time_grid(sampler, n, convention)[:-1] == pytest.approx(
        _grid(n, REPA_SDE_LAST_T if (sampler, convention) == ("euler-maruyama", "repa") else 0.0)[:-1]
    )
    if sampler == "heun":  # REPA never evaluates the model at t = 0
        assert (0.0 in times) == (convention == "uniform")


def _product(factors) -> float:
    return math.prod(factors)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_closed_forms_on_a_linear_field(n):
    """dx/dt = C x: an Euler step multiplies x by (1 + C dt), a Heun step by (1 + C dt + (C dt)^2 / 2)."""
    x0 = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    h = -1.0 / n
    euler = (1 + C * h) ** n
    heun_uniform = (1 + C * h + (C * h) ** 2 / 2) ** n
    heun_repa = (1 + C * h + (C * h) ** 2 / 2) ** (n - 1) * (1 + C * h)
    ts = _grid(n, REPA_SDE_LAST_T)
    em_repa = _product(1 + C * (b - a) for a, b in zip(ts[:-1], ts[1:], strict=True))  # norm = 0: Euler
    cases = {
        ("euler", "repa"): euler,
        ("euler", "uniform"): euler,
        ("heun", "uniform"): heun_uniform,
        ("heun", "repa"): heun_repa,
        ("euler-maruyama", "uniform"): euler,
        ("euler-maruyama", "repa"): em_repa,
    }
    for (sampler, convention), factor in cases.items():
        extra = {"diffusion_norm": 0.0} if sampler == "euler-maruyama" else {}
        out = SAMPLERS[sampler](_linear, x0, num_steps=n, convention=convention, **extra)
        torch.testing.assert_close(out.double(), x0 * factor, rtol=1e-6, atol=1e-7)
    # the exact flow is x0 * exp(-C); with one step REPA's Heun is exactly Euler
    if n == 1:
        assert heun_repa == euler
    else:
        assert abs(heun_repa - math.exp(-C)) < abs(euler - math.exp(-C))


@pytest.mark.parametrize("convention", SAMPLER_CONVENTIONS)
def test_euler_maruyama_last_step_adds_no_noise(convention):
    n, norm = 6, 0.8
    seen: list[tuple[torch.Tensor, float]] = []

    def field(x, t, y=None):
        seen.append((x.clone(), float(t[0])))
        return gaussian_velocity(x, t)

    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    out = euler_maruyama_sample(
        field, z, num_steps=n, diffusion_norm=norm, generator=g, convention=convention
    )
    x_last, t_last = seen[-1]
    v = gaussian_velocity(x_last, torch.full((4,), t_last))
    drift = v + norm * (x_last + (1 - t_last) * v)
    # REPA: the SDE drift's mean step from 0.04 (`mean_x`); uniform: a plain ODE step
    step = drift if convention == "repa" else v
    torch.testing.assert_close(out, x_last + (0.0 - t_last) * step)
    assert t_last == pytest.approx(REPA_SDE_LAST_T if convention == "repa" else 1.0 / n, abs=1e-6)
    # exactly n - 1 noise draws were taken from the generator
    ref = torch.Generator().manual_seed(5)
    for _ in range(n - 1):
        torch.randn(z.shape, generator=ref)
    torch.testing.assert_close(torch.randn(3, generator=g), torch.randn(3, generator=ref))


def test_euler_maruyama_per_sample_generators_ignore_the_batch():
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))

    def gens(idx):
        return [torch.Generator().manual_seed(100 + i) for i in idx]

    whole = euler_maruyama_sample(gaussian_velocity, z, num_steps=8, generator=gens(range(5)))
    parts = [
        euler_maruyama_sample(gaussian_velocity, z[a:b], num_steps=8, generator=gens(range(a, b)))
        for a, b in ((0, 2), (2, 5))
    ]
    torch.testing.assert_close(whole, torch.cat(parts))
    with pytest.raises(ValueError, match="generators for a batch"):
        euler_maruyama_sample(gaussian_velocity, z, num_steps=2, generator=gens(range(3)))


def test_heun_corrector_guidance_follows_the_step_start_in_repa():
    """Two steps 1 -> 0.5 -> 0, guidance only for t <= 0.6: REPA guides the corrector of the first
    step (evaluated at 0.5) by t_cur = 1, i.e. not at all. Guided calls double the batch."""
    y = torch.tensor([0, 1])
    got = {}
    for convention in SAMPLER_CONVENTIONS:
        fn, calls = _recording(_class_field)
        heun_sample(
            fn, torch.ones(2, 3), num_steps=2, y=y, cfg_scale=2.0, guidance_interval=(0.0, 0.6),
            null_class=3, convention=convention,
        )  # fmt: skip
        got[convention] = calls
    assert got["repa"] == [(1.0, 2), (0.5, 2), (0.5, 4)]
    assert got["uniform"] == [(1.0, 2), (0.5, 4), (0.5, 4), (0.0, 4)]


def test_unknown_convention_is_refused():
    for sampler in SAMPLERS.values():
        with pytest.raises(ValueError, match="convention 'sde'"):
            sampler(gaussian_velocity, torch.zeros(1, 1), num_steps=2, convention="sde")
