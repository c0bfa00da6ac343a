"""Stage two, top to bottom: check the cache, claim the run directory, build (or resume) the
state, then loop: batches -> train_step -> log / sample / checkpoint. No encoder code is
imported anywhere on this path.

Alignment follows the REPA family (see align.py): per-encoder weights, a schedule, and an end
step (`align_until`, HASTE) after which the projectors leave the optimizer and the checkpoints
and the loader switches to the latents-only shards.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import cache_schema
from cache_schema import RunDir, prepare_output
from cache_schema.checkpoint import CheckpointError
from cache_schema.formats import basis_tensors
from cache_schema.layout import EncoderEntry, ShardLayout
from cache_schema.outputs import refuse_if_locked
from cache_schema.readers import ShardReader, describe_change, index_summary
from stages.common import runtime
from stages.common.progress import tqdm

from .align import alignment_active, parse_lambdas, schedule_weight
from .compiled import compile_state
from .config import TrainConfig, resume_batch_size, resume_changes, steps_below_resume
from .data import (
    DevicePrefetch,
    LoaderSpec,
    iterate_steps,
    latents_only,
    loader_state,
    resumed_position,
    shard_counts,
    shard_urls,
)
from .evaluation import EvalSettings, PeriodicEval
from .lr import build_lr_scheduler, match_groups, restore_lr_scheduler
from .report import RunLogger, write_samples
from .state import (
    TrainState,
    build_state,
    checkpoint_parts,
    drop_alignment,
    load_state,
    save_state,
    shard_state,
    wrap_ddp,
)
from .step import NonFiniteLoss, StepConfig, prepare_batch, train_step

FSDP_ONE_PROCESS = (
    "--fsdp on one process: nothing to shard, the model trains unsharded "
    "(launch with torchrun --nproc_per_node N to shard it over N ranks)"
)
# Set to 1 to log, in each log.jsonl row, the sample keys of every global micro-batch since the
# last row ("sample_keys"): how the tests check the global order. Costs one gather per step.
SAMPLE_KEYS_ENV = "ALIGN4GEN_LOG_SAMPLE_KEYS"


@dataclass
class RunSetup:
    """What the run was built from: the cache layout, the chosen encoders and their weights."""

    layout: ShardLayout
    encoders: dict[str, EncoderEntry]
    lambdas: dict[str, float]
    resume_from: Path | None
    notes: list[str] = field(default_factory=list)
    shards_index: dict[str, Any] = field(default_factory=dict)  # readers.index_summary at the start
    batch_size: int | None = None  # per rank: a resume on another number of ranks keeps the global batch

    @property
    def aligns(self) -> bool:
        return any(w > 0 for w in self.lambdas.values())


class StopFlag:
    """SIGTERM or a first Ctrl-C: finish the step, checkpoint, exit (0, or 130 for Ctrl-C).
    A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker)
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signal == "SIGINT":
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def check_cache(cfg: TrainConfig) -> RunSetup:
    """The shards' layout and the chosen encoders, refusing a mismatch before building anything."""
    errors = cache_schema.validate_shards(cfg.shards)
    damaged = [e for e in errors if e.startswith("shard ")]  # one shard's size: the loader can skip it
    if cfg.on_corrupt == "skip":
        errors = [e for e in errors if e not in damaged]
    if errors:
        raise cache_schema.CacheError("; ".join(errors))
    requested = {"fingerprint": cfg.expect_fingerprint, "encoders": list(cfg.encoders) or None}
    layout = cache_schema.compatible(cfg.shards, requested)
    encoders = cache_schema.encoder_entries(layout, list(cfg.encoders) or None)
    if cfg.target_norm == "spatial":
        check_raw_tokens(cfg.shards, encoders)
    lambdas = parse_lambdas(cfg.align_lambda, list(encoders))
    run = RunDir(cfg.out)
    resume_from, previous, batch_size = None, {}, None
    if cfg.resuming:
        previous = run.require().read_config()
        recorded = previous.get("expect_fingerprint")
        if recorded and recorded != layout.fingerprint:
            raise cache_schema.CacheMismatch("fingerprint", recorded, layout.fingerprint, cfg.shards)
        changed = resume_changes(previous, replace(cfg, encoders=list(encoders)))
        if changed:
            raise ValueError(
                f"--resume cannot change {changed[0]}: the weights and optimizer state depend on it. "
                "Resume with the run's own settings (omit the flag) or start a new run with another --out"
            )
        batch_size = resume_batch_size(previous, cfg.batch_size, runtime.env_rank()[1])
        resume_from = resume_checkpoint(cfg)
        below = steps_below_resume(cfg.steps, checkpoint_step(resume_from))
        if below:
            raise ValueError(below)
    notes = [
        f"{e}; its samples will be skipped (--on-corrupt skip)" for e in damaged if cfg.on_corrupt == "skip"
    ]
    summary = index_summary(cfg.shards)
    before = previous.get("shards_index")
    if before and before.get("sha256") != summary["sha256"]:
        notes.append(
            f"the shards at {cfg.shards} changed since this run last read them ({describe_change(before, summary)}); "
            "resuming on the new shards, so the batches from here on differ from an uninterrupted run"
        )
        if runtime.env_rank()[0] == 0:
            print(f"warning: {notes[-1]}", file=sys.stderr)
    return RunSetup(layout, encoders, lambdas, resume_from, notes, summary, batch_size)


