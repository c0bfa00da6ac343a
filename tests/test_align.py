"""Alignment recipes: lambdas, schedules, iREPA spatial normalisation and conv projector, weighted loss."""

from __future__ import annotations

import statistics

import pytest
import torch

from stages.train.align import (
    AlignmentHead,
    ConvProjector,
    alignment_active,
    normalize_target,
    parse_lambdas,
    schedule_weight,
    spatial_normalize,
)

# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("schedule", "until", "total", "expected"),
    [
        ("constant", 3, 100, {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0, 100: 0.0}),
        ("constant", None, 10, {1: 1.0, 10: 1.0, 50: 1.0}),
        ("linear", 4, 100, {1: 1.0, 2: 0.75, 3: 0.5, 4: 0.25, 5: 0.0, 9: 0.0}),
        ("linear", None, 10, {1: 1.0, 6: 0.5, 10: 0.1, 11: 0.0, 20: 0.0}),
        # cosine: (1 + cos(pi * (step - 1) / L)) / 2
        ("cosine", 4, 100, {1: 1.0, 2: 0.8535533905932737, 3: 0.5, 4: 0.14644660940672627, 5: 0.0}),
        ("cosine", None, 8, {1: 1.0, 5: 0.5, 9: 0.0}),
    ],
)
def test_schedule_weight_values(schedule, until, total, expected):
    for step, value in expected.items():
        assert schedule_weight(step, schedule, until, total) == pytest.approx(value, abs=1e-12), step


def test_schedule_warmup_follows_crepa():
    # warmup 2, linear decay over the rest of until = 10: s = step - 1; s < 2 -> s / 2; then 1 - (s - 2) / 8
    got = [schedule_weight(step, "linear", 10, 100, warmup=2) for step in (1, 2, 3, 7, 10, 11)]
    assert got == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.125, 0.0])
    assert schedule_weight(2, "constant", None, 100, warmup=4) == pytest.approx(0.25)


def test_schedule_refusals():
    with pytest.raises(ValueError, match="exponential"):
        schedule_weight(1, "exponential", None, 10)
    with pytest.raises(ValueError, match="from 1"):
        schedule_weight(0, "constant", None, 10)
    with pytest.raises(ValueError, match="align-until"):
        schedule_weight(1, "constant", 0, 10)
    with pytest.raises(ValueError, match="warmup"):
        schedule_weight(1, "linear", 5, 10, warmup=5)


def test_alignment_active():
    assert alignment_active(1, None) and alignment_active(10**7, None)
    assert alignment_active(5, 5) and not alignment_active(6, 5) and not alignment_active(1000, 5)
    with pytest.raises(ValueError):
        alignment_active(0, 5)


# --------------------------------------------------------------------------- lambdas


def test_parse_lambdas_single_and_map():
    encs = ["dino", "sam2.b", "clip"]
    assert parse_lambdas("0.5", encs) == {"dino": 0.5, "sam2.b": 0.5, "clip": 0.5}
    assert parse_lambdas(0.25, encs) == {"dino": 0.25, "sam2.b": 0.25, "clip": 0.25}
    assert parse_lambdas("dino=0.5, sam2.b=0.25,clip=1", encs) == {"dino": 0.5, "sam2.b": 0.25, "clip": 1.0}
    with pytest.warns(UserWarning, match="clip"):
        got = parse_lambdas("dino=0.5,sam2.b=0.25", encs)
    assert got == {"dino": 0.5, "sam2.b": 0.25, "clip": 0.0}
    with pytest.warns(UserWarning, match="sam2.b, clip"):
        assert parse_lambdas({"dino": 2}, encs) == {"dino": 2.0, "sam2.b": 0.0, "clip": 0.0}


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("-0.5", ">= 0"),
        (-1, ">= 0"),
        ("nan", "finite"),
        ("dino=0.5,siglip=0.1", "'siglip'.*not chosen"),
        ("dino=-0.1", ">= 0"),
        ("dino=abc", "not a number"),
        ("dino=0.1,dino=0.2", "twice"),
        ("fast", "cannot read"),
        ("=0.3", "cannot read"),
        (True, "number"),
    ],
)
def test_parse_lambdas_refusals(value, match):
    with pytest.raises(ValueError, match=match):
        parse_lambdas(value, ["dino", "clip"])


def test_parse_lambdas_needs_encoders():
    with pytest.raises(ValueError, match="at least one encoder"):
        parse_lambdas("0.5", [])


# --------------------------------------------------------------------------- spatial normalisation

GRID = [  # T=1, H=W=3, D=2: token (row, col) -> 2 channels
    [[1.0, 0.0], [2.0, 1.0], [0.0, 3.0]],
    [[4.0, -1.0], [1.0, 1.0], [-2.0, 2.0]],
    [[0.5, 0.5], [3.0, 0.0], [1.0, -3.0]],
]


