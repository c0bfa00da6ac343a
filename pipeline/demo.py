"""`pipeline demo`: the whole chain on the built-in synthetic set, then a report.

synth -> extract (tiny dino, sam2, videomae) -> pack -> train with alignment and a baseline
without -> sample both -> FVD against the real clips (tiny I3D stand-in) -> IICR of the cache
-> DIR/report.md + report.html. Each step calls a stage's public function; this module only
orchestrates and writes the report.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from pipeline.summary import format_table


@dataclass
class DemoConfig:
    out: str = "demo-out"
    preset: str = "tiny"
    videos: int = 32
    classes: int = 4
    frames: int = 16  # frames per synthetic video (clips take 8 with the tiny preset)
    size: int = 64
    seed: int = 0
    encoders: list[str] = field(default_factory=lambda: ["dino", "sam2", "videomae"])
    steps: int = 600
    batch_size: int = 8
    align_lambda: float = 0.5
    num_samples: int = 32
    sample_steps: int = 20
    fvd_frames: int = 8
    device: str = "cpu"
    # real default models on a GPU instead of the tiny ones (weights via flags / HF cache)
    vae: str | None = None
    dino_model: str | None = None
    sam2_model: str | None = None
    videomae_model: str | None = None
    detector: str = "i3d"
    detector_weights: str | None = None


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # more data, a bigger model, longer training: minutes on a GPU, far longer on a CPU
    "small": {
        "videos": 256,
        "classes": 8,
        "frames": 32,
        "size": 128,
        "steps": 5000,
        "batch_size": 32,
        "num_samples": 64,
        "sample_steps": 50,
    },
}


class Timer:
    """Collects each step's wall time for the summary."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []

    def step(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                click.secho(f"\n== {name} ==", bold=True)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.steps.append((name, time.perf_counter() - self.t0))
                return False

        return _Ctx()


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage and write the report; returns the summary (also in DIR/summary.json)."""
    from stages.common.synth import make_synthetic
    from stages.evaluate.fvd import EvalConfig, compute_fvd
    from stages.evaluate.iicr import iicr_from_store
    from stages.evaluate.tiny import make_tiny_i3d
    from stages.extract.config import ExtractConfig, preset_values
    from stages.extract.runner import run_extract
    from stages.pack.packer import PackConfig, run_pack
    from stages.sample import run_sample
    from stages.sample.config import SampleConfig
    from stages.train.config import PRESETS as TRAIN_PRESETS
    from stages.train.config import TrainConfig
    from stages.train.loop import train

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    tiny = cfg.preset in ("tiny", "small")

    with timer.step("synthesize videos"):
        data = out / "data"
        if not data.exists():
            make_synthetic(
                data, videos=cfg.videos, classes=cfg.classes, frames=cfg.frames, size=cfg.size, seed=cfg.seed
            )
    with timer.step("extract (VAE + frozen encoders -> zarr)"):
        values = preset_values("tiny") if tiny else {}
        values.update(
            {
                "data": str(data),
                "out": str(out / "cache.zarr"),
                "encoders": list(cfg.encoders),
                "device": cfg.device,
                "size": cfg.size if not tiny else values["size"],
            }
        )
        for key in ("vae", "dino_model", "sam2_model", "videomae_model"):
            if getattr(cfg, key):
                values[key] = getattr(cfg, key)
        extracted = run_extract(ExtractConfig(**values))
    with timer.step("pack (zarr -> WebDataset shards)"):
        run_pack(
            PackConfig(
                cache=str(out / "cache.zarr"),
                out=str(out / "shards"),
                samples_per_shard=8,
                overwrite=True,
                progress=False,
            )
        )
    runs = {"aligned": cfg.align_lambda, "baseline": 0.0}
    summaries = {}
    for name, lam in runs.items():
        with timer.step(f"train {name} (lambda={lam})"):
            train_values = dict(TRAIN_PRESETS["tiny"]) if tiny else {}
            train_values.update(
                {
                    "shards": str(out / "shards"),
                    "out": str(out / "runs" / name),
                    "align_lambda": lam,
                    "steps": cfg.steps,
                    "batch_size": cfg.batch_size,
                    "seed": cfg.seed,
                    "device": cfg.device,
                    "log_every": max(1, cfg.steps // 60),
                    "checkpoint_every": cfg.steps,
                    "sample_every": cfg.steps,
                    "resume": (out / "runs" / name / "checkpoints" / "latest").exists(),
                }
            )
            summaries[name] = train(TrainConfig(**train_values), progress=True)
    for name in runs:
        with timer.step(f"sample {name}"):
            run_sample(
                SampleConfig(
                    run=str(out / "runs" / name),
                    out=str(out / "runs" / name / "samples"),
                    num=cfg.num_samples,
                    steps=cfg.sample_steps,
                    seed=cfg.seed,
                    device=cfg.device,
                    batch_size=8,
                )
            )
    fvd: dict[str, Any] = {}
    with timer.step("evaluate (FVD)"):
        weights = cfg.detector_weights
        if weights is None:
            weights = str(make_tiny_i3d(out / "detectors" / "tiny_i3d.pt"))
        eval_cfg = EvalConfig(
            detector=cfg.detector,
            detector_weights=weights,
            frames=cfg.fvd_frames,
            resolution=cfg.size if not tiny else 64,
            num_videos=cfg.videos,
            batch_size=8,
            device=cfg.device,
            cache_dir=str(out / "fvd-stats"),
            progress=False,
        )
        for name in runs:
            fvd[name] = compute_fvd(data, out / "runs" / name / "samples" / "videos.npz", eval_cfg)
        (out / "metrics.json").write_text(json.dumps(fvd, indent=2, default=str))
    with timer.step("analyze (IICR of the cached targets)"):
        iicr = iicr_from_store(str(out / "cache.zarr"), progress=False)
        (out / "iicr.json").write_text(json.dumps(iicr, indent=2, default=str))
    summary = write_report(out, cfg, extracted, fvd, iicr, timer.steps)
    return summary


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return _flatten_cos([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def _flatten_cos(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """log.jsonl keeps cosine similarity as {"cos_sim": {encoder: value}}; flatten to cos_<encoder>."""
    flat = []
    for row in rows:
        row = dict(row)
        for name, value in (row.pop("cos_sim", None) or {}).items():
            row[f"cos_{name}"] = value
        flat.append(row)
    return flat


def _cos_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        for k in row:
            if k.startswith("cos_") and k not in keys:
                keys.append(k)
    return keys


def plot_curves(out: Path, logs: dict[str, list[dict[str, Any]]]) -> dict[str, Path]:
    """Two PNGs: flow loss of both runs, and alignment cosine similarity per encoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, rows in logs.items():
        steps = [r["step"] for r in rows if "flow_loss" in r]
        ax.plot(steps, [r["flow_loss"] for r in rows if "flow_loss" in r], label=f"{name} flow loss")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths["loss"] = out / "loss_curves.png"
    fig.savefig(paths["loss"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, rows in logs.items():
        for key in _cos_keys(rows):
            ax.plot(
                [r["step"] for r in rows if key in r],
                [r[key] for r in rows if key in r],
                label=f"{name} {key[4:]}",
                linestyle="-" if name == "aligned" else "--",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("cosine similarity to target")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths["cosine"] = out / "alignment_cosine.png"
    fig.savefig(paths["cosine"], dpi=110)
    plt.close(fig)
    return paths


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r and isinstance(r[key], (int, float))]
    return float(values[-1]) if values else None


def write_report(
    out: Path,
    cfg: DemoConfig,
    extracted,
    fvd: dict[str, Any],
    iicr: dict[str, Any],
    steps: list[tuple[str, float]],
) -> dict[str, Any]:
    """report.md + report.html (images embedded) + summary.json; prints the one-screen summary."""
    logs = {name: _read_log(out / "runs" / name / "log.jsonl") for name in ("aligned", "baseline")}
    plots = plot_curves(out, logs)
    grids = {name: out / "runs" / name / "samples" / "grid.gif" for name in logs}

    train_rows = []
    for name, rows in logs.items():
        cos = {k[4:]: _last(rows, k) for k in _cos_keys(rows)}
        train_rows.append(
            [
                name,
                _last(rows, "step"),
                _last(rows, "flow_loss"),
                _last(rows, "align_loss"),
                ", ".join(f"{k} {v:.3f}" for k, v in cos.items() if v is not None) or "n/a",
            ]
        )
    fvd_rows = [
        [name, r["metric"], round(r["value"], 3), r["n_real"], r["n_fake"]] for name, r in fvd.items()
    ]
    iicr_rows = []
    for name, r in iicr["encoders"].items():
        iicr_rows.append(
            [
                name,
                r["dim"],
                _round(r.get("intra")),
                _round(r.get("inter_video")),
                _round(r.get("iicr_video")),
                _round(r.get("iicr_class")),
            ]
        )
    step_rows = [[name, round(seconds, 1)] for name, seconds in steps]
    tables = {
        "train": (["run", "steps", "flow loss", "align loss", "cosine to targets (last)"], train_rows),
        "fvd": (["run", "metric", "value", "n real", "n fake"], fvd_rows),
        "iicr": (["encoder", "dim", "intra", "inter (videos)", "IICR (videos)", "IICR (classes)"], iicr_rows),
        "time": (["step", "seconds"], step_rows),
    }
    md = [
        "# align4gen demo report",
        "",
        f"Synthetic set: {cfg.videos} videos, {cfg.classes} classes; preset `{cfg.preset}`; "
        f"{extracted.num_clips} clips cached with encoders {', '.join(cfg.encoders)}; "
        f"{cfg.steps} training steps per run. Models are tiny and random-initialised, so the numbers "
        "show that every stage runs and how the curves move, not the method's quality.",
        "",
        "## Training",
        "",
        _md_table(*tables["train"]),
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![alignment cosine](alignment_cosine.png)",
        "",
        "## Samples",
        "",
        *[f"**{name}**\n\n![{name} samples](runs/{name}/samples/grid.gif)\n" for name in grids],
        "## FVD (tiny I3D stand-in detector)",
        "",
        _md_table(*tables["fvd"]),
        "",
        "## IICR of the cached targets",
        "",
        "IICR = intra / inter (DESIGN.md section 6): mean cosine similarity between frames of the same "
        "video over that between frames of different videos (or classes). With random tiny encoders the "
        "inter term can sit near zero, where the ratio is unstable; real encoders give positive inter terms.",
        "",
        _md_table(*tables["iicr"]),
        "",
        "## Time per step",
        "",
        _md_table(*tables["time"]),
        "",
    ]
    (out / "report.md").write_text("\n".join(md))
    images = {"loss_curves.png": plots["loss"], "alignment_cosine.png": plots["cosine"]}
    images.update({f"runs/{name}/samples/grid.gif": path for name, path in grids.items()})
    (out / "report.html").write_text(_html(md, images))
    summary = {
        "out": str(out),
        "clips": extracted.num_clips,
        "fvd": {name: r["value"] for name, r in fvd.items()},
        "iicr": {name: r.get("iicr_video") for name, r in iicr["encoders"].items()},
        "final_flow_loss": {name: _last(rows, "flow_loss") for name, rows in logs.items()},
        "seconds": dict(steps),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    click.secho("\n== summary ==", bold=True)
    for key in ("train", "fvd", "iicr"):
        click.echo(format_table(*tables[key]))
        click.echo()
    total = sum(s for _, s in steps)
    click.echo(f"total {total:.0f}s   report: {out / 'report.md'} (and report.html)")
    return summary


def _round(value: Any) -> Any:
    return (
        round(value, 4)
        if isinstance(value, float) and math.isfinite(value)
        else ("n/a" if value is None else value)
    )


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html(md_lines: list[str], images: dict[str, Path]) -> str:
    """A self-contained HTML copy of the markdown report (tables and embedded images)."""
    body: list[str] = []
    table: list[str] = []

    def flush_table() -> None:
        if not table:
            return
        rows = [
            [c.strip() for c in line.strip("|").split("|")] for line in table if not line.startswith("|---")
        ]
        head, rest = rows[0], rows[1:]
        body.append(
            "<table><tr>"
            + "".join(f"<th>{html.escape(c)}</th>" for c in head)
            + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest)
            + "</table>"
        )
        table.clear()

    for block in "\n".join(md_lines).split("\n"):
        line = block.strip()
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            src = src.rstrip(")")
            path = images.get(src)
            if path is not None and path.is_file():
                mime = "image/gif" if src.endswith(".gif") else "image/png"
                data = base64.b64encode(path.read_bytes()).decode()
                body.append(f'<p><img alt="{html.escape(alt)}" src="data:{mime};base64,{data}"></p>')
        elif line:
            text = html.escape(line).replace("**", "")
            body.append(f"<p>{text}</p>")
    flush_table()
    style = (
        "body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>align4gen demo</title><style>{style}</style>"
        f"</head><body>{''.join(body)}</body></html>"
    )
