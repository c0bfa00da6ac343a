"""Stage one, top to bottom: plan clips -> load frozen models -> per block: decode, VAE,
encoders, resample + fuse -> zarr (block-atomic, resumable, rank-split).

Decoding runs in DataLoader worker processes ahead of the models; zarr writes run in a
background thread so they overlap the next block's compute.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from cache_schema import SCHEMA_VERSION, fingerprint
from cache_schema import constants as C
from stages.common import video as V

from .config import ExtractConfig
from .models import (
    ExtractError,
    Models,
    compute_batch,
    load_models,
    measured_bytes_per_clip,
    resolve_device,
    token_grid,
)
from .store import StorePlan, create_store, open_store, read_json, write_json
from .writer import BlockSampler, BlockWriter, keep_items

__all__ = ["ExtractError", "ExtractResult", "compute_batch", "run_extract"]


@dataclass
class ExtractResult:
    out: str
    num_clips: int
    blocks_done: int
    blocks_total: int
    blocks_computed: int
    skipped: list[dict[str, str]]
    invalid_clips: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    dry_run: bool = False
    layout: dict[str, Any] = field(default_factory=dict)


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _init_distributed(device: torch.device) -> bool:
    rank, world = _dist_info()
    if world <= 1 or torch.distributed.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(backend=backend)
    return True


def build_spec(cfg: ExtractConfig, source: V.VideoSource, models: Models, grid: tuple[int, int, int]) -> dict:
    """The fingerprinted description of what the store holds."""
    return {
        "dataset": source.describe(),
        "clips": {
            "frames": cfg.frames,
            "stride": cfg.stride,
            "clips_per_video": cfg.clips_per_video,
            "size": cfg.size,
        },
        "vae": {
            "id": models.vae.model_id,
            "kind": cfg.vae_kind,
            "scale": models.vae.scale,
            "latent_channels": models.vae.latent_channels,
            "spatial_factor": models.vae.spatial_factor,
            "temporal_factor": models.vae.temporal_factor,
        },
        "encoders": [
            {"name": n, "id": e.model_id, "input_size": e.input_size, "dim": e.dim}
            for n, e in models.encoders.items()
        ],
        "grid": list(grid),
        "patch_size": [1, cfg.patch_size, cfg.patch_size],
        "fusion": cfg.fusion,
        "dtype": "float16",
    }


def _encoder_layout(models: Models) -> tuple[list[dict[str, Any]], int]:
    layout, start = [], 0
    for name, enc in models.encoders.items():
        layout.append(
            {"name": name, "id": enc.model_id, "dim": enc.dim, "start": start, "stop": start + enc.dim}
        )
        start += enc.dim
    return layout, start


def _check_finite(latents: np.ndarray, targets: np.ndarray, clips: list[int], plan_refs, source) -> None:
    for row, clip in enumerate(clips):
        if not (np.isfinite(latents[row]).all() and np.isfinite(targets[row]).all()):
            video = source.entries[plan_refs[clip].video_index].path
            raise ExtractError(
                f"non-finite features (NaN/Inf) for clip {clip} of video {video}; "
                "the block was not written: check the video and the model weights/dtype"
            )


def run_extract(cfg: ExtractConfig) -> ExtractResult:
    """Run (or resume, or dry-run) an extraction; returns what was done."""
    unknown = [e for e in cfg.encoders if e not in ("dino", "sam2", "videomae")]
    if unknown:
        raise ExtractError(f"unknown encoder '{unknown[0]}'; choose from dino, sam2, videomae")
    if not cfg.encoders:
        raise ExtractError("--encoders is empty: name at least one of dino, sam2, videomae")
    if cfg.fusion != "concat":
        raise ExtractError(f"fusion '{cfg.fusion}' is not supported; the only fusion is 'concat'")
    if not cfg.data or not cfg.out:
        raise ExtractError("both --data and --out are required")
    device = resolve_device(cfg.device)
    distributed = _init_distributed(device)
    rank, world = _dist_info()
    show = cfg.progress and rank == 0

    spec_clip = V.ClipSpec(
        frames=cfg.frames, stride=cfg.stride, clips_per_video=cfg.clips_per_video, size=cfg.size
    )
    source = V.discover(cfg.data)
    models = load_models(cfg, device)  # before probing: a missing weight fails at once
    refs, skipped, _ = V.plan_clips(source, spec_clip, progress=show)
    if not refs:
        raise ExtractError(
            f"no usable clips in {cfg.data}: {len(skipped)} video(s) skipped "
            f"(e.g. {skipped[0].path}: {skipped[0].reason})"
            if skipped
            else f"no videos found in {cfg.data}"
        )
    latent_shape, grid = token_grid(cfg, models.vae)
    spec = build_spec(cfg, source, models, grid)
    encoders_layout, target_dim = _encoder_layout(models)
    labels = np.array(
        [
            source.entries[r.video_index].label if source.entries[r.video_index].label is not None else -1
            for r in refs
        ],
        dtype=np.int64,
    )
    plan = StorePlan(
        num_clips=len(refs),
        block_size=cfg.block_size,
        latent_shape=latent_shape,
        grid=grid,
        target_dim=target_dim,
        labels=labels,
        video_index=np.array([r.video_index for r in refs], dtype=np.int32),
        start_frame=np.array([r.start_frame for r in refs], dtype=np.int32),
    )
    attrs = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint(spec),
        "spec": spec,
        "grid": list(grid),
        "patch_size": [1, cfg.patch_size, cfg.patch_size],
        "latent_shape": list(latent_shape),
        "encoders": encoders_layout,
        "target_dim": target_dim,
        "class_names": source.class_names,
        "num_clips": plan.num_clips,
        "block_size": plan.block_size,
        "num_blocks": plan.num_blocks,
        "sources": [f[0] for f in spec["dataset"]["files"]],
        "source_root": os.path.abspath(source.root),
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
    }
    skipped_report = [{"path": s.path, "reason": s.reason} for s in skipped]
    result = ExtractResult(
        out=cfg.out,
        num_clips=plan.num_clips,
        blocks_done=0,
        blocks_total=plan.num_blocks,
        blocks_computed=0,
        skipped=skipped_report,
        invalid_clips=[],
        layout={k: attrs[k] for k in ("fingerprint", "grid", "latent_shape", "encoders", "target_dim")},
    )
    if cfg.dry_run:
        result.dry_run = True
        per_clip = measured_bytes_per_clip(cfg, source, refs, spec_clip, models, grid)
        result.timings["bytes_per_clip"] = per_clip
        result.timings["projected_bytes"] = per_clip * plan.num_clips
        return result

    # every rank checks an existing store (so all fail alike); rank 0 alone creates it
    group = open_store(cfg.out)
    stale = group is not None and group.attrs.get("fingerprint") != attrs["fingerprint"]
    if stale and not cfg.overwrite:
        field_name = _first_difference(dict(group.attrs).get("spec", {}), spec)
        raise ExtractError(
            f"{cfg.out} already holds a store made with a different config (field '{field_name}' differs); "
            "pass --overwrite to replace it or choose another --out"
        )
    if rank == 0 and (group is None or stale):
        create_store(cfg.out, plan, attrs, cfg.codec, cfg.codec_level)
    _barrier()
    group = open_store(cfg.out)
    done = group[C.BLOCK_DONE][:]
    mine = [b for b in range(plan.num_blocks) if b % world == rank]
    todo = [(b, *plan.block_range(b)) for b in mine if not done[b]]
    result.blocks_done = int(done.sum())
    timings: dict[str, float] = defaultdict(float)
    t_start = time.perf_counter()
    if todo:
        _run_blocks(cfg, todo, source, refs, spec_clip, models, group, result, timings, rank, world)
    timings["total"] = time.perf_counter() - t_start
    result.timings = dict(timings)
    _barrier()
    if distributed:  # every rank's invalid clips go into the one report
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(world)]
        torch.distributed.all_gather_object(gathered, result.invalid_clips)
        result.invalid_clips = [clip for part in gathered for clip in part]
    result.blocks_done = int(open_store(cfg.out, mode="r")[C.BLOCK_DONE][:].sum())
    if rank == 0:
        _write_report(cfg.out, result)
    if distributed:
        torch.distributed.destroy_process_group()
    return result


def _run_blocks(
    cfg: ExtractConfig,
    todo: list[tuple[int, int, int]],
    source: V.VideoSource,
    refs: list[V.ClipRef],
    spec_clip: V.ClipSpec,
    models: Models,
    group,
    result: ExtractResult,
    timings: dict[str, float],
    rank: int,
    world: int,
) -> None:
    """Decode (workers) -> models -> background writer, for this rank's unfinished blocks."""
    from tqdm import tqdm

    device = resolve_device(cfg.device)
    latent_shape = tuple(group.attrs["latent_shape"])
    grid = tuple(group.attrs["grid"])
    target_dim = int(group.attrs["target_dim"])
    dataset = V.ClipDataset(source, refs, spec_clip)
    loader = DataLoader(
        dataset,
        batch_sampler=BlockSampler(todo, cfg.batch_size),
        num_workers=cfg.num_workers,
        collate_fn=keep_items,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        persistent_workers=False,
    )
    writer = BlockWriter(group, timings)
    writer.start()
    block_of = {start: (b, start, stop) for b, start, stop in todo}
    pending: dict[str, list] = {"lat": [], "tgt": [], "valid": [], "clips": []}
    current: tuple[int, int, int] | None = None
    total = sum(stop - start for _, start, stop in todo)
    bar = tqdm(
        total=total,
        desc=f"extract (rank {rank})" if world > 1 else "extract",
        unit="clip",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    t_wait = time.perf_counter()
    try:
        for items in loader:
            timings["decode_wait"] += time.perf_counter() - t_wait
            first = items[0]["index"]
            if first in block_of:
                current = block_of[first]
            ok = [it for it in items if it["frames"] is not None]
            lat = np.zeros((len(items), *latent_shape), np.float32)
            tgt = np.zeros((len(items), *grid, target_dim), np.float32)
            if ok:
                frames = torch.stack([torch.as_tensor(it["frames"]) for it in ok]).to(
                    device, non_blocking=True
                )
                lat_ok, tgt_ok = compute_batch(frames, models, grid, timings)
                rows = [i for i, it in enumerate(items) if it["frames"] is not None]
                lat[rows], tgt[rows] = lat_ok, tgt_ok
                _check_finite(lat_ok, tgt_ok, [it["index"] for it in ok], refs, source)
            for it in items:
                if it["frames"] is None:
                    video = source.entries[refs[it["index"]].video_index].path
                    result.invalid_clips.append({"clip": it["index"], "path": video, "reason": it["error"]})
            pending["lat"].append(lat)
            pending["tgt"].append(tgt)
            pending["valid"].append(np.array([it["frames"] is not None for it in items], np.uint8))
            pending["clips"].extend(it["index"] for it in items)
            bar.update(len(items))
            assert current is not None
            block, start, stop = current
            if pending["clips"] and pending["clips"][-1] == stop - 1:
                writer.submit(
                    block,
                    start,
                    np.concatenate(pending["lat"]),
                    np.concatenate(pending["tgt"]),
                    np.concatenate(pending["valid"]),
                )
                result.blocks_done += 1
                result.blocks_computed += 1
                pending = {"lat": [], "tgt": [], "valid": [], "clips": []}
            t_wait = time.perf_counter()
    finally:
        bar.close()
        writer.close()  # finished blocks are flushed even when interrupted


def _write_report(out: str, result: ExtractResult) -> None:
    """report.json accumulates over resumed runs: skipped videos and invalid clips are kept."""
    previous = read_json(out, C.REPORT_FILE) or {}
    invalid = {c["clip"]: c for c in previous.get("invalid_clips", [])}
    invalid.update({c["clip"]: c for c in result.invalid_clips})
    result.invalid_clips = [invalid[k] for k in sorted(invalid)]
    runs = previous.get("runs", []) + [{"timings": result.timings, "blocks_done_after": result.blocks_done}]
    write_json(
        out,
        C.REPORT_FILE,
        {
            "num_clips": result.num_clips,
            "blocks_total": result.blocks_total,
            "skipped": result.skipped,
            "invalid_clips": result.invalid_clips,
            "runs": runs,
        },
    )


def _first_difference(old: Any, new: Any, prefix: str = "") -> str:
    """Dotted name of the first field where two spec dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                return f"{prefix}{key}"
            if old[key] != new[key] and not (isinstance(old[key], list) and list(old[key]) == list(new[key])):
                return _first_difference(old[key], new[key], f"{prefix}{key}.")
        return prefix.rstrip(".") or "spec"
    return prefix.rstrip(".") or "spec"
