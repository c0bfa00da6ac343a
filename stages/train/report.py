"""What a run shows besides checkpoints: log rows, TensorBoard, the loss plot, sample GIF grids."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from cache_schema import RunDir


class RunLogger:
    """Averages step metrics over a log window and writes one row per log step (rank 0)."""

    def __init__(
        self,
        run: RunDir,
        enabled: bool,
        samples_per_step: int,
        start_step: int,
        report_to: str = "tensorboard",
        config: dict[str, Any] | None = None,
    ) -> None:
        from .trackers import NoTracker, make_tracker

        self.run, self.enabled, self.samples_per_step = run, enabled, samples_per_step
        self.tracker = make_tracker(report_to, run, start_step, config or {}) if enabled else NoTracker()
        self.skipped: list[str] = []
        self.skipped_total = 0
        self.sample_keys: list[list[str]] = []  # global micro-batches' keys (loop.SAMPLE_KEYS_ENV)
        self.last_row: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        self.window: dict[str, Any] = {"start": time.perf_counter(), "steps": 0, "cos_steps": 0, "cos": {}}
        for key in ("loss", "flow_loss", "align_loss", "grad_norm"):
            self.window[key] = 0.0

    def restart_clock(self) -> None:
        """Exclude checkpoint or sampling time from the throughput figure."""
        self.window["start"] = time.perf_counter()

    def add(self, metrics: Any, skipped: list[str]) -> None:
        w = self.window
        w["steps"] += 1
        for key in ("loss", "flow_loss", "align_loss", "grad_norm"):
            w[key] += getattr(metrics, key)
        if metrics.cos:
            w["cos_steps"] += 1
            for name, value in metrics.cos.items():
                w["cos"][name] = w["cos"].get(name, 0.0) + value
        self.skipped.extend(skipped)

    def row(
        self, step: int, lr: float, weights: dict[str, float], scores: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """Close the window at `step`: write the row (and the skipped keys, and the evaluation
        `scores` when this step evaluated) and return it."""
        w = self.window
        n = max(1, w["steps"])
        elapsed = max(time.perf_counter() - w["start"], 1e-9)
        self.skipped_total += len(self.skipped)
        row = {
            "step": step,
            "loss": w["loss"] / n,
            "flow_loss": w["flow_loss"] / n,
            "align_loss": w["align_loss"] / n,
            "cos_sim": {k: v / max(1, w["cos_steps"]) for k, v in w["cos"].items()},
            "align_weight": dict(weights),
            "lr": lr,
            "grad_norm": w["grad_norm"] / n,
            "samples_per_s": w["steps"] * self.samples_per_step / elapsed,
            "samples_seen": step * self.samples_per_step,
            "skipped": {"count": self.skipped_total, "keys": list(self.skipped)},
        }
        if scores is not None:
            row["eval"] = dict(scores)
        if self.sample_keys:
            row["sample_keys"], self.sample_keys = self.sample_keys, []
        if self.enabled:
            self.run.append_log(row)
            self.tracker.log(row)
        self.skipped = []
        self.last_row = row
        self.reset()
        return row

    def close(self) -> None:
        self.tracker.close()
        if self.enabled:
            plot_losses(self.run.read_log(), self.run.loss_plot)


def plot_losses(rows: list[dict[str, Any]], out_path: str | Path) -> Path | None:
    """Loss curves (total, flow, alignment) and cosine similarity per encoder; None if no rows."""
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


def write_samples(
    adapter: Any, ema: torch.nn.Module, vae: Any, run: RunDir, step: int, cfg: Any, device, use_bf16: bool
) -> Path:
    """A GIF grid from the EMA weights, made exactly as `pipeline sample --run RUN --checkpoint
    step-XXXXXXX --num N --steps S --seed SEED` makes its grid.gif (same noise, labels, sampler, grid)."""
    from cache_schema.run import step_dir_name
    from stages.common.registry import GIF_FPS, GIF_GRID_MAX
    from stages.common.sampling import generate_latents, write_gif_grid

    was_training = ema.training
    ema.eval()
    try:
        latents, _ = generate_latents(
            adapter,
            ema,
            cfg.num_samples,
            steps=cfg.sample_steps,
            seed=cfg.seed,
            device=device,
            autocast=use_bf16,
        )
    finally:
        ema.train(was_training)
    frames = vae.decode(latents.to(device)).numpy()
    path = run.samples / f"{step_dir_name(step)}.gif"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_gif_grid(path, frames[:GIF_GRID_MAX], GIF_FPS)
    return path
