"""Resampling to the DiT grid and L2 normalisation: known answers."""

from __future__ import annotations

import pytest
import torch

from stages.common.resample import (
    l2_normalize_tokens,
    resample_spatial,
    resample_temporal,
    resample_to_grid,
    to_target,
)


def test_constant_stays_constant_for_every_path():
    x = torch.full((2, 8, 6, 6, 5), 3.25)
    for grid in [(8, 6, 6), (4, 3, 3), (2, 12, 12), (5, 4, 4), (16, 2, 2), (3, 9, 7)]:
        y = resample_to_grid(x, grid)
        assert y.shape == (2, *grid, 5)
        torch.testing.assert_close(y, torch.full_like(y, 3.25))


def test_identity_when_grid_equals_input():
    x = torch.randn(2, 4, 3, 5, 7)
    y = resample_to_grid(x, (4, 3, 5))
    assert torch.equal(y, x)


def test_temporal_average_of_k_frames_is_exact():
    x = torch.randn(2, 8, 3, 3, 4)
    y = resample_temporal(x, 2)  # k = 4: a latent step covers 4 frames
    torch.testing.assert_close(y[:, 0], x[:, 0:4].mean(1))
    torch.testing.assert_close(y[:, 1], x[:, 4:8].mean(1))
    assert torch.equal(resample_temporal(x, 8), x)


def test_temporal_linear_interpolation_known_answer():
    # two tubelets (values 0, 1) -> four frames; tubelet centres sit at frames 0.5 and 2.5
    x = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1)
    y = resample_temporal(x, 4).flatten()
    torch.testing.assert_close(y, torch.tensor([0.0, 0.25, 0.75, 1.0]))
    # 3 -> 2 is not a whole factor either: interpolated, not averaged in groups
    x3 = torch.tensor([0.0, 3.0, 6.0]).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(resample_temporal(x3, 2).flatten(), torch.tensor([0.75, 5.25]))


def test_spatial_downsample_is_antialiased():
    # a stripe pattern of period 2 must average to 0.5 when shrunk 4x, not alias to 0 or 1
    stripes = (torch.arange(16) % 2).float().view(1, 1, 1, 16, 1).expand(1, 1, 16, 16, 1)
    y = resample_spatial(stripes, (4, 4))
    torch.testing.assert_close(y, torch.full_like(y, 0.5), atol=0.05, rtol=0)
    # upsampling a 2x2 grid keeps the corner ordering and the value range
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2, 1)
    up = resample_spatial(x, (4, 4))[0, 0, :, :, 0]
    assert up[0, 0] == 0.0 and up[-1, -1] == 3.0
    assert torch.all(up[:, 1:] >= up[:, :-1]) and torch.all(up[1:] >= up[:-1])


def test_l2_normalize_unit_norm_and_zero_safe():
    x = torch.randn(2, 3, 4, 4, 16) * 7
    x[0, 0, 0, 0] = 0
    y = l2_normalize_tokens(x)
    n = y.norm(dim=-1)
    assert n[0, 0, 0, 0] == 0 and torch.isfinite(y).all()
    n[0, 0, 0, 0] = 1
    torch.testing.assert_close(n, torch.ones_like(n))
    t = to_target(torch.randn(1, 16, 8, 8, 6), (4, 2, 2))
    assert t.shape == (1, 4, 2, 2, 6)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(1, 4, 2, 2))


def test_resample_rejects_bad_input():
    a = torch.randn(2, 4, 3, 3, 5)
    with pytest.raises(ValueError):
        resample_to_grid(torch.randn(2, 3, 3, 5), (1, 3, 3))
    with pytest.raises(ValueError):
        resample_to_grid(a, (4, 3))