def _hand_zscore(grid, alpha, eps=1e-6):
    tokens = [tok for row in grid for tok in row]
    out = [[None] * 3 for _ in range(3)]
    stats = []
    for ch in range(2):
        vals = [tok[ch] for tok in tokens]
        stats.append((statistics.mean(vals), statistics.stdev(vals)))  # stdev: n - 1, as torch.std
    for r in range(3):
        for c in range(3):
            out[r][c] = [(grid[r][c][ch] - alpha * stats[ch][0]) / (stats[ch][1] + eps) for ch in range(2)]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_spatial_normalize_matches_hand_definition(alpha):
    target = torch.tensor(GRID).reshape(1, 1, 3, 3, 2)
    got = spatial_normalize(target, alpha=alpha)
    assert got.dtype == torch.float32 and got.shape == target.shape
    torch.testing.assert_close(got[0, 0].double(), _hand_zscore(GRID, alpha), rtol=1e-6, atol=1e-6)


def test_spatial_normalize_is_per_frame():
    a = torch.tensor(GRID)
    b = torch.flip(a, dims=(0,)) * 2 + 1
    clip = torch.stack([a, b]).reshape(1, 2, 3, 3, 2)
    got = spatial_normalize(clip)
    torch.testing.assert_close(got[0, 0], spatial_normalize(a[None, None])[0, 0])
    torch.testing.assert_close(got[0, 1], spatial_normalize(b[None, None])[0, 0])
    assert normalize_target(clip, "token") is clip
    torch.testing.assert_close(normalize_target(clip, "spatial"), got)
    with pytest.raises(ValueError, match="whitening"):
        normalize_target(clip, "whitening")
    with pytest.raises(ValueError, match="2 tokens"):
        spatial_normalize(torch.ones(1, 1, 1, 1, 4))


# --------------------------------------------------------------------------- conv projector


def _manual_conv(hidden, weight, bias, h, w):
    """hidden [T, H*W, C] -> [T, H*W, D] by explicit 3x3 sums with zero padding."""
    t, _, c = hidden.shape
    d = weight.shape[0]
    out = torch.zeros(t, h * w, d, dtype=torch.float64)
    for f in range(t):
        for y in range(h):
            for x in range(w):
                for o in range(d):
                    acc = float(bias[o])
                    for ky in range(3):
                        for kx in range(3):
                            yy, xx = y + ky - 1, x + kx - 1
                            if 0 <= yy < h and 0 <= xx < w:
                                for ch in range(c):
                                    acc += float(weight[o, ch, ky, kx]) * float(hidden[f, yy * w + xx, ch])
                    out[f, y * w + x, o] = acc
    return out


@pytest.mark.parametrize(("h", "w"), [(3, 3), (2, 3)])
def test_conv_projector_equals_manual_convolution(h, w):
    torch.manual_seed(0)
    proj = ConvProjector(hidden_size=2, out_dim=3, grid_hw=(h, w))
    assert tuple(proj.conv.weight.shape) == (3, 2, 3, 3) and proj.conv.padding == (1, 1)
    hidden = torch.randn(1, 2, h * w, 2)
    got = proj(hidden)
    assert got.shape == (1, 2, h * w, 3)
    want = _manual_conv(hidden[0], proj.conv.weight.detach(), proj.conv.bias.detach(), h, w)
    torch.testing.assert_close(got[0].double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="grid"):
        proj(torch.randn(1, 1, h * w + 1, 2))
    with pytest.raises(ValueError, match="odd"):
        ConvProjector(2, 3, (h, w), kernel_size=2)


# --------------------------------------------------------------------------- head and loss

B, T, H, W, C = 2, 2, 3, 3, 4
DIMS = {"dino.b": 5, "clip": 3}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H * W, C, generator=g)
    targets = {n: torch.randn(B, T, H, W, d, generator=g) for n, d in DIMS.items()}
    return hidden, targets


def _hand_cos(projected, target):
    p = projected.detach().double().reshape(-1, projected.shape[-1])
    z = target.double().reshape(-1, target.shape[-1])
    vals = [float(p[i] @ z[i]) / (float(p[i].norm()) * float(z[i].norm())) for i in range(p.shape[0])]
    return sum(vals) / len(vals)


def test_head_loss_equals_hand_formula():
    torch.manual_seed(0)
    head = AlignmentHead(C, DIMS, width=8)
    hidden, targets = _inputs()
    weights = {"dino.b": 0.3, "clip": 0.7}
    loss, cos = head(hidden, targets, weights)
    hand = {n: _hand_cos(head.projectors[n.replace(".", "_")](hidden), targets[n]) for n in DIMS}
    assert set(cos) == set(DIMS)
    for n in DIMS:
        assert float(cos[n]) == pytest.approx(hand[n], abs=1e-6)
    assert loss.item() == pytest.approx((0.3 * -hand["dino.b"] + 0.7 * -hand["clip"]) / 2, abs=1e-6)


