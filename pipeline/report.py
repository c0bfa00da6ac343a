"""The demo's report: curves from the runs' logs, sample filmstrips, tables, report.md and a
self-contained HTML copy (the `markdown` package renders it; images are embedded)."""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from pipeline.summary import format_table

EVAL_KEYS = {
    "synth_class_acc": "class accuracy of samples",
    "synth_frechet": "synthetic-domain Fréchet distance",
}


@dataclass
class DemoResult:
    """What the demo produced, as the report shows it (the demo builds it; nothing here runs a stage)."""

    out: Path
    config: Any  # pipeline.demo.DemoConfig
    clips: int
    target_format: str
    fidelity: dict[str, Any]  # encoder -> {"mean", "p1", ...} of the cached targets
    models: dict[str, dict[str, Any]]  # trained tiny model -> recipe summary (objective, sha256, ...)
    logs: dict[str, list[dict[str, Any]]]  # run name -> log rows (read through cache_schema.RunDir)
    samples: dict[str, Path]  # run name -> its `pipeline sample` folder (grid.gif, filmstrip.png, videos.npz)
    scores: dict[str, dict[str, float]]  # run name -> evaluator scores of the final samples
    iicr: dict[str, Any]
    timings: list[tuple[str, float]] = field(default_factory=list)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a top-level key, a `cos_sim` encoder (`cos:NAME`) or an eval metric (`eval:NAME`)."""
    steps, values = [], []
    for row in rows:
        kind, _, name = key.partition(":")
        value = (row.get("cos_sim") or {}).get(name) if kind == "cos" else None
        value = (row.get("eval") or {}).get(name) if kind == "eval" else value
        value = row.get(key) if not name else value
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(int(row["step"]))
            values.append(float(value))
    return steps, values


def _plot(
    path: Path, logs: dict[str, list[dict[str, Any]]], keys: list[str], ylabel: str, log_y=False
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, rows in logs.items():
        for key in keys:
            steps, values = _series(rows, key)
            if steps:
                label = name if len(keys) == 1 else f"{name} {key.partition(':')[2] or key}"
                ax.plot(steps, values, marker="o" if key.startswith("eval") else None, label=label,
                        linestyle="-" if name == "aligned" else "--")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(out: Path, logs: dict[str, list[dict[str, Any]]]) -> dict[str, Path]:
    """PNGs: flow loss, alignment cosine per encoder, and each evaluation metric over training."""
    encoders = sorted({n for rows in logs.values() for r in rows for n in (r.get("cos_sim") or {})})
    paths = {
        "loss": _plot(out / "loss_curves.png", logs, ["flow_loss"], "flow-matching loss", log_y=True),
        "cosine": _plot(
            out / "alignment_cosine.png", logs, [f"cos:{n}" for n in encoders], "cosine to target"
        ),
    }
    for key, label in EVAL_KEYS.items():
        paths[key] = _plot(out / f"eval_{key}.png", logs, [f"eval:{key}"], label)
    return paths


def _fmt(value: Any, digits: int = 4) -> Any:
    """Numbers as a person reads them: ints stay ints, floats get `digits` significant places."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e9:
        return int(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return value


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    _, values = _series(rows, key)
    return values[-1] if values else None


def _tables(r: DemoResult) -> dict[str, tuple[list[str], list[list]]]:
    train_rows = []
    for name, rows in r.logs.items():
        cos = (
            ", ".join(f"{n} {_fmt(v, 3)}" for n, v in (rows[-1].get("cos_sim") or {}).items()) if rows else ""
        )
        train_rows.append([name, _fmt(_last(rows, "step")), _fmt(_last(rows, "flow_loss")),
                           _fmt(_last(rows, "align_loss")), cos or "n/a"])  # fmt: skip
    score_rows = [
        [name, _fmt(s.get("synth_class_acc"), 3), _fmt(s.get("synth_frechet"), 4)]
        for name, s in r.scores.items()
    ]
    model_rows = [[name, m.get("objective", "supervised"), _fmt(m.get("steps")), _fmt(m.get("heldout_acc"), 3),
                   str(m.get("sha256", ""))[:12]] for name, m in r.models.items()]  # fmt: skip
    iicr_rows = [[name, x["dim"], _fmt(x.get("intra"), 3), _fmt(x.get("inter_video"), 3), _fmt(x.get("iicr_video"), 3)]
                 for name, x in r.iicr["encoders"].items()]  # fmt: skip
    fidelity_rows = [
        [n, r.target_format, _fmt(f.get("mean"), 5), _fmt(f.get("p1"), 5)] for n, f in r.fidelity.items()
    ]
    return {
        "train": (["run", "steps", "flow loss", "align loss", "cosine to targets (last)"], train_rows),
        "scores": (["run", "class accuracy of samples", "synthetic-domain Fréchet distance"], score_rows),
        "models": (["model", "objective", "steps", "held-out accuracy", "sha256"], model_rows),
        "iicr": (["encoder", "dim", "intra", "inter (videos)", "IICR (videos)"], iicr_rows),
        "fidelity": (["encoder", "format", "cos mean", "cos p1"], fidelity_rows),
        "time": (["step", "seconds"], [[name, round(sec, 1)] for name, sec in r.timings]),
    }


def _markdown(r: DemoResult, tables: dict[str, tuple[list[str], list[list]]]) -> str:
    c = r.config
    samples = []
    for name, _folder in r.samples.items():
        samples += [f"**{name}** (rows: videos, classes in turn; columns: frames)", "",
                    f"![{name} filmstrip](runs/{name}/samples/filmstrip.png)", "",
                    f"![{name} samples](runs/{name}/samples/grid.gif)", ""]  # fmt: skip
    return "\n".join([
        "# align4gen demo report", "",
        f"Synthetic set: {c.videos} videos of {c.classes} classes (the drifts), {c.background} backgrounds, "
        f"{c.size} x {c.size} px; {r.clips} clips of 8 frames cached in pixel space (exact patchify-8) with the "
        f"alignment targets of {', '.join(c.encoders)} (`pipeline models build`), as {r.target_format} targets. "
        f"Two VideoDiT-{c.model} runs on the same seed and batches, {c.steps} steps each: a baseline and one "
        f"aligned with lambda {c.align_lambda}. Samples use classifier-free guidance {c.cfg}.", "",
        "The evaluator is a small video classifier trained on real synthetic clips: *class accuracy* is the "
        "share of class-conditional samples it assigns to their class, the *synthetic-domain Fréchet "
        "distance* is computed in its feature space. Neither is FVD.", "",
        "## Samples", "", *samples,
        "## Samples scored by the synthetic-domain evaluator", "", _md_table(*tables["scores"]), "",
        "## Evaluation during training", "",
        "![class accuracy](eval_synth_class_acc.png)", "", "![Fréchet distance](eval_synth_frechet.png)", "",
        "## Training", "", _md_table(*tables["train"]), "",
        "![loss curves](loss_curves.png)", "", "![alignment cosine](alignment_cosine.png)", "",
        "## The tiny trained models (built once, cached)", "", _md_table(*tables["models"]), "",
        "## IICR of the cached targets", "",
        "intra: mean cosine between frames of one video; inter: between frames of different videos; "
        "IICR = intra / inter, shown only where inter is clearly positive (README, IICR).", "",
        _md_table(*tables["iicr"]), "",
        "## Cached targets: fidelity to the exact float32 targets", "", _md_table(*tables["fidelity"]), "",
        "## Time per step", "", _md_table(*tables["time"]), "",
    ])  # fmt: skip


def _images(r: DemoResult, plots: dict[str, Path]) -> dict[str, Path]:
    images = {p.name: p for p in plots.values()}
    for name, folder in r.samples.items():
        for file in ("filmstrip.png", "grid.gif"):
            images[f"runs/{name}/samples/{file}"] = folder / file
    return images


def write_report(r: DemoResult) -> dict[str, Any]:
    """report.md + report.html (images embedded) + summary.json; prints the one-screen summary."""
    plots = plot_curves(r.out, r.logs)
    tables = _tables(r)
    md = _markdown(r, tables)
    (r.out / "report.md").write_text(md)
    (r.out / "report.html").write_text(_html(md, _images(r, plots)))
    summary = {
        "out": str(r.out),
        "clips": r.clips,
        "scores": r.scores,
        "eval_series": {
            name: {k: _series(rows, f"eval:{k}") for k in EVAL_KEYS} for name, rows in r.logs.items()
        },
        "final_flow_loss": {name: _last(rows, "flow_loss") for name, rows in r.logs.items()},
        "models": r.models,
        "seconds": dict(r.timings),
    }
    (r.out / "summary.json").write_text(json.dumps(summary, indent=2))
    click.secho("\n== summary ==", bold=True)
    for key in ("scores", "train", "models"):
        click.echo(format_table(*tables[key]))
        click.echo()
    total = sum(s for _, s in r.timings)
    click.echo(f"total {total:.0f}s   report: {r.out / 'report.md'} (and report.html)")
    return summary


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html(md: str, images: dict[str, Path]) -> str:
    """A self-contained HTML copy of the markdown report: rendered by `markdown` (tables extension),
    each local image replaced by a data URI so the file travels alone."""
    import markdown

    body = markdown.markdown(md, extensions=["tables"])

    def embed(match: re.Match) -> str:
        src = match.group(1)
        path = images.get(src)
        if path is None or not path.is_file():
            return match.group(0)
        mime = "image/gif" if src.endswith(".gif") else "image/png"
        return f'src="data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = re.sub(r'src="([^"]+)"', embed, body)
    style = (
        "body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%;image-rendering:pixelated}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>align4gen demo</title><style>{style}</style>"
        f"</head><body>{body}</body></html>"
    )
