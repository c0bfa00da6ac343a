"""The weight-free HOG + normal-flow target (stages.common.models.hog) against an independent reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.common.models.encoders import load_encoder
from stages.common.models.hog import HogFlow
from stages.common.models.vae import WeightsNotFoundError


def _reference_hog(image: np.ndarray, nbins: int = 9, cell: int = 8) -> np.ndarray:
    """MaskFeat's HOG of one RGB image [3, H, W] written with loops: [3 * nbins, H/cell, W/cell]."""
    c, h, w = image.shape
    padded = np.pad(image, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    sobel = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float64)
    out = np.zeros((c, nbins, h // cell, w // cell))
    for ch in range(c):
        for y in range(h):
            for x in range(w):
                patch = padded[ch, y : y + 3, x : x + 3]
                gx, gy = (float((patch * k).sum()) for k in (sobel, sobel.T))
                gx, gy = (0.0 if abs(g) < 1e-9 else g for g in (gx, gy))  # exact zeros at reflected borders
                b = math.floor(math.atan2(gx, gy) / math.pi * nbins) % nbins
                out[ch, b, y // cell, x // cell] += math.hypot(gx, gy)
    norm = np.sqrt((out**2).sum(1, keepdims=True))
    return (out / np.maximum(norm, 1e-12)).reshape(c * nbins, h // cell, w // cell)


def test_hog_matches_a_loop_reference():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (3, 16, 16))
    tokens = HogFlow()(torch.from_numpy(image).float()[None, None])  # [1, 1, 2, 2, 35]
    ours = tokens[0, 0, ..., :27].permute(2, 0, 1).double().numpy()
    np.testing.assert_allclose(ours, _reference_hog(image), atol=1e-5)


@pytest.mark.parametrize("dx,dy", [(1, 0), (0, 1), (-1, 0), (0, -1)])
def test_normal_flow_histogram_points_along_the_motion(dx, dy):
    """A smooth pattern moving (dx, dy) px per frame (image axes: x right, y down) puts most of the
    flow histogram's mass in the bins within 60 degrees of its direction."""
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float64)
    frames = [0.5 + 0.25 * np.sin((xx - dx * t) / 3.0) * np.cos((yy - dy * t) / 4.0) for t in range(3)]
    clip = torch.from_numpy(np.stack(frames)).float()[None, :, None].expand(1, 3, 3, 64, 64)
    model = HogFlow(cell=64)
    flow = model(clip.contiguous())[0, 0, 0, 0, 27:].double()
    width = 360.0 / model.config.flow_bins
    centres = (np.arange(model.config.flow_bins) + 0.5) * width
    off = np.abs((centres - math.degrees(math.atan2(dy, dx)) + 180) % 360 - 180)
    near = torch.from_numpy(off <= 60)
    assert float(flow[near].sum()) > 0.75 * float(flow.sum()), (flow, off)


def test_encoder_loads_builtin_and_saved_folders(tmp_path):
    clips = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8)
    builtin = load_encoder("hog")
    feats = builtin.features(clips)
    assert feats.shape == (2, 4, 4, 4, 36) and builtin.dim == 36 and builtin.grid(4, 32) == (4, 4, 4)
    HogFlow(random_seed=3).save_pretrained(tmp_path / "random-hog")
    twin = load_encoder("hog", tmp_path / "random-hog")
    assert not torch.allclose(twin.features(clips), feats)  # other filters, same shape
    assert twin.features(clips).shape == feats.shape
    HogFlow().save_pretrained(tmp_path / "hog")
    torch.testing.assert_close(load_encoder("hog", tmp_path / "hog").features(clips), feats)
    resized = load_encoder("hog", input_size=16).features(clips)
    assert resized.shape == (2, 4, 2, 2, 36)
    with pytest.raises(WeightsNotFoundError, match="hog is built in as .maskfeat-hog."):
        load_encoder("hog", tmp_path / "missing")
    with pytest.raises(ValueError, match="multiple of its cell 8"):
        load_encoder("hog", input_size=20)