def hold_shards(cfg: TrainConfig) -> ShardReader:
    """Leave a reader file in the shard folder for as long as this process reads it (so `pack
    --overwrite` refuses, naming this run), after refusing shards a `pack` is writing now."""
    if "://" not in cfg.shards:
        refuse_if_locked(cfg.shards, runtime.job_id())
    return ShardReader(cfg.shards, "pipeline train", run=cfg.out).acquire()


def check_shards_unchanged(cfg: TrainConfig, setup: RunSetup, step: int, run: RunDir) -> None:
    """Stop (before checkpointing `step`) when the shard set changed under this run."""
    now = index_summary(cfg.shards)
    if now["sha256"] != setup.shards_index["sha256"]:
        raise cache_schema.CacheError(
            f"the shard set {cfg.shards} changed while this run was reading it "
            f"({describe_change(setup.shards_index, now)}): its batches would mix the old index and the "
            f"new tars. Stopped before checkpointing step {step}; the last checkpoint is "
            f"{run.latest_checkpoint() or 'none'}. Resume with --resume to continue on the new shards"
        )


def resume_checkpoint(cfg: TrainConfig) -> Path | None:
    """The checkpoint a resume starts from: --resume-from's step folder, else `latest`."""
    run = RunDir(cfg.out)
    if not cfg.resume_from:
        return run.latest_checkpoint()
    folder = run.checkpoints / cfg.resume_from
    if not folder.is_dir():
        kept = ", ".join(p.name for p in run.step_dirs()) or "none"
        raise ValueError(f"resume_from: {folder} does not exist (checkpoints kept: {kept})")
    return folder


def checkpoint_step(folder: Path | None) -> int:
    return int(folder.name.split("-")[-1]) if folder is not None else 0


def check_raw_tokens(shards: str, encoders: dict[str, EncoderEntry]) -> None:
    """--target-norm spatial z-scores the encoders' raw tokens (iREPA): refuse shards that cannot
    rebuild them (packed from a store written before token norms were kept)."""
    from cache_schema.constants import RAW_FROM_NORMS, RAW_IN_VALUES

    lacking = [n for n, e in encoders.items() if e.raw_tokens not in (RAW_FROM_NORMS, RAW_IN_VALUES)]
    if lacking:
        raise cache_schema.CacheError(
            f"--target-norm spatial needs the raw tokens of {', '.join(lacking)}, but {shards} holds only "
            "their L2-normalised tokens (packed from a store written before token norms were kept). "
            "iREPA z-scores raw tokens, and z-scoring normalised ones gives other targets. Re-extract "
            "and pack again, or train with --target-norm token"
        )


def claim_run(cfg: TrainConfig) -> cache_schema.OutputLock:
    """Rank 0: refuse a foreign or finished --out, mark it, and hold its lock while training."""
    run = RunDir(cfg.out)
    if not cfg.resuming:
        prepare_output(cfg.out, "run", inputs={"--shards": cfg.shards})
        if run.latest_checkpoint() is not None:
            raise FileExistsError(
                f"{cfg.out} already holds a run; pass --resume to continue it or pick another --out"
            )
    return cache_schema.OutputLock(cfg.out, "pipeline train", job=runtime.job_id()).acquire()


