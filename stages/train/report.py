"""Run outputs besides checkpoints: the loss plot and periodic sample GIF grids."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch


def read_log(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(log_path: str | Path, out_path: str | Path) -> Path | None:
    """Loss curves (total, flow, alignment) and cosine similarity per encoder; None if no log rows."""
    rows = read_log(log_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_cos) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "flow_loss", "align_loss"):
        ax_loss.plot(steps, [r.get(key, math.nan) for r in rows], label=key)
    ax_loss.set_xlabel("step")
    ax_loss.set_title("losses")
    ax_loss.legend()
    names = sorted({n for r in rows for n in (r.get("cos_sim") or {})})
    for name in names:
        ax_cos.plot(steps, [(r.get("cos_sim") or {}).get(name, math.nan) for r in rows], label=name)
    ax_cos.set_xlabel("step")
    ax_cos.set_title("cosine similarity to targets")
    if names:
        ax_cos.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def video_grid(frames: np.ndarray, columns: int | None = None) -> np.ndarray:
    """uint8 [B, T, H, W, 3] -> [T, rows*H, cols*W, 3] tiles (blank tiles fill the last row)."""
    b, t, h, w, c = frames.shape
    cols = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.zeros((t, rows * h, cols * w, c), dtype=np.uint8)
    for i in range(b):
        r, k = divmod(i, cols)
        grid[:, r * h : (r + 1) * h, k * w : (k + 1) * w] = frames[i]
    return grid


def write_gif(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """uint8 [T, H, W, 3] -> looping GIF."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    shape: tuple[int, ...],
    num_samples: int,
    steps: int,
    device: torch.device,
    seed: int,
    autocast: bool,
) -> torch.Tensor:
    """Euler ODE samples from the (EMA) model, classes cycling through the label set; fp32 latents."""
    from stages.common.flow import euler_sample

    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((num_samples, *shape), generator=gen).to(device)
    null = model.config.num_classes
    y = torch.arange(num_samples, device=device) % null if null > 0 else None

    def velocity(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(x, t, labels).float()

    was_training = model.training
    model.eval()
    try:
        return euler_sample(velocity, noise, num_steps=steps, y=y)
    finally:
        model.train(was_training)
