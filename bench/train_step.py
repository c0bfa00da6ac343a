"""Benchmark stage two: training steps/s without alignment, with cached targets, and the REPA
way (frozen encoders run on the clip's pixels inside every step), side by side in one run;
plus the shard loader's samples/s per worker against what the trainer consumes.

All three variants share the trainer's own pieces (VideoDiT, AlignmentHead, Trainee, EMA,
AdamW, clipping, one host sync per step) and read latents (and, for `cached`, targets) through
the trainer's WebDataset loader from shards written here with random data of the right shapes.
`online` draws random uint8 pixels on the device for the encoders (video decoding is not
counted, which flatters `online`).

CPU default: the tiny preset (tiny VideoDiT, tiny random-initialised encoders of the real
classes). GPU default: `--preset random-full --model B/2 --frames 16 --size 256`, bf16, with
full-size random-initialised copies of the default encoders (real architectures and costs,
meaningless features; no download). `--preset none` (or any --dino-model/--sam2-model/
--videomae-model flag) uses real weights from those flags or the HF cache.
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

import cache_schema
from pipeline.summary import format_table
from stages.common.dit import build_video_dit, default_align_depth
from stages.pack.packer import clip_sample, shard_index, write_index, write_tar
from stages.train.align import AlignmentHead
from stages.train.data import LoaderSpec, build_loader, iterate_steps, shard_urls
from stages.train.loop import Trainee, update_ema

REAL_IDS = {
    "dino": "facebook/dinov2-base",
    "sam2": "facebook/sam2.1-hiera-base-plus",
    "videomae": "MCG-NJU/videomae-base",
}
SPATIAL_FACTOR = 8  # SD-style image VAE: latents are frames / 1 x size / 8, 4 channels


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {gpu}"


def write_shards(
    root: Path, n: int, latent_shape, grid, encoders: dict[str, int], per_shard: int = 64
) -> Path:
    """Schema-v1 shards of random fp16 latents/targets with the layout the real run would have,
    written by the packer's own tar and index writers."""
    rng = np.random.default_rng(0)
    layout, start = [], 0
    for name, dim in encoders.items():
        layout.append({"name": name, "id": f"bench/{name}", "dim": dim, "start": start, "stop": start + dim})
        start += dim
    spec = {"bench": "train_step", "latent_shape": list(latent_shape), "grid": list(grid), "encoders": layout}

    def samples(lo: int, hi: int):
        for i in range(lo, hi):
            latent = rng.normal(size=latent_shape).astype(np.float16)
            target = rng.normal(size=(*grid, start)).astype(np.float16)
            meta = {"video": f"v{i}", "start_frame": 0, "clip_index": i, "label": i % 10}
            yield clip_sample(i, latent, target, i % 10, meta)

    entries = [
        write_tar(str(root / f"shard-{s // per_shard:06d}.tar"), samples(s, min(n, s + per_shard)))
        for s in range(0, n, per_shard)
    ]
    store_layout = {
        "fingerprint": cache_schema.fingerprint(spec),
        "spec": spec,
        "encoders": layout,
        "grid": list(grid),
        "latent_shape": list(latent_shape),
        "target_dim": start,
        "class_names": [f"c{k}" for k in range(10)],
    }
    write_index(str(root), shard_index(store_layout, entries))
    return root


def load_encoders(args: argparse.Namespace, device: torch.device) -> dict:
    from stages.common.encoders import load_encoder

    names = [e.strip() for e in args.encoders.split(",") if e.strip()]
    if args.preset == "tiny":
        from stages.common.presets import tiny_models

        sources = tiny_models(names=names)
    elif args.preset == "random-full":
        from stages.common.presets import full_size_random_models

        sources = full_size_random_models(names=[n for n in names if not getattr(args, f"{n}_model")])
        sources |= {n: getattr(args, f"{n}_model") for n in names if getattr(args, f"{n}_model")}
    else:
        sources = {n: getattr(args, f"{n}_model") or REAL_IDS[n] for n in names}
    dtype = torch.bfloat16 if device.type == "cuda" else None
    return {n: load_encoder(n, sources[n], device=device, dtype=dtype) for n in names}