def _bases(cfg: TrainConfig, setup: RunSetup, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """The shards' PCA bases of the chosen encoders, on the device once (hash-checked)."""
    from cache_schema.bases import shard_bases

    wanted = [n for n, e in setup.encoders.items() if e.pca]
    bases = shard_bases(cfg.shards, setup.layout, wanted) if wanted else {}
    return {name: basis_tensors(basis, device) for name, basis in bases.items()}


def loader_specs(
    cfg: TrainConfig, setup: RunSetup, pin: bool, rank: int = 0, world_size: int = 1
) -> tuple[LoaderSpec, LoaderSpec]:
    """The full stream (targets of the chosen encoders) and its latents-only twin, for `rank`."""
    full = LoaderSpec(
        urls=shard_urls(cfg.shards, setup.layout),
        counts=shard_counts(setup.layout),
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        batches_per_step=cfg.grad_accum,
        encoders=setup.encoders if setup.encoders else {},
        norms=cfg.target_norm == "spatial",
        text=setup.layout.text,
        shuffle_buffer=cfg.shuffle_buffer,
        num_workers=cfg.num_workers,
        pin_memory=pin,
        on_corrupt=cfg.on_corrupt,
        rank=rank,
        world_size=world_size,
    )
    if setup.layout.lean_dir is None:
        return full, replace(full, encoders={})
    lean_dir = f"{cfg.shards.rstrip('/')}/{setup.layout.lean_dir}"
    lean_index = cache_schema.read_shard_layout(lean_dir)
    return full, latents_only(full, shard_urls(lean_dir, lean_index), shard_counts(lean_index))


def run_config(cfg: TrainConfig, setup: RunSetup, state: TrainState, world_size: int = 1) -> dict[str, Any]:
    """RUN/config.yaml: the resolved config plus the shards' VAE spec (what sampling decodes with)
    and the number of ranks `batch_size` is per (their product is the global batch a resume keeps)."""
    resolved = replace(
        cfg,
        encoders=list(setup.encoders),
        align_depth=state.align_depth,
        expect_fingerprint=setup.layout.fingerprint,
        resume=False,
        resume_from=None,
    )
    vae = setup.layout.vae_spec
    extra = {}
    if cfg.base and setup.layout.text is not None:  # what `pipeline sample` needs besides the weights
        extra = {"latent_shape": list(setup.layout.latent_shape), "text_spec": setup.layout.text.to_dict()}
    return {
        **runtime.config_to_dict(resolved),
        "model_family": state.adapter.family,
        "world_size": world_size,
        "vae_spec": vae,
        "shards_index": setup.shards_index,
        **extra,
    }


def _load_vae(cfg: TrainConfig, vae_spec: dict[str, Any], device: torch.device):
    """The autoencoder for sample GIFs (--vae) and evaluation (--vae, else the shards' own VAE)."""
    vae_id = cfg.vae or (vae_spec.get("id") if cfg.eval_every else None)
    if not vae_id or str(vae_id).lower() == "none" or (cfg.sample_every == 0 and cfg.eval_every == 0):
        return None
    from stages.common.models.vae import VAEWrapper

    return VAEWrapper.load(
        vae_id, kind=vae_spec.get("kind", "image"), scale=vae_spec.get("scale"), device=device
    )


def _weights(cfg: TrainConfig, setup: RunSetup, state: TrainState, step: int) -> dict[str, float] | None:
    """This step's per-encoder alignment weights (lambda x schedule), or None: no alignment loss."""
    if state.head is None or not setup.aligns:
        return None
    s = schedule_weight(step, cfg.align_schedule, cfg.align_until, cfg.steps)
    return {name: lam * s for name, lam in setup.lambdas.items()}


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) training; returns a summary. Under torchrun every rank calls this."""
    cfg.validate()
    info = runtime.setup_distributed(cfg.device)
    try:
        return _train(cfg, info, progress)
    finally:
        runtime.teardown_distributed()


def _start(cfg: TrainConfig, setup: RunSetup, info: runtime.DistInfo) -> tuple[TrainState, dict[str, Any]]:
    """A fresh or resumed state, and the saved extras (loader position, RNG) of a resume."""
    start = checkpoint_step(setup.resume_from)
    # a checkpoint of step s holds the head iff alignment ran at step s (it is dropped at the start of
    # the first step after --align-until), so a resume at the final step still loads it
    with_head = alignment_active(max(start, 1), cfg.align_until)
    dims = {n: e.dim for n, e in setup.encoders.items()}
    null_text = _null_text(cfg, setup)
    sharded = cfg.fsdp and info.distributed
    state = build_state(cfg, setup.layout, dims, setup.lambdas, info.device, with_head, null_text, sharded)
    state.lr_scheduler = build_lr_scheduler(state.optimizer, cfg.lr_schedule, cfg.lr_warmup, cfg.steps)
    saved: dict[str, Any] = {}
    if setup.resume_from is not None:
        saved = _load(RunDir(cfg.out), setup.resume_from, state)
        restore_lr_scheduler(state.lr_scheduler, saved.get("lr_scheduler"), state.step, cfg.lr)
        noise = saved.get("rng", {}).get("noise", [])
        if noise:  # every rank's generator is in the same state (step.py draws for the global batch)
            state.gen.set_state(noise[0])
        setup.notes.extend(resume_notes(saved.get("loader", {}), cfg, info))
        torch.set_rng_state(saved["rng"]["torch"])
    if cfg.compile:
        compile_state(state)
    if sharded:  # after the resume: a checkpoint holds full weights, sharded here like fresh ones
        shard_state(state, info.device)
    elif info.distributed:
        wrap_ddp(state, info.device)
    elif cfg.fsdp:
        setup.notes.append(FSDP_ONE_PROCESS)
    return state, saved


def resume_notes(loader: dict[str, Any], cfg: TrainConfig, info: runtime.DistInfo) -> list[str]:
    """What a resume says about its data order: elastic (another number of ranks) or older."""
    if "position" not in loader:
        return [
            "this checkpoint predates the global data order: the batches from here on follow it, not the "
            "order the run read before"
        ]
    before = int(loader.get("world_size", info.world_size))
    if before == info.world_size:
        return []
    return [
        f"resumed on {info.world_size} rank(s) from {before}: the global batch stays {loader['global_batch']} "
        f"({cfg.batch_size} per rank) and the data order continues exactly at sample {loader['position']} "
        f"(epoch {loader['epoch']}); the weights follow an uninterrupted run up to floating-point "
        "reduction order"
    ]


def _null_text(cfg: TrainConfig, setup: RunSetup) -> torch.Tensor | None:
    """The shards' stored empty-prompt embedding (hash-checked): what classifier-free guidance
    dropout gives a fine-tuned text model instead of a sample's caption; None without --base."""
    if not cfg.base or setup.layout.text is None:
        return None
    from .data import empty_prompt

    return empty_prompt(cfg.shards, setup.layout)[0]