def test_shared_lambda_reproduces_repa():
    """REPA loss.py: per sample mean over tokens of -<z/|z|, z~/|z~|>, summed over encoders and batch,
    divided by (encoders * batch), times proj_coeff."""
    torch.manual_seed(1)
    head = AlignmentHead(C, DIMS, width=8)
    hidden, targets = _inputs(1)
    lam = 0.5
    loss, _ = head(hidden, targets, parse_lambdas(lam, list(DIMS)))
    proj_loss = 0.0
    for n in DIMS:
        z_tilde = torch.nn.functional.normalize(
            head.projectors[n.replace(".", "_")](hidden).reshape(B, -1, DIMS[n]), dim=-1
        )
        z = torch.nn.functional.normalize(targets[n].reshape(B, -1, DIMS[n]), dim=-1)
        proj_loss += (-(z * z_tilde).sum(-1).mean(-1).sum()).item()
    assert loss.item() == pytest.approx(lam * proj_loss / (len(DIMS) * B), abs=1e-6)


def _grads(head, hidden, targets, weights):
    head.zero_grad(set_to_none=True)
    loss, _ = head(hidden, targets, weights)
    loss.backward()
    return {n: [p.grad for p in head.projectors[n.replace(".", "_")].parameters()] for n in DIMS}


def test_per_encoder_weights_reach_the_gradient():
    torch.manual_seed(2)
    head = AlignmentHead(C, DIMS, width=8)
    hidden, targets = _inputs(2)
    g0 = _grads(head, hidden, targets, {"dino.b": 0.0, "clip": 0.5})
    assert all(g is None or not g.any() for g in g0["dino.b"])
    assert all(g is not None and g.abs().sum() > 0 for g in g0["clip"])
    g1 = _grads(head, hidden, targets, {"dino.b": 0.2, "clip": 0.5})
    g2 = _grads(head, hidden, targets, {"dino.b": 0.4, "clip": 0.5})
    for a, b in zip(g1["dino.b"], g2["dino.b"], strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, 2 * a)
    for a, b in zip(g1["clip"], g2["clip"], strict=True):  # the other encoder's gradient is unchanged
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(g0["clip"][0], g1["clip"][0])


def test_all_zero_weights_measure_only():
    head = AlignmentHead(C, DIMS, width=8)
    hidden, targets = _inputs(3)
    loss, cos = head(hidden, targets, {"dino.b": 0.0, "clip": 0.0})
    assert loss.item() == 0.0 and not loss.requires_grad
    assert set(cos) == set(DIMS) and all(-1 <= float(v) <= 1 for v in cos.values())


def test_spatial_target_norm_in_the_loss():
    torch.manual_seed(4)
    head = AlignmentHead(C, DIMS, width=8, target_norm="spatial")
    hidden, targets = _inputs(4)
    _, cos = head(hidden, targets, {"dino.b": 1.0, "clip": 1.0})
    for n in DIMS:
        want = _hand_cos(head.projectors[n.replace(".", "_")](hidden), spatial_normalize(targets[n]))
        assert float(cos[n]) == pytest.approx(want, abs=1e-6)


def test_conv_head_trains_and_keys():
    torch.manual_seed(5)
    head = AlignmentHead(C, DIMS, projector="conv", grid=(T, H, W))
    keys = set(head.state_dict())
    assert keys == {
        "projectors.dino_b.conv.weight",
        "projectors.dino_b.conv.bias",
        "projectors.clip.conv.weight",
        "projectors.clip.conv.bias",
    }
    hidden, targets = _inputs(5)
    hidden.requires_grad_(True)
    loss, _ = head(hidden, targets, {"dino.b": 1.0, "clip": 1.0})
    loss.backward()
    assert hidden.grad is not None and head.projectors["clip"].conv.weight.grad.abs().sum() > 0


def test_mlp_checkpoint_keys_unchanged():
    head = AlignmentHead(C, DIMS, width=8)
    want = {
        f"projectors.{k}.{i}.{p}" for k in ("dino_b", "clip") for i in (0, 2, 4) for p in ("weight", "bias")
    }
    assert set(head.state_dict()) == want
    assert head.state_dict()["projectors.dino_b.4.weight"].shape == (5, 8)
    fresh = AlignmentHead(C, DIMS, width=8)
    fresh.load_state_dict(head.state_dict())  # strict load of the same layout


def test_shape_refusals():
    fused = torch.randn(B, T, H, W, 8)
    parts = {"dino.b": fused[..., :5], "clip": fused[..., 5:]}
    head = AlignmentHead(C, DIMS, width=8)
    hidden, _ = _inputs()
    w = {"dino.b": 1.0, "clip": 1.0}
    with pytest.raises(ValueError, match="grid"):
        head(hidden, {"dino.b": torch.randn(B, T, 2, 2, 5), "clip": parts["clip"]}, w)
    with pytest.raises(ValueError, match="no target"):
        head(hidden, {"clip": parts["clip"]}, w)
    with pytest.raises(ValueError, match="weights are for"):
        head(hidden, parts, {"clip": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        head(hidden, parts, {"dino.b": -1.0, "clip": 1.0})
    with pytest.raises(ValueError, match="grid"):
        AlignmentHead(C, DIMS, projector="conv")
    with pytest.raises(ValueError, match="collide"):
        AlignmentHead(C, {"a.b": 2, "a_b": 2})
