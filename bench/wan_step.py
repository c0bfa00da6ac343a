"""FLOP-counted cost of a Wan 2.1 fine-tuning step with cached alignment targets, against a step that
runs the encoders and the VAE decode online as CREPA does (SimpleTuner decodes the latents back to
pixels every step for DINOv2 / VideoMAE), and the cache's bytes per clip.

Everything is counted with torch.utils.flop_counter on the meta device (no weights, no memory, no
compute; runs on any CPU in about a minute): the Wan transformer of the real configuration (two
and four blocks, extrapolated exactly to the full depth), REPA's projector per encoder, the Wan VAE
(AutoencoderKLWan of Wan 2.1's configuration) decoding the clip's latents, DINOv2-B and VideoMAE-B
(the full-size configs of stages.common.presets). Clip: 81 x 480 x 832 -> latents 16 x 21 x 60 x
104 -> 21 x 30 x 52 tokens; prompt 512 UMT5 tokens (cached in both variants, as SimpleTuner and
finetrainers cache text embeddings). Full fine-tuning (a LoRA step skips the frozen weights'
gradients, about a third of the transformer's step, and leaves the online extras unchanged).

Online encoder inputs: DINOv2-B on every decoded frame at 224 x 224 (its pretraining size), or at
420 x 728 (its 14-pixel patches then give the token grid 30 x 52 itself); VideoMAE-B on 16-frame
windows at 224 x 224, 5 windows for 80 of the 81 frames. Forward only (no_grad), as CREPA runs them.

    python bench/wan_step.py --out bench/results/wan_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from stages.common.models.wan_sizes import (
    WAN_SIZES,
    wan_bytes_per_clip,
    wan_latent_shape,
    wan_step_tflop,
    wan_token_grid,
)
from stages.common.presets import full_size_config, full_size_model
from stages.common.registry import H100_BF16_PEAK_TFLOPS

FRAMES, HEIGHT, WIDTH = 81, 480, 832
PROJECTOR_WIDTH = 2048  # REPA's projector (stages.train.align.Projector)
VIDEOMAE_WINDOWS = 5  # 16-frame windows over 80 of the 81 frames
VIDEOMAE_OWN_GRID = {"videomae": 8}  # stored at its own time grid: 16 input frames -> 8 tubelets


def _tflop(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def projector_tflop(hidden: int, dim: int, tokens: int) -> float:
    """REPA's MLP projector on every token plus the cosine loss, forward + backward."""
    from stages.train.align import Projector

    with torch.device("meta"):
        proj = Projector(hidden, PROJECTOR_WIDTH, dim)
        h = torch.randn(tokens, hidden, requires_grad=True)
        target = torch.randn(tokens, dim)

    def step():
        torch.nn.functional.cosine_similarity(proj(h), target, dim=-1).mean().backward()

    return _tflop(step)


@torch.no_grad()
def vae_decode_tflop() -> float:
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan()  # diffusers' defaults are Wan 2.1's VAE
        z = torch.randn(1, *wan_latent_shape(FRAMES, HEIGHT, WIDTH))
    return _tflop(lambda: vae.decode(z))


@torch.no_grad()
def encoder_tflop(name: str, pixel_shape: tuple[int, ...]) -> float:
    with torch.device("meta"):
        model = full_size_model(name)
        x = torch.randn(*pixel_shape)
    return _tflop(lambda: model(pixel_values=x))


def encoder_dims() -> dict[str, int]:
    return {n: int(full_size_config(n).hidden_size) for n in ("dino", "videomae")}


def measure() -> dict[str, Any]:
    dims = encoder_dims()
    dino_grid = tuple(14 * n for n in wan_token_grid("Wan2.1-T2V-1.3B", FRAMES, HEIGHT, WIDTH)[1:])
    online = {
        "vae_decode": vae_decode_tflop(),
        "dino_224": encoder_tflop("dino", (FRAMES, 3, 224, 224)),
        f"dino_{dino_grid[0]}x{dino_grid[1]}": encoder_tflop("dino", (FRAMES, 3, *dino_grid)),
        "videomae_224": encoder_tflop("videomae", (VIDEOMAE_WINDOWS, 16, 3, 224, 224)),
    }
    models = {}
    for name, cfg in WAN_SIZES.items():
        grid = wan_token_grid(name, FRAMES, HEIGHT, WIDTH)
        tokens = grid[0] * grid[1] * grid[2]
        hidden = cfg["num_attention_heads"] * 128
        models[name] = {
            "token_grid": grid,
            "transformer_step": wan_step_tflop(name, FRAMES, HEIGHT, WIDTH),
            "projectors": sum(projector_tflop(hidden, d, tokens) for d in dims.values()),
            "bytes_per_clip": {
                fmt: wan_bytes_per_clip(
                    name, FRAMES, HEIGHT, WIDTH, dims, fmt, encoder_frames=VIDEOMAE_OWN_GRID
                )
                for fmt in ("float16", "int8", "int4")
            },
        }
    return {"clip": [FRAMES, HEIGHT, WIDTH], "encoder_dims": dims, "online_tflop": online, "models": models}


def step_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    on = res["online_tflop"]
    dino_grid = next(k for k in on if k.startswith("dino_") and k != "dino_224")
    rows = []
    for name, m in res["models"].items():
        cached = m["transformer_step"] + m["projectors"]
        variants = [("cached targets (ours)", 0.0, 0.0)]
        for label, dino in (
            ("online, DINOv2 at 224", "dino_224"),
            (f"online, DINOv2 at {dino_grid[5:]}", dino_grid),
        ):
            variants.append((label, on["vae_decode"], on[dino] + on["videomae_224"]))
        for label, decode, encoders in variants:
            total = cached + decode + encoders
            rows.append(
                {
                    "model": name,
                    "variant": label,
                    "TFLOP/clip": f"{total:.0f}",
                    "VAE decode": f"{decode:.0f}",
                    "encoders": f"{encoders:.1f}",
                    "vs cached": f"{total / cached:.2f}x",
                }
            )
    return rows


def bytes_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, m in res["models"].items():
        for fmt, b in m["bytes_per_clip"].items():
            rows.append(
                {
                    "model": name,
                    "token grid": "x".join(map(str, m["token_grid"])),
                    "format": fmt,
                    "latents MB": f"{b['latents'] / 1e6:.2f}",
                    "prompt MB (512 tokens)": f"{b['text'] / 1e6:.2f}",
                    "DINOv2-B MB": f"{b['dino'] / 1e6:.2f}",
                    "VideoMAE-B MB (8 x 30 x 52)": f"{b['videomae'] / 1e6:.2f}",
                    "total MB/clip": f"{b['total'] / 1e6:.1f}",
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """A GitHub table (what BENCHMARKS.md shows)."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/wan_step.json"))
    args = ap.parse_args()
    res = measure()
    res["machine"] = platform.platform()
    res["h100_peak_tflops"] = H100_BF16_PEAK_TFLOPS
    print(markdown(step_rows(res)))
    print()
    print(markdown(bytes_rows(res)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