def _load(run: RunDir, folder: Path, state: TrainState) -> dict[str, Any]:
    """load_state, or a CheckpointError that names the damaged file and offers the previous one."""
    try:
        return load_state(folder, state)
    except CheckpointError as exc:
        previous = run.previous_checkpoint(folder)
        offer = (
            f"resume from the previous checkpoint with --resume-from {previous.name} (nothing was deleted)"
            if previous is not None
            else "no earlier checkpoint is kept: start a new run with another --out"
        )
        raise CheckpointError(f"{exc}. To continue, {offer}") from None


def _disk_full_message(run: RunDir, exc: OSError) -> str:
    last = run.latest_checkpoint()
    kept = f"the last good checkpoint {last.name} is kept" if last else "no checkpoint was written yet"
    resume = f"Its temporary folder was removed and {kept}: free space, then continue with --resume."
    return runtime.disk_full_message(exc, str(run.checkpoints), resume)


def _checkpoint(
    run: RunDir, cfg: TrainConfig, state: TrainState, info, loader: LoaderSpec, config: dict
) -> None:
    noise = runtime.all_gather_objects(state.gen.get_state())
    extra = {
        "rng": {"noise": noise, "torch": torch.get_rng_state()},
        "loader": loader_state(loader, state.step),
        "config": json.dumps(config),
        "lr_scheduler": state.lr_scheduler.state_dict(),
    }
    parts = checkpoint_parts(state)  # --fsdp: every rank gathers the full weights to rank 0
    if info.is_main:
        full = None
        try:
            run.publish_checkpoint(state.step, lambda folder: save_state(folder, state, extra, parts))
        except OSError as exc:
            if not runtime.is_disk_full(exc):
                raise
            full = exc
        if full is not None:  # raised outside the handler: the message below is the whole story
            raise cache_schema.RunError(_disk_full_message(run, full))
        if cfg.keep_checkpoints:
            run.prune_checkpoints(cfg.keep_checkpoints)
    runtime.barrier()


