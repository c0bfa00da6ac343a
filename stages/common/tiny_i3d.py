"""Tiny stand-in detectors for tests, the demo and CPU benchmarks.

`TinyI3D` has the call signature of StyleGAN-V's `i3d_torchscript.pt`
(`model(x [B,3,T,224,224] in [-1,1], rescale, resize, return_features) -> [B, F]`) and is saved
with `torch.jit.script`, so it loads through the same `load_i3d` path as the real file.
"""

from __future__ import annotations

from pathlib import Path

import torch


class TinyI3D(torch.nn.Module):
    """A random-initialised 3D conv + linear head with I3D's TorchScript interface."""

    def __init__(self, features: int = 400) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, kernel_size=(3, 16, 16), stride=(2, 16, 16))
        self.fc = torch.nn.Linear(8, features)

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        if rescale:
            x = x * 2.0 - 1.0
        if resize:
            x = torch.nn.functional.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear")
        h = torch.relu(self.conv(x)).mean(dim=(2, 3, 4))
        out = self.fc(h)
        if not return_features:
            out = torch.softmax(out, dim=1)
        return out


def make_tiny_i3d(path: str | Path, features: int = 400, seed: int = 0) -> Path:
    """Script and save a deterministic TinyI3D to `path` (skipped when it is already there)."""
    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        scripted = torch.jit.script(TinyI3D(features).eval())
    finally:
        torch.random.set_rng_state(generator_state)
    tmp = path.with_suffix(path.suffix + ".tmp")
    scripted.save(str(tmp))
    tmp.replace(path)
    return path
