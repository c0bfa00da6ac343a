"""Benchmark stage one: stage times (decode, VAE, each encoder, write), clips/s, and bytes per
clip + read speed per codec (zstd, blosc+bitshuffle, none) on the same extracted data (the
store's default target format, int8; bench/cache.py compares the formats).

CPU default: the tiny preset on the synthetic set. On a GPU the default is `--preset
random-full`: full-size random-initialised copies of the default VAE and encoders (the real
architectures and costs, meaningless features; no download needed) at the real clip defaults
16 frames x 256 px, stride 3. Giving any weights flag (--vae, --dino-model, ...) switches the
GPU default to `--preset none` (real weights from those flags or the HF cache). `--data DIR`
uses existing videos instead of writing the synthetic set (which needs PyAV).
Prints a table and writes JSON (`--out FILE.json`).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from cache_schema import constants as C
from cache_schema import store_layout
from cache_schema.bases import store_bases
from pipeline.summary import format_table
from stages.common.runtime import resolve_device
from stages.common.synth import make_synthetic
from stages.extract.config import ExtractConfig, preset_values
from stages.extract.models import model_sources
from stages.extract.runner import run_extract
from stages.extract.store import CODEC_NAMES, StorePlan, create_store, write_block


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {gpu}"


def _copy_plan(src: zarr.Group) -> tuple[StorePlan, dict[str, tuple[np.ndarray, np.ndarray | None]]]:
    """The extracted store's plan and its compact target arrays (read once)."""
    layout = store_layout(src)
    targets = {}
    for enc in layout.encoders:
        scales = src[enc.scales_path][:] if enc.scales else None
        targets[enc.name] = (src[enc.values_path][:], scales)
    plan = StorePlan(
        num_clips=layout.num_clips,
        block_size=layout.block_size,
        latent_shape=layout.latent_shape,
        grid=layout.grid,
        encoders=list(layout.encoders),
        labels=src[C.LABELS][:],
        video_index=src[C.VIDEO_INDEX][:],
        start_frame=src[C.START_FRAME][:],
        flip=src[C.FLIP][:],
    )
    return plan, targets


def codec_table(store: str, work: Path, level: int) -> list[dict]:
    """Rewrite the extracted arrays with each codec (the store's own writer); measure bytes per
    clip, write speed and the clip-by-clip read speed pack sees."""
    src = zarr.open_group(store, mode="r")
    attrs = dict(src.attrs)
    plan, targets = _copy_plan(src)
    latents, n = src[C.LATENTS][:], plan.num_clips
    raw = latents.nbytes + sum(v.nbytes + (0 if s is None else s.nbytes) for v, s in targets.values())
    rows = []
    for codec in CODEC_NAMES:
        path = str(work / f"codec-{codec}.zarr")
        group = create_store(path, plan, attrs, codec, level, store_bases(src))
        t0 = time.perf_counter()
        for b in range(plan.num_blocks):
            s, e = plan.block_range(b)
            block = {k: (v[s:e], None if sc is None else sc[s:e]) for k, (v, sc) in targets.items()}
            write_block(group, s, latents[s:e], block, np.ones(e - s, np.uint8))
        write_s = time.perf_counter() - t0
        arrays = [group[C.LATENTS]] + [group[C.values_path(k)] for k in targets]
        arrays += [group[C.scales_path(k)] for k, (_, sc) in targets.items() if sc is not None]
        stored = sum(a.nbytes_stored() for a in arrays)
        t0 = time.perf_counter()
        for i in range(n):  # the access pattern of pack: clip by clip
            for a in arrays:
                a[i]
        read_s = time.perf_counter() - t0
        rows.append(
            {
                "codec": codec if codec != "blosc" else "blosc+bitshuffle",
                "bytes_per_clip": stored / n,
                "ratio": raw / stored,
                "write_clips_per_s": n / write_s,
                "read_clips_per_s": n / read_s,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument(
        "--preset",
        default=None,
        choices=["tiny", "random-full", "none"],
        help="tiny (CPU default) | random-full (GPU default: full-size random models) | none (real weights)",
    )
    ap.add_argument("--vae", default=None, help="VAE hub id or folder (real weights)")
    ap.add_argument("--dino-model", default=None)
    ap.add_argument("--sam2-model", default=None)
    ap.add_argument("--videomae-model", default=None)
    ap.add_argument("--data", default=None, help="existing video folder (class subfolders) to extract")
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--stride", type=int, default=None)
    ap.add_argument("--encoders", default="dino,sam2,videomae")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--level", type=int, default=3)
    args = ap.parse_args()

    weights = {
        k: v
        for k, v in {
            "vae": args.vae,
            "dino_model": args.dino_model,
            "sam2_model": args.sam2_model,
            "videomae_model": args.videomae_model,
        }.items()
        if v
    }
    if args.preset is None:
        on_gpu = resolve_device(args.device).type == "cuda"
        args.preset = ("none" if weights else "random-full") if on_gpu else "tiny"
    preset = None if args.preset == "none" else args.preset
    values = preset_values(preset)
    frames = args.frames or values.get("frames", 16)
    size = args.size or values.get("size", 256)
    stride = args.stride or values.get("stride", 3)
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.data:
            data = Path(args.data)
        else:
            data = work / "videos"
            # each video holds exactly one full clip: (frames - 1) * stride + 1 frames, >= size px
            make_synthetic(
                data,
                videos=args.videos,
                classes=4,
                frames=(frames - 1) * stride + 1,
                size=max(size + size % 2, 64),
                seed=0,
                progress=False,
            )
        cfg = ExtractConfig(
            **{
                **values,
                **weights,
                "data": str(data),
                "out": str(work / "store.zarr"),
                "encoders": encoders,
                "frames": frames,
                "size": size,
                "stride": stride,
                "num_workers": args.num_workers,
                "device": args.device,
                "progress": False,
                **({"batch_size": args.batch_size} if args.batch_size else {}),
            }
        )
        t0 = time.perf_counter()
        sources = model_sources(cfg)  # builds the preset's models once (not part of the timings)
        build_s = time.perf_counter() - t0
        result = run_extract(cfg)
        t = result.timings
        total = t["total"]
        stage_rows = [(k, v, 100 * v / total) for k, v in sorted(t.items()) if k != "total"]
        waiting = t.get("decode_wait", 0.0) + t.get("write_wait", 0.0)
        codecs = codec_table(cfg.out, work, args.level)

    report = {
        "machine": machine(),
        "preset": args.preset,
        "models": {k: v for k, v in sources.items() if k == "vae" or k in encoders},
        "model_build_s": build_s,
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "clip": {"frames": frames, "size": size, "stride": stride},
        "encoders": encoders,
        "clips": result.num_clips,
        "clips_per_s": result.num_clips / total,
        "stage_seconds": {k: v for k, v in t.items()},
        "wait_fraction": waiting / total,
        "codecs": codecs,
    }
    print(f"machine: {report['machine']}")
    print(format_table(["stage", "seconds", "% of wall"], stage_rows))
    print(
        f"clips/s: {report['clips_per_s']:.2f}   time the models waited on decode or write: "
        f"{100 * report['wait_fraction']:.1f}% of wall"
    )
    print(
        format_table(
            ["codec", "bytes/clip", "ratio", "write clips/s", "read clips/s"],
            [
                (
                    c["codec"],
                    round(c["bytes_per_clip"]),
                    c["ratio"],
                    c["write_clips_per_s"],
                    c["read_clips_per_s"],
                )
                for c in codecs
            ],
        )
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
