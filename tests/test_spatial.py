"""iREPA spatial metrics (LDS, CDS, RMSC) against a brute-force double loop over token pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.evaluate.spatial import (
    combine,
    frame_metrics,
    merge_partials,
    spatial_metrics,
    spatial_metrics_block,
)


def _brute_frame(grid: np.ndarray, far_dist: int, dmax: int) -> dict[str, float | None]:
    """One frame [H, W, D] by explicit loops over all token pairs."""
    h, w, _ = grid.shape
    toks = [(r, c, grid[r, c].astype(np.float64)) for r in range(h) for c in range(w)]

    def cos(a, b):
        return float(a @ b) / (max(math.sqrt(a @ a), 1e-8) * max(math.sqrt(b @ b), 1e-8))

    local, far, by_d = [], [], {d: [] for d in range(1, dmax + 1)}
    for i, (ri, ci, a) in enumerate(toks):
        for j, (rj, cj, b) in enumerate(toks):
            if i == j:
                continue
            d = abs(ri - rj) + abs(ci - cj)
            if d == 1 and j > i:  # each 4-neighbour pair once
                local.append(cos(a, b))
            if d >= far_dist:  # ordered pairs, as iREPA's Gram mask
                far.append(cos(a, b))
            if d <= dmax:
                by_d[d].append(cos(a, b))
    ds = [d for d in by_d if by_d[d]]
    cds = -np.polyfit(ds, [np.mean(by_d[d]) for d in ds], 1)[0] if len(ds) >= 2 else None
    units = [a / max(math.sqrt(a @ a), 1e-8) for _, _, a in toks]
    mean = sum(units) / len(units)
    rmsc = math.sqrt(sum(float((u - mean) @ (u - mean)) for u in units) / len(units))
    return {"lds": (np.mean(local) - np.mean(far)) if far else None, "cds": cds, "rmsc": rmsc}


def _brute(feats: np.ndarray, far_dist: int, dmax: int) -> dict[str, float | None]:
    frames = [_brute_frame(f, far_dist, dmax) for f in feats.reshape(-1, *feats.shape[2:])]
    return {k: (None if frames[0][k] is None else float(np.mean([f[k] for f in frames]))) for k in frames[0]}


@pytest.mark.parametrize(("far_dist", "dmax"), [(6, 8), (3, 4)])
def test_metrics_match_brute_force(far_dist, dmax):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(2, 2, 4, 5, 3)).astype(np.float32)
    feats[0, 1] += 2.0 * np.linspace(0, 1, 5)[None, :, None]  # some spatial structure
    want = _brute(feats, far_dist, dmax)
    got = spatial_metrics(feats, far_dist=far_dist, dmax=dmax)
    assert got["frames"] == 4 and got["clips"] == 2 and got["grid"] == [4, 5]
    for key in ("lds", "cds", "rmsc"):
        assert got[key] == pytest.approx(want[key], abs=1e-5), key
    per_frame = frame_metrics(feats, far_dist=far_dist, dmax=dmax)
    assert per_frame["lds"].shape == (2, 2)
    assert float(per_frame["cds"].mean()) == pytest.approx(want["cds"], abs=1e-5)
    one = _brute_frame(feats[0, 1], far_dist, dmax)
    for key in ("lds", "cds", "rmsc"):
        assert float(per_frame[key][0, 1]) == pytest.approx(one[key], abs=1e-5), key


def test_blockwise_combine_equals_one_shot():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(5, 3, 4, 4, 6)).astype(np.float16)
    whole = spatial_metrics(feats)
    parts = [spatial_metrics_block(feats[a:b]) for a, b in ((0, 1), (1, 3), (3, 5))]
    blocked = combine(parts)
    assert blocked["clips"] == 5 and blocked["frames"] == 15
    for key in ("lds", "cds", "rmsc", "local_cos", "far_cos"):
        assert blocked[key] == pytest.approx(whole[key], abs=1e-9), key
    assert blocked["cos_at_distance"] == pytest.approx(whole["cos_at_distance"], abs=1e-9)
    tree = combine([merge_partials(parts[:2]), parts[2]])
    assert tree["cds"] == pytest.approx(whole["cds"], abs=1e-9)


def test_hand_made_grids():
    # 4x4 checkerboard of two orthogonal unit vectors: neighbours orthogonal (local 0), cos 1 at even
    # distances and 0 at odd ones; tokens are half e1, half e2 -> RMSC = sqrt(0.5)
    board = np.zeros((1, 1, 4, 4, 2), np.float32)
    for r in range(4):
        for c in range(4):
            board[0, 0, r, c, (r + c) % 2] = 1.0
    got = spatial_metrics(board, far_dist=6, dmax=6)
    assert got["local_cos"] == pytest.approx(0.0) and got["far_cos"] == pytest.approx(1.0)  # d = 6 only
    assert got["lds"] == pytest.approx(-1.0)
    assert got["cos_at_distance"] == pytest.approx([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    assert got["rmsc"] == pytest.approx(math.sqrt(0.5))
    # identical tokens: no structure at all
    flat = np.ones((1, 2, 3, 3, 4), np.float32)
    got = spatial_metrics(flat, far_dist=3)
    assert got["lds"] == pytest.approx(0.0) and got["cds"] == pytest.approx(0.0)
    assert got["rmsc"] == pytest.approx(0.0, abs=1e-6)


def test_small_grids_and_inputs():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(1, 2, 2, 2, 3)).astype(np.float32)
    got = spatial_metrics(feats)  # max distance 2 < far_dist 6
    assert got["lds"] is None and got["far_cos"] is None and got["cds"] is not None
    assert got["cos_at_distance"][2:] == [None] * 6
    assert spatial_metrics(feats[:, :, :1])["cds"] is None  # 1x2 grid: a single distance
    torch_got = spatial_metrics(torch.from_numpy(feats))
    assert torch_got["cds"] == pytest.approx(got["cds"]) and torch_got["rmsc"] == pytest.approx(got["rmsc"])
    with pytest.raises(ValueError, match="2 tokens"):
        spatial_metrics(np.ones((1, 1, 1, 1, 3)))
    with pytest.raises(ValueError, match="n, T, H, W, D"):
        spatial_metrics_block(np.ones((2, 3, 3, 4)))
    with pytest.raises(ValueError, match="grid"):
        combine([spatial_metrics_block(feats), spatial_metrics_block(rng.normal(size=(1, 1, 3, 3, 3)))])
