"""Benchmark stage two: the trainer's own step (`stages.train.step`) with targets from each
cache format, against the method's own cost, REPA-style online encoders, and no alignment.

Every variant builds its state with `build_state`, moves batches with `prepare_batch` (transfer,
then dequantisation on the device) and runs `train_step` (forward, backward, clipping, one host
sync, AdamW, EMA). All are timed side by side in interleaved rounds in one process, in a new
seeded order each round (the median round is reported; machines drift, so ratios matter more
than absolute figures):

- `no_align`: lambda 0, no alignment head; the loader reads the latents-only shards.
- `resident`: projectors and loss as in the cached variants, but one dense float32 batch
  (latents, labels, targets) made once on the device and reused: no loader, no transfer, no
  dequantisation. The method's own cost; `cached_X / resident` is what the cache costs on top.
- `cached_<fmt>` (float16, int8, int4): the real loader over v2 shards of that format ->
  prepare_batch -> train_step.
- `online`: the frozen encoders run every step on random uint8 pixels drawn on the device
  (video decoding is not counted, which flatters `online`); latents from the latents-only shards.
- `after_switch`: alignment ended (`drop_alignment`), loader on the latents-only shard set.

Bytes read per step are the tar bytes of the samples consumed, from the shard index
(bytes / samples of the set, times the batch size); the decoded payload per step (latent +
target arrays, as each batch carries them) is reported beside them.
A round starts with up to workers x 4 batches already prefetched, so a slow loader shows only
partly in steps/s: the loader's own samples/s per worker (no model) is measured separately and
set against what each variant consumes.

Shards are written here with the packer's writers (`clip_sample`, `write_tar`, `shard_index`,
`write_index`) from random data of the right shapes: a pool of distinct samples repeated under
different keys (the loader's cost per sample is the same). VideoMAE is stored on its own time
grid when that is coarser than the DiT grid (the extract default `time_grid="native"`).

CPU default: the tiny preset (tiny DiT, tiny random-initialised encoders of the real
classes). GPU default: `--preset random-full --model B/2 --frames 16 --size 256`, bf16, with
full-size random-initialised copies of the default encoders (real architectures and costs,
meaningless features; no download). `--preset none` (or any --dino-model/--sam2-model/
--videomae-model flag) uses real weights from those flags or the HF cache.
Prints tables and writes JSON (`--out FILE.json`).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loader_rate import samples_per_s  # noqa: E402 (bench/ is on sys.path when run as a script)

import cache_schema
from cache_schema import constants as C
from cache_schema import formats
from cache_schema.layout import CacheLayout, EncoderEntry
from pipeline.summary import format_table
from stages.common.registry import ENCODERS as ENCODER_DEFAULTS
from stages.pack.packer import clip_sample, shard_index, write_index, write_tar
from stages.train.config import TrainConfig
from stages.train.data import LoaderSpec, iterate_steps, shard_urls, unpack
from stages.train.state import TrainState, build_state, drop_alignment
from stages.train.step import StepConfig, prepare_batch, train_step

REAL_IDS = {name: d.hub_id for name, d in ENCODER_DEFAULTS.items()}
SPATIAL_FACTOR = 8  # SD-style image VAE: latents are frames / 1 x size / 8, 4 channels
FORMATS = tuple(formats.TARGET_FORMATS)
VARIANTS = ("no_align", "resident", *(f"cached_{f}" for f in FORMATS), "online", "after_switch")
LEAN = "latents-only"  # loader set name of the latents-only twin
LEAN_USERS = ("no_align", "online", "after_switch")  # the variants that read it
LAMBDA = 0.5
NUM_CLASSES = 10


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {gpu}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------- shards


@dataclass
class Shapes:
    """Latent shape, DiT grid, and per encoder (dim, stored time frames T_e)."""

    latent_shape: tuple[int, int, int, int]
    grid: tuple[int, int, int]
    encoders: dict[str, tuple[int, int]]

    def entries(self, fmt: str) -> list[EncoderEntry]:
        """Schema-v2 layout entries of the encoders stored in `fmt` (no PCA)."""
        return [
            EncoderEntry.build(name, dim, fmt, frames, id=f"bench/{name}", input_size=0)
            for name, (dim, frames) in self.encoders.items()
        ]

    def layout(self, fmt: str) -> CacheLayout:
        spec = {"bench": "train_step", "format": fmt, "grid": list(self.grid)}
        derived: dict[str, Any] = {"pca": {}, "fidelity": {}}
        return CacheLayout(
            fingerprint=cache_schema.content_fingerprint(spec, derived),
            spec=spec,
            derived=derived,
            encoders=tuple(self.entries(fmt)),
            grid=self.grid,
            latent_shape=self.latent_shape,
            class_names=[f"c{k}" for k in range(NUM_CLASSES)],
            patch_size=(1, 2, 2),
        )


def synth_pool(shapes: Shapes, size: int, seed: int = 0) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """`size` random (latent fp16, {encoder: float32 tokens [T_e,H,W,D]}) samples; tokens on the DiT
    time grid are L2-normalised, native-grid ones are not (as extraction stores them)."""
    rng = np.random.default_rng(seed)
    _, h, w = shapes.grid
    pool = []
    for _ in range(size):
        latent = rng.standard_normal(shapes.latent_shape, dtype=np.float32).astype(np.float16)
        tokens = {}
        for name, (dim, frames) in shapes.encoders.items():
            x = rng.standard_normal((frames, h, w, dim), dtype=np.float32)
            if frames == shapes.grid[0]:
                x /= np.linalg.norm(x, axis=-1, keepdims=True)
            tokens[name] = x
        pool.append((latent, tokens))
    return pool


def write_shard_set(root: Path, fmt: str, shapes: Shapes, pool: list, n: int, per_shard: int) -> Path:
    """A v2 shard set of `n` samples in format `fmt` (and its latents-only twin), written with the
    packer's own writers; sample i holds pool item i % len(pool)."""
    encoded = []
    for latent, tokens in pool:
        targets = {}
        for name, x in tokens.items():
            values, scales = formats.encode(torch.from_numpy(x), fmt)
            targets[name] = (values.numpy(), None if scales is None else scales.numpy())
        encoded.append((latent, targets))
    (root / C.LATENTS_ONLY_DIR).mkdir(parents=True, exist_ok=True)
    full, lean = [], []
    for s in range(0, n, per_shard):
        rows = range(s, min(n, s + per_shard))
        name = C.SHARD_PATTERN.format(s // per_shard)

        def samples(lean_only: bool, rows=rows):
            for i in rows:
                latent, targets = encoded[i % len(encoded)]
                meta = {"video": f"v{i}", "start_frame": 0, "flip": False, "clip_index": i, "label": i % 10}
                yield clip_sample(i, latent, {} if lean_only else targets, i % NUM_CLASSES, meta)

        full.append(write_tar(str(root / name), samples(False)))
        lean.append(write_tar(str(root / C.LATENTS_ONLY_DIR / name), samples(True)))
    layout, order = shapes.layout(fmt), {"kind": "permutation", "seed": 0}
    write_index(str(root / C.LATENTS_ONLY_DIR), shard_index(layout, lean, order=order, latents_only=True))
    lean_info = {"dir": C.LATENTS_ONLY_DIR, "num_samples": n, "bytes": sum(e["bytes"] for e in lean)}
    write_index(str(root), shard_index(layout, full, order=order, pca_files={}, latents_only=lean_info))
    return root


@dataclass
class ShardSet:
    """One loader input: urls, the encoders it decodes, and tar bytes per sample (from index.json)."""

    urls: list[str]
    encoders: dict[str, EncoderEntry]
    bytes_per_sample: float


def shard_set(path: Path, with_targets: bool) -> ShardSet:
    index = cache_schema.read_shard_layout(path)
    per_sample = sum(s.bytes for s in index.shards) / index.num_samples
    encoders = index.encoder_entries() if with_targets else {}
    return ShardSet(shard_urls(str(path), index), encoders, per_sample)


def loader_spec(data: ShardSet, args: argparse.Namespace, workers: int, pin_memory: bool) -> LoaderSpec:
    """The trainer's loader over a bench shard set: one endless segment, one batch per step."""
    return LoaderSpec(
        urls=data.urls,
        seed=0,
        batch_size=args.batch_size,
        batches_per_step=1,
        segment_steps=10**9,
        encoders=data.encoders,
        shuffle_buffer=args.shuffle_buffer,
        num_workers=workers,
        pin_memory=pin_memory,
    )


# --------------------------------------------------------------------------------- encoders


def load_encoders(args: argparse.Namespace, device: torch.device) -> dict:
    from stages.common.models.encoders import load_encoder

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


def stored_frames(enc: Any, frames: int) -> int:
    """T_e: an encoder's own time grid when coarser than the DiT grid (VideoMAE), else the DiT grid."""
    from stages.common.models.encoders import VideoMAEEncoder

    own = enc.grid(frames)[0] if isinstance(enc, VideoMAEEncoder) else frames
    return own if own < frames else frames


@torch.no_grad()
def online_targets(encoders: dict, frames: torch.Tensor, grid) -> dict[str, torch.Tensor]:
    """What REPA-style training does every step: encoders on pixels -> DiT grid -> L2, per encoder."""
    from stages.common.resample import to_target

    return {n: to_target(enc.features(frames).float(), grid) for n, enc in encoders.items()}


# --------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One training setup (state, step config, data source), timed in rounds."""

    name: str
    state: TrainState
    cfg: StepConfig
    weights: dict[str, float] | None
    batches: Iterator[list[dict[str, Any]]] | None = None  # the loader stream
    resident: dict[str, Any] | None = None  # a device batch reused every step
    encoders: dict | None = None  # online: frozen encoders run every step
    frames_shape: tuple[int, ...] = ()  # online: uint8 pixels [B, F, S, S, 3]
    grid: tuple[int, int, int] = (1, 1, 1)  # online: the DiT grid the targets are resampled to
    bytes_per_sample: float = 0.0  # tar bytes per sample of the shard set read
    times: list[float] = field(default_factory=list)
    decoded_bytes: int = 0
    decoded_steps: int = 0
    wait_s: float = 0.0  # host time blocked on the loader
    prepare_s: float = 0.0  # host time in prepare_batch (on CUDA: launches, not kernel time)

    def next_batch(self) -> dict[str, Any]:
        if self.resident is not None:
            return self.resident
        assert self.batches is not None
        t0 = time.perf_counter()
        raw = next(self.batches)[0]
        t1 = time.perf_counter()
        batch = prepare_batch(raw, self.cfg, with_targets=self.weights is not None and not self.encoders)
        self.wait_s += t1 - t0
        self.prepare_s += time.perf_counter() - t1
        self.decoded_bytes += unpack(raw)[0].nbytes + raw["target_bytes"]
        self.decoded_steps += 1
        if self.encoders:
            gen, dev = self.state.gen, self.cfg.device
            pixels = torch.randint(0, 256, self.frames_shape, dtype=torch.uint8, device=dev, generator=gen)
            batch["targets"] = online_targets(self.encoders, pixels, self.grid)
        return batch

    def run(self, n: int) -> float:
        """n trainer steps; wall seconds (train_step syncs with the host once per step)."""
        _sync(self.cfg.device)
        start = time.perf_counter()
        for _ in range(n):
            train_step(self.state, [self.next_batch()], self.cfg, self.weights)
        _sync(self.cfg.device)
        return time.perf_counter() - start

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()  # type: ignore[attr-defined]

    def result(self, steps: int, batch_size: int) -> dict[str, Any]:
        elapsed = float(np.median(self.times))
        out = {
            "steps_per_s": steps / elapsed,
            "step_ms": 1000 * elapsed / steps,
            "samples_per_s": steps * batch_size / elapsed,
            "rounds_steps_per_s": [steps / x for x in self.times],
            "tar_bytes_per_step": self.bytes_per_sample * batch_size,
        }
        if self.decoded_steps:
            out["decoded_bytes_per_step"] = self.decoded_bytes / self.decoded_steps
            out["loader_wait_ms_per_step"] = 1000 * self.wait_s / self.decoded_steps
            out["prepare_ms_per_step"] = 1000 * self.prepare_s / self.decoded_steps
        return out


def resident_batch(shapes: Shapes, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Dense float32 latents, labels and unit-norm targets on the device, made once."""
    gen = torch.Generator(device=device).manual_seed(1)
    t, h, w = shapes.grid
    targets = {}
    for name, (dim, _) in shapes.encoders.items():
        x = torch.randn(batch_size, t, h, w, dim, generator=gen, device=device)
        targets[name] = x / x.norm(dim=-1, keepdim=True)
    return {
        "x0": torch.randn(batch_size, *shapes.latent_shape, generator=gen, device=device),
        "label": torch.arange(batch_size, device=device) % NUM_CLASSES,
        "targets": targets,
    }


def build_variant(
    name: str, args, shapes: Shapes, sets: dict[str, ShardSet], encoders: dict, device
) -> Variant:
    """State, step config and data source of one variant; runs its warm-up steps."""
    aligned = name not in ("no_align", "after_switch")
    fmt = name.removeprefix("cached_") if name.startswith("cached_") else "int8"
    data = sets[fmt] if name.startswith("cached_") else sets[LEAN]
    layout = shapes.layout(fmt)
    dims = {n: d for n, (d, _) in shapes.encoders.items()}
    train_cfg = TrainConfig(
        model=args.model, projector_dim=args.projector_dim, gradient_checkpointing=args.checkpointing
    )
    state = build_state(
        train_cfg, layout, dims, dict.fromkeys(dims, LAMBDA), device, with_head=name != "no_align"
    )
    if name == "after_switch":
        drop_alignment(state)
    state.model.train()
    cfg = StepConfig(
        device=device,
        encoders=layout.encoder_entries(),
        frames=shapes.grid[0],
        use_bf16=device.type == "cuda",
    )
    v = Variant(name, state, cfg, dict.fromkeys(dims, LAMBDA) if aligned else None)
    if name == "resident":
        v.resident = resident_batch(shapes, args.batch_size, device)
    else:
        spec = loader_spec(data, args, args.num_workers, pin_memory=device.type == "cuda")
        v.batches, v.bytes_per_sample = iterate_steps(spec, 0), data.bytes_per_sample
    if name == "online":
        v.encoders, v.frames_shape = encoders, (args.batch_size, args.frames, args.size, args.size, 3)
        v.grid = shapes.grid
    v.run(args.warmup)
    return v


def time_loader(name: str, data: ShardSet, args, workers: int) -> dict[str, Any]:
    """Samples/s the loader alone delivers with `workers` processes (read, crc32, decode, collate)."""
    rate = samples_per_s(loader_spec(data, args, workers, pin_memory=False), args.loader_batches)
    return {
        "set": name,
        "workers": workers,
        "samples_per_s": rate,
        "samples_per_s_per_worker": rate / workers,
    }


# --------------------------------------------------------------------------------- report


def ratios(res: dict[str, Any]) -> dict[str, float]:
    sps = {k: v["steps_per_s"] for k, v in res["variants"].items()}
    out: dict[str, float] = {}
    for fmt in FORMATS:
        c = sps.get(f"cached_{fmt}")
        if c is None:
            continue
        if "resident" in sps:
            out[f"cached_{fmt}_over_resident"] = c / sps["resident"]
        if "no_align" in sps:
            out[f"cached_{fmt}_over_no_align"] = c / sps["no_align"]
    if "online" in sps and "cached_int8" in sps:
        out["online_over_cached_int8"] = sps["online"] / sps["cached_int8"]
    if "resident" in sps and "no_align" in sps:
        out["resident_over_no_align"] = sps["resident"] / sps["no_align"]
    if "after_switch" in sps:
        if "cached_int8" in sps:
            out["after_switch_over_cached_int8"] = sps["after_switch"] / sps["cached_int8"]
        if "no_align" in sps:
            out["after_switch_over_no_align"] = sps["after_switch"] / sps["no_align"]
    return out


def print_report(res: dict[str, Any], args) -> None:
    print(
        f"\n{res['machine']}  model {args.model}  clips {args.frames}x{args.size}x{args.size}  "
        f"batch {args.batch_size}  {args.steps} steps x {args.repeats} rounds (median)"
    )
    rows = []
    for name, r in res["variants"].items():
        decoded = r.get("decoded_bytes_per_step")
        rows.append(
            (
                name,
                f"{r['steps_per_s']:.2f}",
                f"{r['step_ms']:.1f}",
                f"{r['samples_per_s']:.1f}",
                f"{r['tar_bytes_per_step'] / 1e6:.3f}" if r["tar_bytes_per_step"] else "-",
                f"{decoded / 1e6:.3f}" if decoded is not None else "-",
                f"{r['loader_wait_ms_per_step']:.2f}" if decoded is not None else "-",
                f"{r['prepare_ms_per_step']:.2f}" if decoded is not None else "-",
            )
        )
    headers = [
        "variant",
        "steps/s",
        "ms/step",
        "samples/s",
        "MB read/step (tar)",
        "MB decoded/step",
        "loader wait ms",
        "prepare_batch ms",
    ]
    print(format_table(headers, rows))
    goals = {k: (v, ">= 0.97") for k, v in res["ratios"].items() if k.endswith("_over_resident")}
    print(
        format_table(
            ["ratio", "value", "goal"],
            [(k, f"{v:.3f}", goals.get(k, (v, ""))[1]) for k, v in res["ratios"].items()],
        )
    )
    consumes = {v: r["samples_per_s"] for v, r in res["variants"].items()}
    loader_rows = []
    for r in res["loader"]:
        users = LEAN_USERS if r["set"] == LEAN else (f"cached_{r['set']}",)
        need = max((consumes[v] for v in users if v in consumes), default=0.0)
        loader_rows.append(
            (
                r["set"],
                r["workers"],
                f"{r['samples_per_s']:.1f}",
                f"{r['samples_per_s_per_worker']:.1f}",
                f"{need:.1f}",
                f"{need / r['samples_per_s_per_worker']:.2f}" if need else "-",
            )
        )
    print(
        format_table(
            ["loader set", "workers", "samples/s", "per worker", "trainer consumes", "workers needed"],
            loader_rows,
        )
    )


# --------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument(
        "--preset",
        default=None,
        choices=["tiny", "random-full", "none"],
        help="tiny (CPU default) | random-full (GPU default: full-size random encoders) | none (real weights)",
    )
    ap.add_argument("--model", default=None, help="model size [tiny on CPU, B/2 on GPU]")
    ap.add_argument("--frames", type=int, default=None, help="frames per clip [8 tiny, 16]")
    ap.add_argument("--size", type=int, default=None, help="frame size in pixels [64 tiny, 256]")
    ap.add_argument("--batch-size", type=int, default=None, help="clips per step [4 tiny, 8]")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant and round [40 tiny, 30]")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved timing rounds, the median is reported [5 tiny, 3]",
    )
    ap.add_argument(
        "--settle", type=float, default=0.2, help="seconds of pause before each timed run (loader refill)"
    )
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--encoders", default="dino,sam2,videomae")
    for name, hub_id in REAL_IDS.items():
        ap.add_argument(f"--{name}-model", default=None, help=f"hub id or folder [{hub_id}]")
    ap.add_argument("--projector-dim", type=int, default=None, help="projector width [64 tiny, 2048]")
    ap.add_argument("--num-workers", type=int, default=2, help="loader workers for the training variants")
    ap.add_argument("--shuffle-buffer", type=int, default=64)
    ap.add_argument("--samples", type=int, default=64, help="samples per shard set (a pool of 8 repeated)")
    ap.add_argument("--loader-batches", type=int, default=None, help="batches timed per loader setting")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the DiT")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the trainer [torch's default]; 1 keeps a "
        "small shared CPU from oversubscribing (trainer threads + loader workers)",
    )
    args = ap.parse_args()
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def resolve(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
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
    args.steps = args.steps or (40 if tiny else 30)
    args.repeats = args.repeats or (5 if tiny else 3)
    args.projector_dim = args.projector_dim or (64 if tiny else 2048)
    args.loader_batches = args.loader_batches or (50 if tiny else 100)
    return device


def main() -> None:
    args = parse_args()
    device = resolve(args)
    wanted = [v for v in VARIANTS if v in args.variants.split(",")]
    encoders = load_encoders(args, device)
    latent_shape = (4, args.frames, args.size // SPATIAL_FACTOR, args.size // SPATIAL_FACTOR)
    grid = (args.frames, latent_shape[2] // 2, latent_shape[3] // 2)
    shapes = Shapes(
        latent_shape, grid, {n: (e.dim, stored_frames(e, args.frames)) for n, e in encoders.items()}
    )
    res: dict[str, Any] = {
        "machine": machine(),
        "device": str(device),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "latent_shape": list(latent_shape),
        "grid": list(grid),
        "encoders": {n: {"dim": d, "time_frames": t} for n, (d, t) in shapes.encoders.items()},
        "bytes_per_step_source": "tar bytes per sample from index.json (shards' bytes / samples) x batch size; "
        "decoded = latent + target array bytes of each consumed batch (as each batch carries them)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        pool = synth_pool(shapes, min(8, args.samples))
        t0 = time.perf_counter()
        for fmt in FORMATS:
            write_shard_set(Path(tmp) / fmt, fmt, shapes, pool, args.samples, per_shard=16)
        res["shard_write_s"] = time.perf_counter() - t0
        sets = {fmt: shard_set(Path(tmp) / fmt, True) for fmt in FORMATS}
        sets[LEAN] = shard_set(Path(tmp) / "int8" / C.LATENTS_ONLY_DIR, False)
        res["sets"] = {k: {"tar_bytes_per_sample": s.bytes_per_sample} for k, s in sets.items()}
        variants = [build_variant(v, args, shapes, sets, encoders, device) for v in wanted]
        order = random.Random(0)
        for r in range(args.repeats):  # interleaved rounds: drift and noise hit every variant alike;
            for v in order.sample(variants, len(variants)):  # a new order each round (seeded)
                time.sleep(args.settle)  # the previous variant's loader workers finish refilling
                v.times.append(v.run(args.steps))
            print(f"round {r + 1}/{args.repeats}", flush=True)
        res["variants"] = {v.name: v.result(args.steps, args.batch_size) for v in variants}
        if device.type == "cuda":
            res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        for v in variants:
            v.close()
        del variants
        workers = sorted({1, args.num_workers})
        res["loader"] = [time_loader(k, s, args, w) for k, s in sets.items() for w in workers]
    res["ratios"] = ratios(res)
    print_report(res, args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
