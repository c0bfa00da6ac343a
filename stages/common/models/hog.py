"""A weight-free video target: MaskFeat's HOG per frame plus a histogram of normal-flow directions.

Why: encoders pretrained for a few CPU minutes on the synthetic set did not beat their random
twins on a linear probe (BENCHMARKS.md), so the alignment experiment had no informative target.
MaskFeat (Wei et al. 2022) predicts HOG from video as a target that needs no weights; we use it
as an extra encoder.

- **HOG**, as MaskFeat's `HOGLayerC` (facebookresearch/SlowFast `slowfast/models/operators.py`):
  Sobel gradients of each RGB channel (reflect padding), unsigned orientation hard-binned into
  `nbins` bins over 180 degrees (phase = atan2(gx, gy)), weighted by the gradient magnitude, summed
  over `cell` x `cell` pixels, L2-normalised over the bins of each channel and cell; channels
  concatenated: 3 * nbins values per cell. No Gaussian window (MaskFeat's default for video is none).
- **Normal flow** (ours: HOG describes one frame, and the synthetic classes differ only in
  motion): brightness constancy I_t + v . grad I = 0 gives the flow component along the gradient,
  -I_t grad I / |grad I|^2. We histogram the direction of m = -I_t grad I (grey level, Sobel / 8,
  I_t the forward difference to the next frame; the last frame repeats the one before) into
  `flow_bins` signed bins over 360 degrees, weighted by |m|, summed per cell, L2-normalised.
  This is the gradient form of the HOF descriptors of Laptev et al. 2008, without a flow solver.

Tokens: one per cell and frame, [B, T, H/cell, W/cell, 3 * nbins + flow_bins] (27 + 9 = 36 by
default: an even width, which int4 targets need). The module is a
diffusers `ModelMixin` so the random twin (the same pipeline with seeded random 3x3 filters in place
of Sobel and random temporal taps in place of the difference: a control of the same shape) is
saved and loaded like every other model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
DIFFERENCE = (1.0, -1.0)  # I_t = next - this


class HogFlow(ModelMixin, ConfigMixin):
    """uint8-free core: frames float [N, T, 3, H, W] in [0, 1] -> tokens [N, T, H/cell, W/cell, D]."""

    @register_to_config
    def __init__(self, nbins: int = 9, cell: int = 8, flow_bins: int = 9, random_seed: int | None = None):
        super().__init__()
        if random_seed is None:
            kx = torch.tensor(SOBEL_X).view(1, 1, 3, 3)
            ky, taps = kx.transpose(2, 3).clone(), torch.tensor(DIFFERENCE)
        else:
            gen = torch.Generator().manual_seed(int(random_seed))
            kx, ky = torch.randn(2, 1, 1, 3, 3, generator=gen)
            taps = torch.randn(2, generator=gen)
        self.register_buffer("kernel_x", kx)
        self.register_buffer("kernel_y", ky)
        self.register_buffer("temporal_taps", taps)

    @property
    def dim(self) -> int:
        return 3 * self.config.nbins + self.config.flow_bins

    def _cells(self, hist: torch.Tensor) -> torch.Tensor:
        """Sum [N, C, H, W] over cell x cell pixels -> [N, C, H/cell, W/cell]."""
        c = self.config.cell
        return F.avg_pool2d(hist, c) * (c * c)

    def _gradients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (gx, gy) of [N, C, H, W], reflect-padded as MaskFeat."""
        channels = x.shape[1]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        gx = F.conv2d(padded, self.kernel_x.to(x.dtype).repeat(channels, 1, 1, 1), groups=channels)
        gy = F.conv2d(padded, self.kernel_y.to(x.dtype).repeat(channels, 1, 1, 1), groups=channels)
        return gx, gy

    def _hog(self, x: torch.Tensor) -> torch.Tensor:
        """MaskFeat's HOG of RGB frames [N, 3, H, W] -> [N, 3 * nbins, H/cell, W/cell]."""
        nbins = self.config.nbins
        gx, gy = self._gradients(x)
        magnitude = torch.sqrt(gx * gx + gy * gy)
        bins = (torch.atan2(gx, gy) / math.pi * nbins).floor().long() % nbins
        n, c, h, w = x.shape
        hist = torch.zeros(n, c, nbins, h, w, dtype=x.dtype, device=x.device)
        hist.scatter_add_(2, bins[:, :, None], magnitude[:, :, None])
        cells = self._cells(hist.flatten(1, 2)).unflatten(1, (c, nbins))
        return F.normalize(cells, dim=2).flatten(1, 2)

    def _normal_flow(self, grey: torch.Tensor) -> torch.Tensor:
        """Direction histogram of -I_t grad I for grey clips [N, T, H, W] -> [N*T, flow_bins, h, w]."""
        nb = self.config.flow_bins
        a, b = self.temporal_taps.to(grey.dtype)
        if grey.shape[1] > 1:
            nxt = torch.cat([grey[:, 1:], grey[:, -1:]], 1)
            cur = torch.cat([grey[:, :-1], grey[:, -2:-1]], 1)
        else:  # a single frame has no motion
            nxt = cur = grey
        it = (a * nxt + b * cur).flatten(0, 1)[:, None]
        gx, gy = self._gradients(cur.flatten(0, 1)[:, None])
        mx, my = it * gx / 8, it * gy / 8  # MaskFeat's Sobel kernel is minus the derivative
        magnitude = torch.sqrt(mx * mx + my * my)
        bins = (torch.atan2(my, mx) / (2 * math.pi) * nb).floor().long() % nb
        hist = torch.zeros(it.shape[0], nb, *it.shape[2:], dtype=grey.dtype, device=grey.device)
        hist.scatter_add_(1, bins, magnitude)
        return F.normalize(self._cells(hist), dim=1)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        n, t, c, h, w = frames.shape
        cell = self.config.cell
        if c != 3 or h % cell or w % cell:
            raise ValueError(
                f"frames must be [N, T, 3, H, W] with H, W multiples of {cell}; got {tuple(frames.shape)}"
            )
        hog = self._hog(frames.flatten(0, 1))
        flow = self._normal_flow(frames.mean(2))
        tokens = torch.cat([hog, flow], 1)  # [N*T, D, h, w]
        return tokens.unflatten(0, (n, t)).permute(0, 1, 3, 4, 2).contiguous()
