"""Stage one, top to bottom: plan clips -> load frozen models -> (new store: size check, PCA fit,
fidelity, create) -> per block: decode, VAE, encoders, resample, PCA, quantise -> zarr
(block-atomic, resumable, rank-split).

Decoding runs in DataLoader worker processes ahead of the models; zarr writes run in a
background thread so they overlap the next block's compute. The store is created or reopened
in `open_or_create_store` alone; a block is written by `writer.BlockWriter` alone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr

from cache_schema import (
    CacheError,
    OutputLock,
    canonical_json,
    content_fingerprint,
    fingerprint,
    formats,
    store_layout,
)
from cache_schema import constants as C
from cache_schema.bases import store_bases
from cache_schema.integrity import StoreVerifier, block_rows, open_array
from cache_schema.layout import CacheLayout, EncoderEntry, StoreLayout
from cache_schema.outputs import (
    check_not_overlapping,
    clear_artifact,
    inspect_output,
    prepare_output,
    refuse_if_locked,
)
from cache_schema.text import empty_sha256, to_stored
from stages.common import runtime
from stages.common import video as V

from .budget import BudgetExceeded, SizeTable, check_budget, check_free_disk, size_table
from .config import ExtractConfig
from .derive import derive
from .job import Job, check_finite, decoding, to_device
from .models import ExtractError, compute_batch, encode_batch, load_models, plan_targets, token_grid
from .store import StorePlan, clear_block, create_store, open_store, read_json, write_json
from .writer import BlockBuffer, BlockSampler, BlockWriter

__all__ = ["BudgetExceeded", "ExtractError", "ExtractResult", "compute_batch", "run_extract"]


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
    grid: tuple[int, ...] = ()  # the DiT token grid (T, H, W)
    latent_shape: tuple[int, ...] = ()
    encoders: list[EncoderEntry] = field(default_factory=list)
    fingerprint: str | None = None  # None: a dry run (nothing fitted, no store)
    # per encoder: mean, p1, tokens, clips, held_out, explained_variance (None without PCA)
    fidelity: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)  # fidelity / pca_fit / shared clip counts
    sizes: SizeTable | None = None  # dry run: the measured projections
    redone: list[str] = field(default_factory=list)  # finished blocks that failed their checksums
    verifiable: bool = True  # False: a store written before per-clip checksums existed


def prepare(cfg: ExtractConfig, dist: runtime.DistInfo) -> Job:
    """Load the models (a missing weight or a clip that does not fit the VAE fails here) and plan clips."""
    clip_spec = V.ClipSpec(
        frames=cfg.frames,
        stride=cfg.stride,
        clips_per_video=cfg.clips_per_video,
        size=cfg.hw,
        placement=cfg.clip_placement,
        seed=cfg.seed,
        hflip=cfg.hflip,
    )
    source = V.discover(cfg.data)
    if cfg.base and not source.has_captions:  # before any model loads
        raise ExtractError(
            f"--base {cfg.base} embeds each video's caption, but {cfg.data} has none: give a CSV or "
            "JSONL manifest with a `caption` column (or drop --base)"
        )
    models = load_models(cfg, dist.device)
    refs, skipped, lengths = V.plan_clips(source, clip_spec, progress=cfg.progress and dist.is_main)
    if cfg.base:
        refs, skipped = captioned(source, refs, skipped)
    if not refs:
        raise ExtractError(
            f"no usable clips in {cfg.data}: {len(skipped)} video(s) skipped "
            f"(e.g. {skipped[0].path}: {skipped[0].reason})"
            if skipped
            else f"no videos found in {cfg.data}"
        )
    latent_shape, grid = token_grid(cfg, models.vae)
    plans = plan_targets(cfg, models, grid)
    return Job(cfg, dist, source, clip_spec, refs, skipped, lengths, models, latent_shape, grid, plans)


def captioned(
    source: V.VideoSource, refs: list[V.ClipRef], skipped: list[V.Skipped]
) -> tuple[list[V.ClipRef], list[V.Skipped]]:
    """--base embeds each clip's caption: clips of videos without one are left out and reported
    (report.json `skipped`), like a video that does not decode."""
    missing = sorted({r.video_index for r in refs if not source.entries[r.video_index].caption})
    reason = "no caption (the manifest's caption column is missing or empty); --base needs one per video"
    skipped = skipped + [V.Skipped(source.entries[i].path, reason) for i in missing]
    return [r for r in refs if source.entries[r.video_index].caption], skipped


def build_spec(job: Job) -> dict[str, Any]:
    """The fingerprinted request: what the store holds, independent of how it was computed."""
    cfg, vae = job.cfg, job.models.vae
    return {
        "dataset": job.source.describe(),
        "clips": {
            "frames": cfg.frames,
            "stride": cfg.stride,
            "clips_per_video": cfg.clips_per_video,
            "placement": cfg.clip_placement,
            "seed": cfg.seed,
            "hflip": cfg.hflip,
            "size": V.clip_size_value(cfg.hw),
        },
        "vae": {
            "id": vae.model_id,
            "kind": vae.kind,
            "scale": vae.scale,
            "latent_channels": vae.latent_channels,
            "spatial_factor": vae.spatial_factor,
            "temporal_factor": vae.temporal_factor,
        },
        "encoders": [p.spec(cfg.pca_fit_clips) for p in job.plans],
        "grid": list(job.grid),
        "patch_size": [1, cfg.patch_size, cfg.patch_size],
        "fidelity_clips": cfg.fidelity_clips,
        "seed": cfg.seed,
        **({} if job.text is None else {"text": {**job.text.to_dict(), "captions": captions_sha256(job)}}),
    }


def captions_sha256(job: Job) -> str:
    """What the prompt embeddings depend on besides the text encoder: every video's caption."""
    return fingerprint({"captions": [entry.caption for entry in job.source.entries]})