def _train(cfg: TrainConfig, info: runtime.DistInfo, progress: bool) -> dict[str, Any]:
    run = RunDir(cfg.out)
    setup = check_cache(cfg)
    cfg = replace(cfg, batch_size=setup.batch_size or cfg.batch_size)
    lock = runtime.run_on_main(lambda: claim_run(cfg))
    reader = None
    try:
        reader = hold_shards(cfg)
        state, saved = _start(cfg, setup, info)
        config = run_config(cfg, setup, state, info.world_size)
        if info.is_main:
            run.write_config(config)
            run.truncate_log(state.step)
        return _loop(cfg, setup, state, saved, config, info, progress)
    finally:
        if reader is not None:
            reader.release()
        if lock is not None:
            lock.release()


def step_config(cfg: TrainConfig, setup: RunSetup, info: runtime.DistInfo) -> StepConfig:
    device = info.device
    return StepConfig(
        device=device,
        encoders=setup.encoders,
        bases=_bases(cfg, setup, device),
        frames=setup.layout.grid[0],
        raw_targets=cfg.target_norm == "spatial",
        use_bf16=device.type == "cuda" and cfg.precision == "bf16",
        grad_accum=cfg.grad_accum,
        grad_clip=cfg.grad_clip,
        ema_decay=cfg.ema,
        ema_warmup=cfg.ema_warmup,
        time_schedule=cfg.time_schedule,
        time_mean=cfg.time_mean,
        time_std=cfg.time_std,
        world_size=info.world_size,
        rank=info.rank,
        batch_size=cfg.batch_size,
    )


@dataclass
class Loop:
    """What the loop carries from step to step besides the TrainState."""

    cfg: TrainConfig
    setup: RunSetup
    info: runtime.DistInfo
    run: RunDir
    config: dict[str, Any]
    loader: LoaderSpec
    batches: DevicePrefetch
    step_cfg: StepConfig
    logger: RunLogger
    stop: StopFlag
    vae: Any = None
    evaluate: PeriodicEval | None = None

    def step(self, state: TrainState) -> Any:
        """Run optimizer step state.step + 1 (ending alignment first when its time has come)."""
        cfg, step = self.cfg, state.step + 1
        if state.head is not None and not alignment_active(step, cfg.align_until):
            drop_alignment(state)
            match_groups(state.lr_scheduler, state.optimizer)
        weights = _weights(cfg, self.setup, state, step)
        measure = state.head is not None and self.log_now(step)
        raw = next(self.batches)
        if os.environ.get(SAMPLE_KEYS_ENV) == "1":
            self.logger.sample_keys.extend(global_keys(raw))
        batches = [prepare_batch(b, self.step_cfg, with_targets=weights is not None or measure) for b in raw]
        try:
            metrics = train_step(
                state, batches, self.step_cfg, weights, measure, self.stop.signal is not None
            )
        except NonFiniteLoss as exc:
            last = self.run.latest_checkpoint() if self.info.is_main else None
            raise NonFiniteLoss(
                f"{exc}. The last good checkpoint is {last or 'none (none written yet)'}"
            ) from None
        self.logger.add(metrics, [k for b in raw for k in b["skipped"]])
        return metrics, weights

    def log_now(self, step: int) -> bool:
        due = self.evaluate is not None and self.evaluate.settings.due(step)
        return due or step % self.cfg.log_every == 0 or step == self.cfg.steps

    def after(self, state: TrainState, metrics: Any, weights: dict | None) -> dict | None:
        """Log, sample and checkpoint as scheduled (or when asked to stop); the log row, if any."""
        cfg, step, row = self.cfg, state.step, None
        if self.log_now(step):
            scores = self._evaluate(state, step)
            row = self.logger.row(step, metrics.lr, weights or {}, scores)
        if self.vae is not None and cfg.sample_every and step % cfg.sample_every == 0:
            write_samples(
                state.adapter,
                state.ema,
                self.vae,
                self.run,
                step,
                cfg,
                self.info.device,
                self.step_cfg.use_bf16,
            )
            self.logger.restart_clock()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or metrics.stop_requested:
            runtime.run_on_main(lambda: check_shards_unchanged(cfg, self.setup, step, self.run))
            _checkpoint(self.run, cfg, state, self.info, self.loader, self.config)
            self.logger.restart_clock()
        return row

    def _evaluate(self, state: TrainState, step: int) -> dict[str, float] | None:
        """The evaluation metrics of this step (rank 0, when due), timed out of the throughput."""
        if self.evaluate is None or not self.evaluate.settings.due(step):
            return None
        scores = self.evaluate(state.adapter, state.ema)
        self.logger.restart_clock()
        return scores


