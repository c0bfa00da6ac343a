"""Benchmark: FVD feature extraction throughput (videos/s) per detector.

Always measures tiny detectors on the CPU (a TorchScript stand-in with I3D's call signature,
and a small VideoMAE-v2 in the original checkpoint layout, both random). On a CUDA machine it
also measures the full-size detectors: VideoMAE-v2 ViT-g/14 (given weights, or random weights
in the original layout: speed does not depend on the values) in fp32 and bf16 autocast, and
I3D when --i3d-weights points at StyleGAN-V's i3d_torchscript.pt.

    python bench/evaluate.py [--out FILE.json] [--videos 16] [--i3d-weights P] [--videomae-weights P]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.common.detectors import Detector, load_detector
from stages.common.tiny_i3d import make_tiny_i3d


def videomae_v2_random_state_dict(
    hidden: int, depth: int, mlp: int, patch: int, tubelet: int = 2, classes: int = 174
) -> dict[str, torch.Tensor]:
    """Random tensors under the original VideoMAE-v2 fine-tuned checkpoint's names and shapes."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd = {"patch_embed.proj.weight": r(hidden, 3, tubelet, patch, patch), "patch_embed.proj.bias": r(hidden)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.weight": 1 + r(hidden),
            p + "norm1.bias": r(hidden),
            p + "attn.qkv.weight": r(3 * hidden, hidden),
            p + "attn.q_bias": r(hidden),
            p + "attn.v_bias": r(hidden),
            p + "attn.proj.weight": r(hidden, hidden),
            p + "attn.proj.bias": r(hidden),
            p + "norm2.weight": 1 + r(hidden),
            p + "norm2.bias": r(hidden),
            p + "mlp.fc1.weight": r(mlp, hidden),
            p + "mlp.fc1.bias": r(mlp),
            p + "mlp.fc2.weight": r(hidden, mlp),
            p + "mlp.fc2.bias": r(hidden),
        }
    sd |= {
        "fc_norm.weight": 1 + r(hidden),
        "fc_norm.bias": r(hidden),
        "head.weight": r(classes, hidden),
        "head.bias": r(classes),
    }
    return sd


def measure(det: Detector, videos: np.ndarray, batch: int, repeats: int = 2) -> dict[str, Any]:
    """Warm up on one batch, then time features() over all videos; best of `repeats`."""
    sync = torch.cuda.synchronize if det.device.type == "cuda" else (lambda: None)
    det.features(videos[:batch])
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(videos), batch):
            det.features(videos[i : i + batch])
        sync()
        best = min(best, time.perf_counter() - t0)
    return {"videos": len(videos), "seconds": best, "videos_per_s": len(videos) / best}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    torch.manual_seed(0)
    tiny_i3d = tmp / "tiny_i3d.pt"
    make_tiny_i3d(tiny_i3d)
    tiny_vmae = tmp / "tiny_videomae_v2.pth"
    torch.save({"module": videomae_v2_random_state_dict(128, 2, 512, 32)}, tiny_vmae)
    cpu_videos = rng.integers(0, 256, (args.cpu_videos, 16, 128, 128, 3), dtype=np.uint8)
    for name, path in (("i3d", tiny_i3d), ("videomae-v2", tiny_vmae)):
        det = load_detector(name, path, "cpu")
        rows.append(
            {
                "detector": name,
                "size": "tiny",
                "device": "cpu",
                "dtype": "float32",
                **measure(det, cpu_videos, 4),
            }
        )

    if not torch.cuda.is_available():
        return rows
    gpu_videos = rng.integers(0, 256, (args.videos, 16, 256, 256, 3), dtype=np.uint8)
    vmae = args.videomae_weights
    if vmae is None:
        vmae = tmp / "vit_g_random_original_layout.pth"
        torch.save(videomae_v2_random_state_dict(1408, 40, 6144, 14), vmae)
    det = load_detector("videomae-v2", vmae, "cuda")
    note = "given weights" if args.videomae_weights else "random ViT-g/14 weights"
    for dtype in (torch.float32, torch.bfloat16):
        det.dtype = dtype
        res = measure(det, gpu_videos, args.batch_size)
        rows.append(
            {
                "detector": "videomae-v2",
                "size": f"ViT-g/14 ({note})",
                "device": "cuda",
                "dtype": str(dtype)[6:],
                **res,
            }
        )
    if args.i3d_weights:
        det = load_detector("i3d", args.i3d_weights, "cuda")
        rows.append(
            {
                "detector": "i3d",
                "size": "full",
                "device": "cuda",
                "dtype": "float32",
                **measure(det, gpu_videos, args.batch_size),
            }
        )
    else:
        rows.append(
            {"detector": "i3d", "size": "full", "device": "cuda", "skipped": "no --i3d-weights given"}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="Write results as JSON here.")
    parser.add_argument("--videos", type=int, default=32, help="Videos per GPU measurement.")
    parser.add_argument("--cpu-videos", type=int, default=8, help="Videos per CPU (tiny) measurement.")
    parser.add_argument("--batch-size", type=int, default=8, help="GPU batch size.")
    parser.add_argument(
        "--i3d-weights", default=None, help="StyleGAN-V i3d_torchscript.pt (full-size I3D on GPU)."
    )
    parser.add_argument(
        "--videomae-weights", default=None, help="vit_g_hybrid_pt_1200e_ssv2_ft.pth (else random ViT-g)."
    )
    args = parser.parse_args()
    rows = run(args)
    head = f"{'detector':<12} {'size':<32} {'device':<6} {'dtype':<9} {'videos/s':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        speed = f"{r['videos_per_s']:.2f}" if "videos_per_s" in r else r.get("skipped", "")
        print(f"{r['detector']:<12} {r['size']:<32} {r['device']:<6} {r.get('dtype', ''):<9} {speed:>10}")
    result = {
        "bench": "evaluate",
        "torch": torch.__version__,
        "host": platform.node(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "frames": 16,
        "input": "uint8 16x128x128 (cpu) / 16x256x256 (gpu), resized to 224 by each detector",
        "results": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