def store_plan(job: Job) -> StorePlan:
    entries = job.source.entries
    return StorePlan(
        num_clips=job.num_clips,
        block_size=job.cfg.block_size,
        latent_shape=job.latent_shape,
        grid=job.grid,
        encoders=[p.entry() for p in job.plans],
        labels=np.array(
            [-1 if entries[r.video_index].label is None else entries[r.video_index].label for r in job.refs],
            np.int64,
        ),
        video_index=np.array([r.video_index for r in job.refs], np.int32),
        start_frame=np.array([r.start_frame for r in job.refs], np.int32),
        flip=np.array([r.flip for r in job.refs], np.uint8),
        text=job.text,
    )


def store_attrs(job: Job, spec: dict[str, Any], derived: dict[str, Any], plan: StorePlan) -> dict[str, Any]:
    return StoreLayout(
        fingerprint=content_fingerprint(spec, derived),
        spec=spec,
        derived=derived,
        grid=tuple(job.grid),
        patch_size=tuple(spec["patch_size"]),
        latent_shape=tuple(job.latent_shape),
        encoders=tuple(plan.encoders),
        text=plan.text,
        class_names=job.source.class_names,
        num_clips=plan.num_clips,
        block_size=plan.block_size,
        num_blocks=plan.num_blocks,
        sources=[f[0] for f in spec["dataset"]["files"]],
        extra={"source_root": os.path.abspath(job.source.root), "config": runtime.config_to_dict(job.cfg)},
    ).to_attrs()


