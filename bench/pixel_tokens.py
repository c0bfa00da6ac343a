"""How many tokens per frame can a CPU-minute pixel-space DiT coordinate? (the demo's model choice)

Renders flat-background synthetic clips in memory, patchifies them exactly (patchify-F), trains our
DiT (adapter "videodit") with JiT's clean-sample prediction for a fixed wall-clock budget, samples with Euler
(and optional guidance) and writes a PNG: the first 4 rows real clips, then samples, one row per
video, one column per frame. The demo's choice (one token per 32 x 32 frame) comes from these runs
(BENCHMARKS.md, "Why the demo's model has one token per frame"):

    python bench/pixel_tokens.py --f 8 --patch 2 --hidden 128 --out C64.png             # 16 tokens / frame
    python bench/pixel_tokens.py --f 8 --patch 4 --hidden 192 --out D64.png             # 4 tokens / frame
    python bench/pixel_tokens.py --f 8 --size 32 --patch 4 --hidden 256 --out J32.png   # 1 token / frame
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stages.common.models.adapter import Condition
from stages.common.models.factory import build_adapter
from stages.common.synth import render_video


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--f", type=int, default=8, help="patchify factor")
    p.add_argument("--patch", type=int, default=2, help="DiT patch on the patchified latents")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--videos", type=int, default=64)
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget")
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--time-mean", type=float, default=0.8, help="logit-normal mean of t (JiT's, our orientation)"
    )
    p.add_argument("--cfg", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="pixel_tokens.png")
    return p.parse_args()


def main() -> None:
    a = parse()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    clips = [
        render_video(np.random.default_rng([0, i]), i % 4, a.frames, a.size, "flat") for i in range(a.videos)
    ]
    x = torch.from_numpy(np.stack(clips)).float().permute(0, 4, 1, 2, 3) / 127.5 - 1  # B,3,T,H,W
    b, _, t, h, w = x.shape

    def enc(v: torch.Tensor) -> torch.Tensor:
        y = F.pixel_unshuffle(v.permute(0, 2, 1, 3, 4).reshape(-1, 3, h, w), a.f)
        return y.reshape(len(v), t, -1, h // a.f, w // a.f).permute(0, 2, 1, 3, 4)

    def dec(z: torch.Tensor) -> torch.Tensor:
        y = F.pixel_shuffle(z.permute(0, 2, 1, 3, 4).reshape(-1, z.shape[1], h // a.f, w // a.f), a.f)
        return y.reshape(len(z), t, 3, h, w).permute(0, 2, 1, 3, 4)

    z, y = enc(x), torch.arange(b) % 4
    adapter = build_adapter("videodit", in_channels=z.shape[1], num_frames=t, sample_size=h // a.f,
                            patch_size=a.patch, hidden_size=a.hidden, depth=a.depth, num_heads=a.heads,
                            num_classes=4, prediction="sample")  # fmt: skip
    model = adapter.module
    ema = build_adapter("videodit", **model.config).module
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0)
    start, step = time.time(), 0
    while time.time() - start < a.minutes * 60:
        idx = torch.randint(0, b, (a.bs,))
        x0, eps = z[idx], torch.randn_like(z[idx])
        tt = torch.sigmoid(torch.randn(a.bs) * 0.8 + a.time_mean)
        xt = (1 - tt).view(-1, 1, 1, 1, 1) * x0 + tt.view(-1, 1, 1, 1, 1) * eps
        model.train()
        loss = F.mse_loss(adapter.forward(model, xt, tt, Condition(class_labels=y[idx])).velocity, eps - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(0.999, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - d)
        step += 1
    seconds = time.time() - start
    ema.eval()
    n, grid = 8, torch.linspace(1, 0, 51)
    xs, ys = torch.randn(n, *z.shape[1:], generator=torch.Generator().manual_seed(1)), torch.arange(n) % 4
    with torch.no_grad():
        for i in range(50):
            tc = grid[i].expand(n)
            both = Condition(class_labels=ys).with_null()  # the null class through the drop mask
            vc, vu = adapter.forward(ema, torch.cat([xs, xs]), torch.cat([tc, tc]), both).velocity.chunk(2)
            xs = xs + (grid[i + 1] - grid[i]) * (vu + a.cfg * (vc - vu))
    frames = ((dec(xs).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).numpy()
    real = ((x[:4] + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).numpy()
    rows = [np.concatenate(list(v), axis=1) for v in [*real, *frames]]
    Image.fromarray(np.concatenate(rows, axis=0)).save(a.out)
    tokens = (h // a.f // a.patch) ** 2
    print(
        json.dumps(
            {"tokens_per_frame": tokens, "steps": step, "s_per_step": round(seconds / step, 3), "out": a.out}
        )
    )


if __name__ == "__main__":
    main()