@torch.no_grad()
def online_targets(encoders: dict, frames: torch.Tensor, grid) -> torch.Tensor:
    """What REPA-style training does every step: encoders on pixels -> DiT grid -> L2 -> concat."""
    from stages.common.resample import fuse, to_target

    per_encoder = {n: to_target(enc.features(frames).float(), grid) for n, enc in encoders.items()}
    return fuse(per_encoder, list(encoders))[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Variant:
    """One training setup (model, head, EMA, AdamW, its own loader stream), timed in rounds."""

    def __init__(self, variant: str, args, layout: dict, shards: Path, encoders: dict, device: torch.device):
        c, t, h, _ = layout["latent_shape"]
        self.variant, self.args, self.device, self.encoders = variant, args, device, encoders
        self.grid = layout["grid"]
        slices = cache_schema.encoder_slices(layout)
        torch.manual_seed(0)
        dit = dict(in_channels=c, num_frames=t, sample_size=h, num_classes=10)
        self.model = build_video_dit(args.model, gradient_checkpointing=args.checkpointing, **dit).to(device)
        self.lam = 0.0 if variant == "no_align" else 0.5
        head = (
            AlignmentHead(self.model.config.hidden_size, slices, args.projector_dim) if self.lam > 0 else None
        )
        depth = default_align_depth(self.model.config.depth)
        self.trainee = Trainee(self.model, head, depth, self.lam).to(device)
        self.ema = build_video_dit(args.model, **dit).to(device).requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.params = [p for p in self.trainee.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0)
        spec = loader_spec(shards, layout, args, args.num_workers, pin_memory=device.type == "cuda")
        self.batches = iterate_steps(spec, 0)
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.frames_shape = (args.batch_size, args.frames, args.size, args.size, 3)
        self.times: list[float] = []
        self.step(args.warmup)

    def step(self, n: int) -> float:
        """Run n trainer steps; wall seconds."""
        device, use_bf16 = self.device, self.device.type == "cuda"
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            batch = next(self.batches)[0]
            x0 = batch["latent"].to(device, non_blocking=True)
            target = batch["target"].to(device, non_blocking=True)
            if self.variant == "online":
                frames = torch.randint(
                    0, 256, self.frames_shape, dtype=torch.uint8, device=device, generator=self.gen
                )
                target = online_targets(self.encoders, frames, self.grid)
            y = batch["label"].to(device)
            drop = torch.rand(y.shape[0], generator=self.gen, device=device) < 0.1
            t = torch.rand(x0.shape[0], generator=self.gen, device=device)
            eps = torch.randn(x0.shape, generator=self.gen, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, _, _, _ = self.trainee(x0, eps, t, y, drop, target, self.lam > 0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            update_ema(self.ema, self.model, 0.9999)
            loss.item()  # the trainer's one host sync per step
        _sync(device)
        return time.perf_counter() - start

    def result(self) -> dict:
        elapsed = float(np.median(self.times))
        n, b = self.args.steps, self.args.batch_size
        return {
            "steps_per_s": n / elapsed,
            "step_ms": 1000 * elapsed / n,
            "samples_per_s": n * b / elapsed,
            "rounds_steps_per_s": [n / x for x in self.times],
        }


def loader_spec(shards: Path, layout: dict, args, workers: int, pin_memory: bool = False) -> LoaderSpec:
    """The trainer's loader over the bench shards: one endless segment, one batch per step."""
    return LoaderSpec(
        urls=shard_urls(str(shards), layout),
        seed=0,
        batch_size=args.batch_size,
        batches_per_step=1,
        segment_steps=10**9,
        shuffle_buffer=args.shuffle_buffer,
        num_workers=workers,
        pin_memory=pin_memory,
    )


def time_loader(shards: Path, layout: dict, args, workers: int) -> dict:
    """Samples/s the loader alone delivers with `workers` processes (decode + collate, no model)."""
    spec = loader_spec(shards, layout, args, workers)
    it = iter(build_loader(spec, 0))
    for _ in range(max(2, 2 * workers)):  # workers started, buffers filled
        next(it)
    n = args.loader_batches
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    elapsed = time.perf_counter() - start
    rate = n * args.batch_size / elapsed
    return {"workers": workers, "samples_per_s": rate, "samples_per_s_per_worker": rate / max(1, workers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument(
        "--preset",
        default=None,
        choices=["tiny", "random-full", "none"],
        help="tiny (CPU default) | random-full (GPU default: full-size random encoders) | none (real weights)",
    )
    ap.add_argument("--model", default=None, help="VideoDiT size [tiny on CPU, B/2 on GPU]")
    ap.add_argument("--frames", type=int, default=None, help="frames per clip [8 tiny, 16]")
    ap.add_argument("--size", type=int, default=None, help="frame size in pixels [64 tiny, 256]")
    ap.add_argument("--batch-size", type=int, default=None, help="clips per step [4 tiny, 8]")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant and round [20 tiny, 30]")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument(
        "--repeats", type=int, default=3, help="interleaved timing rounds; the median is reported"
    )
    ap.add_argument("--encoders", default="dino,sam2,videomae")
    for name, hub_id in REAL_IDS.items():
        ap.add_argument(f"--{name}-model", default=None, help=f"hub id or folder [{hub_id}]")
    ap.add_argument("--projector-dim", type=int, default=None, help="projector width [64 tiny, 2048]")
    ap.add_argument("--num-workers", type=int, default=2, help="loader workers for the training variants")
    ap.add_argument("--shuffle-buffer", type=int, default=64)
    ap.add_argument("--loader-batches", type=int, default=None, help="batches timed per loader setting")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the DiT")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    weights_given = any(getattr(args, f"{n}_model") for n in REAL_IDS)
    if args.preset is None:
        args.preset = ("none" if weights_given else "random-full") if device.type == "cuda" else "tiny"
    tiny = args.preset == "tiny"
    args.model = args.model or ("tiny" if tiny else "B/2")
    args.frames = args.frames or (8 if tiny else 16)
    args.size = args.size or (64 if tiny else 256)
    args.batch_size = args.batch_size or (4 if tiny else 8)
    args.steps = args.steps or (20 if tiny else 30)
    args.projector_dim = args.projector_dim or (64 if tiny else 2048)
    args.loader_batches = args.loader_batches or (50 if tiny else 100)

    encoders = load_encoders(args, device)
    latent_shape = (4, args.frames, args.size // SPATIAL_FACTOR, args.size // SPATIAL_FACTOR)
    grid = (args.frames, latent_shape[2] // 2, latent_shape[3] // 2)
    dims = {n: enc.dim for n, enc in encoders.items()}

    results: dict = {
        "machine": machine(),
        "device": str(device),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "latent_shape": list(latent_shape),
        "grid": list(grid),
        "encoder_dims": dims,
    }
    with tempfile.TemporaryDirectory() as tmp:
        n = max(2 * args.batch_size * (args.warmup + args.steps), 256)
        shards = write_shards(Path(tmp), n, latent_shape, grid, dims)
        layout = cache_schema.read_layout(str(shards))
        variants = {
            v: Variant(v, args, layout, shards, encoders, device) for v in ("no_align", "cached", "online")
        }
        for r in range(args.repeats):  # interleaved rounds: drift and noise hit every variant alike
            for v in variants.values():
                v.times.append(v.step(args.steps))
            print(f"round {r + 1}/{args.repeats}", flush=True)
        for name, v in variants.items():
            results[name] = v.result()
        if device.type == "cuda":
            results["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del variants
        results["loader"] = [time_loader(shards, layout, args, w) for w in sorted({1, args.num_workers})]
    consumed = results["cached"]["samples_per_s"]
    results["trainer_consumes_samples_per_s"] = consumed
    results["ratios"] = {
        "cached_over_no_align": results["cached"]["steps_per_s"] / results["no_align"]["steps_per_s"],
        "online_over_cached": results["online"]["steps_per_s"] / results["cached"]["steps_per_s"],
    }

    rows = [
        (
            v,
            f"{results[v]['steps_per_s']:.2f}",
            f"{results[v]['step_ms']:.1f}",
            f"{results[v]['samples_per_s']:.1f}",
        )
        for v in ("no_align", "cached", "online")
    ]
    print(
        f"\n{results['machine']}  model {args.model}  clips {args.frames}x{args.size}x{args.size}  batch {args.batch_size}"
    )
    print(format_table(["variant", "steps/s", "ms/step", "samples/s"], rows))
    print(
        f"cached / no_align = {results['ratios']['cached_over_no_align']:.3f}   "
        f"online / cached = {results['ratios']['online_over_cached']:.3f}"
    )
    loader_rows = [
        (r["workers"], f"{r['samples_per_s']:.1f}", f"{r['samples_per_s_per_worker']:.1f}", f"{consumed:.1f}")
        for r in results["loader"]
    ]
    print(format_table(["loader workers", "samples/s", "per worker", "trainer consumes"], loader_rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