def check_plan(job: Job, spec: dict[str, Any]) -> bool:
    """Rank 0, writing nothing: False when a store of this spec exists (resume); True when one must
    be created, after refusing another config (unless --overwrite) or a plan that does not fit."""
    cfg = job.cfg
    try:
        group = open_store(cfg.out)
    except ValueError as exc:  # a store of another schema version
        if not cfg.overwrite:
            raise ExtractError(str(exc)) from None
        group = None
    if group is not None:
        try:
            old = store_layout(group, cfg.out).spec
        except CacheError:  # garbled attributes: a store of another config
            old = {}
        if canonical_json(old) == canonical_json(spec):
            try:
                StoreVerifier(group, cfg.out)  # every array's metadata can be read
                return False
            except CacheError as exc:
                if not cfg.overwrite:
                    raise ExtractError(
                        f"{exc}: the store cannot be resumed. Pass --overwrite to extract it again "
                        "(or choose another --out)"
                    ) from None
        if not cfg.overwrite:
            raise ExtractError(
                f"{cfg.out} already holds a store made with a different config (field "
                f"'{_first_difference(old, spec)}' differs); pass --overwrite to replace it or choose another --out"
            )
    table = size_table(job)
    budget = cfg.budget_bytes()
    if budget is not None:
        check_budget(job, table, budget)
    else:
        check_free_disk(job, table, runtime.free_bytes(cfg.out))
    return True


def _create(job: Job, spec: dict[str, Any]) -> dict[str, int]:
    """Rank 0: fit and measure `derived`, then create the store; returns the sample sizes."""
    cfg = job.cfg
    derived, bases, samples = derive(job)
    plan = store_plan(job)
    if job.text is not None:  # the empty prompt (classifier-free guidance dropout), stored once
        embeds, mask = job.models.text.encode([""])
        plan.empty_prompt = (to_stored(embeds[0].numpy(), "the empty prompt's embeddings"), mask[0].numpy())
        derived["text"] = {"empty_sha256": empty_sha256(*plan.empty_prompt)}
    clear_artifact(cfg.out, "store")  # only our own entries (nothing when the folder is new)
    create_store(cfg.out, plan, store_attrs(job, spec, derived, plan), cfg.codec, cfg.codec_level, bases)
    return samples


def open_or_create_store(
    job: Job, result: ExtractResult, spec: dict[str, Any], create: bool
) -> tuple[zarr.Group, dict[str, dict[str, torch.Tensor]]]:
    """The one place the store is created or reopened: (group, PCA bases on the device)."""
    # any failure on rank 0 (NaN, I/O) is raised on every rank alike
    samples = runtime.run_on_main(lambda: _create(job, spec)) if create else None
    group = open_store(job.cfg.out)
    if group is None:
        raise ExtractError(f"{job.cfg.out}: the store rank 0 created cannot be opened here")
    layout = store_layout(group, job.cfg.out)
    result.fingerprint, result.encoders = layout.fingerprint, list(layout.encoders)
    result.fidelity = fidelity_table(layout)
    result.samples = samples or {}
    bases = {n: formats.basis_tensors(b, job.device) for n, b in store_bases(group).items()}
    return group, bases


def fidelity_table(layout: CacheLayout) -> dict[str, dict[str, Any]]:
    """derived -> per encoder {mean, p1, tokens, clips, held_out, explained_variance}."""
    pca = layout.pca_derived
    out = {}
    for name, fid in layout.fidelity.items():
        out[name] = {**fid, "explained_variance": pca.get(name, {}).get("explained_variance_ratio")}
    return out