def global_keys(raw: list[dict[str, Any]]) -> list[list[str]]:
    """The sample keys of each of this step's global micro-batches: every rank's slice, in rank order."""
    everyone = runtime.all_gather_objects([b["keys"] for b in raw])
    return [[k for rank in everyone for k in rank[m]] for m in range(len(raw))]


def _start_loop(cfg, setup: RunSetup, state: TrainState, saved: dict, config: dict, info) -> Loop:
    run, device = RunDir(cfg.out), info.device
    full, lean = loader_specs(cfg, setup, device.type == "cuda", info.rank, info.world_size)
    problem = resumed_position(saved.get("loader", {}), full, state.step)
    if problem is not None:
        raise cache_schema.RunError(f"{setup.resume_from}: {problem}; resume from another checkpoint")
    batches = DevicePrefetch(iterate_steps(full, state.step, lean=lean, switch_after=cfg.align_until), device)
    logger = RunLogger(run, info.is_main, cfg.batch_size * cfg.grad_accum * info.world_size, state.step,
                       cfg.report_to, config)  # fmt: skip
    vae = _load_vae(cfg, config["vae_spec"], device) if info.is_main else None
    step_cfg = step_config(cfg, setup, info)
    evaluate = None
    if cfg.eval_every and info.is_main:
        settings = EvalSettings(cfg.eval_every, cfg.eval_num, cfg.eval_steps, cfg.eval_cfg, cfg.eval_metric,
                                cfg.eval_evaluator, cfg.eval_real_stats, cfg.eval_detector_weights, cfg.seed,
                                cfg.steps)  # fmt: skip
        evaluate = PeriodicEval(settings, vae, device, step_cfg.use_bf16)
    loop = Loop(cfg, setup, info, run, config, full, batches, step_cfg, logger, StopFlag(), vae, evaluate)
    loop.stop.install()
    return loop


def _loop(cfg, setup: RunSetup, state: TrainState, saved: dict, config: dict, info, progress: bool) -> dict:
    loop = _start_loop(cfg, setup, state, saved, config, info)
    bar = tqdm(
        total=cfg.steps,
        initial=state.step,
        desc="train",
        unit="step",
        disable=not (progress and info.is_main),
    )
    state.model.train()
    try:
        while state.step < cfg.steps:
            metrics, weights = loop.step(state)
            bar.update(1)
            row = loop.after(state, metrics, weights)
            if row is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", align=f"{row['align_loss']:.3f}")
            if metrics.stop_requested:
                if info.is_main:
                    tqdm.write(
                        f"{loop.stop.signal or 'stop'}: checkpoint written at step {state.step}; exiting"
                    )
                break
    finally:
        loop.batches.close()
        bar.close()
        loop.stop.uninstall()
        loop.logger.close()
    return {
        "run_dir": str(loop.run.path),
        "step": state.step,
        "interrupted": loop.stop.signal,
        "checkpoint": str(loop.run.latest_checkpoint()) if info.is_main else None,
        "last_log": loop.logger.last_row,
        "align_depth": state.align_depth,
        "encoders": list(setup.encoders),
        "skipped": loop.logger.skipped_total,
        "notes": setup.notes,
    }