def run_extract(cfg: ExtractConfig) -> ExtractResult:
    """Run (or resume, or dry-run) an extraction; returns what was done."""
    try:
        cfg.validate()
    except ValueError as exc:
        raise ExtractError(str(exc)) from None
    owns_group = not _initialized()  # torchrun's group is ours to tear down unless a caller made it
    dist = runtime.setup_distributed(cfg.device)
    lock = None
    try:
        runtime.run_on_main(lambda: check_output(cfg))  # refused at once, before any model loads
        job = prepare(cfg, dist)
        result = ExtractResult(
            out=cfg.out,
            num_clips=job.num_clips,
            blocks_done=0,
            blocks_total=-(-job.num_clips // cfg.block_size),
            blocks_computed=0,
            skipped=[{"path": s.path, "reason": s.reason} for s in job.skipped],
            invalid_clips=[],
            grid=tuple(job.grid),
            latent_shape=tuple(job.latent_shape),
            encoders=[p.entry() for p in job.plans],
        )
        if cfg.dry_run:
            result.dry_run = True
            result.sizes = runtime.run_on_main(lambda: _dry_run(job))
            return result
        t_start = time.perf_counter()
        spec = build_spec(job)
        # nothing is written before the models loaded, the plan fits and the store matches
        create = runtime.run_on_main(lambda: check_plan(job, spec), share=True)
        lock = runtime.run_on_main(lambda: claim_output(cfg))
        try:
            group, bases = open_or_create_store(job, result, spec, create)
            _extract_blocks(job, group, bases, result, t_start)
        except OSError as exc:
            if not runtime.is_disk_full(exc):
                raise
            resume = "Finished blocks are kept: free space and rerun the same command to resume."
            raise ExtractError(runtime.disk_full_message(exc, cfg.out, resume)) from None
        return result
    finally:
        if lock is not None:
            lock.release()
        if owns_group and dist.distributed:
            runtime.teardown_distributed()


def check_output(cfg: ExtractConfig) -> None:
    """Rank 0, writing nothing: refuse an --out that holds anything but our store, overlaps
    --data, or is being written by another process."""
    check_not_overlapping(cfg.out, {"--data": cfg.data})
    if inspect_output(cfg.out, "store") == "ours" and "://" not in cfg.out:
        refuse_if_locked(cfg.out, runtime.job_id())


def claim_output(cfg: ExtractConfig) -> OutputLock:
    """Rank 0: mark --out as our store and hold its lock while extracting."""
    prepare_output(cfg.out, "store", inputs={"--data": cfg.data})
    return OutputLock(cfg.out, "pipeline extract", job=runtime.job_id()).acquire()


def _initialized() -> bool:
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized()


def _dry_run(job: Job) -> SizeTable:
    table = size_table(job, with_rates=True)
    budget = job.cfg.budget_bytes()
    if budget is not None:
        check_budget(job, table, budget)
    return table


def _extract_blocks(job: Job, group, bases, result: ExtractResult, t_start: float) -> None:
    """This rank's unfinished (or damaged) blocks, then the merged report (rank 0)."""
    cfg, dist = job.cfg, job.dist
    todo = [(b, *block_rows(b, cfg.block_size, job.num_clips)) for b in _blocks_to_do(job, group, result)]
    if todo:
        _run_blocks(job, todo, group, bases, result)
    job.timings["total"] = time.perf_counter() - t_start
    result.timings = dict(job.timings)
    runtime.barrier()
    # every rank's invalid clips and redone blocks go into the one report
    result.invalid_clips = [c for part in runtime.all_gather_objects(result.invalid_clips) for c in part]
    result.redone = [r for part in runtime.all_gather_objects(result.redone) for r in part]
    result.blocks_done = int(open_store(cfg.out, mode="r")[C.BLOCK_DONE][:].sum())
    if dist.is_main:
        _write_report(cfg.out, result)


def _blocks_to_do(job: Job, group, result: ExtractResult) -> list[int]:
    """This rank's blocks without a marker, plus its marked blocks that fail their checksums
    (a missing or corrupt chunk): their markers are cleared first, so they are redone."""
    cfg, dist = job.cfg, job.dist
    try:
        verifier = StoreVerifier(group, cfg.out)
        marker = open_array(group, C.BLOCK_DONE, cfg.out)
        done = marker[:]
    except CacheError as exc:
        raise ExtractError(
            f"{exc}: the store cannot be resumed. Pass --overwrite to extract it again"
        ) from None
    mine = [b for b in range(len(done)) if b % dist.world_size == dist.rank]
    check = verifier.blocks([b for b in mine if done[b]], workers=min(8, os.cpu_count() or 1))
    result.verifiable = check.verifiable
    for b in sorted(check.bad_blocks):
        marker[b] = 0  # a kill while redoing it leaves it unfinished, not "done" with torn data
        done[b] = 0
        clear_block(group, b, verifier.arrays)
    result.redone = check.problems
    result.blocks_done = int(done.sum())
    return [b for b in mine if not done[b]]


def _run_blocks(job: Job, todo: list[tuple[int, int, int]], group, bases, result: ExtractResult) -> None:
    """Decode (workers) -> models -> compact arrays -> background writer, block by block."""
    from stages.common.progress import tqdm

    cfg = job.cfg
    layout = store_layout(group)
    plan = store_plan(job)
    meta = {
        C.LABELS: plan.labels,
        C.VIDEO_INDEX: plan.video_index,
        C.START_FRAME: plan.start_frame,
        C.FLIP: plan.flip,
    }
    buffers: dict[int, BlockBuffer] = {}
    bounds = {b: (start, stop) for b, start, stop in todo}
    writer = BlockWriter(group, job.timings)
    writer.start()
    bar = tqdm(
        total=sum(stop - start for _, start, stop in todo),
        desc=f"extract (rank {job.dist.rank})" if job.dist.distributed else "extract",
        unit="clip",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    try:
        with decoding(job, BlockSampler(todo, cfg.batch_size).batches) as batches:
            t_wait = time.perf_counter()
            for items in batches:
                job.timings["decode_wait"] = (
                    job.timings.get("decode_wait", 0.0) + time.perf_counter() - t_wait
                )
                block = items[0]["index"] // cfg.block_size
                if block not in buffers:
                    buffers[block] = BlockBuffer(
                        block, *bounds[block], job.latent_shape, job.grid, layout.encoders, meta, layout.text
                    )
                _compute_items(job, items, buffers[block], bases, result)
                bar.update(len(items))
                if buffers[block].count(len(items)):
                    writer.submit(buffers.pop(block))
                    result.blocks_done += 1
                    result.blocks_computed += 1
                t_wait = time.perf_counter()
    finally:
        bar.close()
        writer.close()  # finished blocks are flushed even when interrupted


def _compute_items(job: Job, items: list[dict[str, Any]], buf: BlockBuffer, bases, result) -> None:
    frames = to_device(job, items)
    if frames is not None:
        ok = [it["index"] for it in items if it["frames"] is not None]
        feats = compute_batch(frames, job.models, job.plans, job.grid, job.timings)
        check_finite(job, feats, ok)
        latents, targets, norms = encode_batch(feats, job.plans, bases, job.timings)
        buf.put(ok, latents, targets, norms, job.encode_text(ok) if job.text is not None else None)
    for it in items:
        if it["frames"] is None:
            result.invalid_clips.append(
                {"clip": it["index"], "path": job.video_path(it["index"]), "reason": it["error"]}
            )


def _write_report(out: str, result: ExtractResult) -> None:
    """report.json accumulates over resumed runs: skipped videos, invalid clips and samples are kept."""
    previous = read_json(out, C.REPORT_FILE) or {}
    invalid = {c["clip"]: c for c in previous.get("invalid_clips", [])}
    invalid.update({c["clip"]: c for c in result.invalid_clips})
    result.invalid_clips = [invalid[k] for k in sorted(invalid)]
    result.samples = result.samples or previous.get("samples", {})
    runs = previous.get("runs", []) + [{"timings": result.timings, "blocks_done_after": result.blocks_done}]
    write_json(
        out,
        C.REPORT_FILE,
        {
            "num_clips": result.num_clips,
            "blocks_total": result.blocks_total,
            "skipped": result.skipped,
            "invalid_clips": result.invalid_clips,
            "fidelity": result.fidelity,
            "samples": result.samples,
            "runs": runs,
        },
    )


def _first_difference(old: Any, new: Any, prefix: str = "") -> str:
    """Dotted name of the first field where two spec dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                return f"{prefix}{key}"
            if canonical_json({"v": old[key]}) != canonical_json({"v": new[key]}):
                return _first_difference(old[key], new[key], f"{prefix}{key}.")
        return prefix.rstrip(".") or "spec"
    return prefix.rstrip(".") or "spec"
