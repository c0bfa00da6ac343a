"""The demo's report: curves from the runs' logs, tables, report.md and a self-contained HTML copy."""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from pipeline.summary import format_table


@dataclass
class DemoResult:
    """What the demo produced, as the report shows it (the demo builds it; nothing here runs a stage)."""

    out: Path
    preset: str
    videos: int
    classes: int
    steps: int
    encoders: list[str]
    clips: int
    target_format: str
    fidelity: dict[str, Any]  # encoder -> {"mean", "p1", ...} of the cached targets
    logs: dict[str, list[dict[str, Any]]]  # run name -> log rows (read through cache_schema.RunDir)
    grids: dict[str, Path]  # run name -> sample GIF grid
    fvd: dict[str, dict[str, Any]]
    iicr: dict[str, Any]
    timings: list[tuple[str, float]] = field(default_factory=list)


def _flatten_cos(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """log rows keep cosine similarity as {"cos_sim": {encoder: value}}; flatten to cos_<encoder>."""
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


def _tables(r: DemoResult, logs: dict[str, list[dict[str, Any]]]) -> dict[str, tuple[list[str], list[list]]]:
    train_rows = []
    for name, rows in logs.items():
        cos = {k[4:]: _last(rows, k) for k in _cos_keys(rows)}
        shown = ", ".join(f"{k} {v:.3f}" for k, v in cos.items() if v is not None) or "n/a"
        train_rows.append(
            [name, _last(rows, "step"), _last(rows, "flow_loss"), _last(rows, "align_loss"), shown]
        )
    fvd_rows = [
        [name, x["metric"], round(x["value"], 3), x["n_real"], x["n_fake"]] for name, x in r.fvd.items()
    ]
    iicr_rows = [
        [name, x["dim"], _round(x.get("intra")), _round(x.get("inter_video")), _round(x.get("iicr_video")),
         _round(x.get("iicr_class"))]
        for name, x in r.iicr["encoders"].items()
    ]  # fmt: skip
    fidelity_rows = [
        [n, r.target_format, _round(f.get("mean")), _round(f.get("p1"))] for n, f in r.fidelity.items()
    ]
    return {
        "train": (["run", "steps", "flow loss", "align loss", "cosine to targets (last)"], train_rows),
        "fidelity": (["encoder", "format", "cos mean", "cos p1"], fidelity_rows),
        "fvd": (["run", "metric", "value", "n real", "n fake"], fvd_rows),
        "iicr": (["encoder", "dim", "intra", "inter (videos)", "IICR (videos)", "IICR (classes)"], iicr_rows),
        "time": (["step", "seconds"], [[name, round(sec, 1)] for name, sec in r.timings]),
    }


def _markdown(r: DemoResult, tables: dict[str, tuple[list[str], list[list]]]) -> list[str]:
    return [
        "# align4gen demo report",
        "",
        f"Synthetic set: {r.videos} videos, {r.classes} classes; preset `{r.preset}`; {r.clips} clips cached "
        f"with encoders {', '.join(r.encoders)} as {r.target_format} targets; {r.steps} training steps per "
        "run. Models are tiny and random-initialised, so the numbers show that every stage runs and how the "
        "curves move, not the method's quality.",
        "",
        "## Training",
        "",
        _md_table(*tables["train"]),
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![alignment cosine](alignment_cosine.png)",
        "",
        "## Cached targets: fidelity to the exact float32 targets",
        "",
        _md_table(*tables["fidelity"]),
        "",
        "## Samples",
        "",
        *[f"**{name}**\n\n![{name} samples](runs/{name}/samples/grid.gif)\n" for name in r.grids],
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


def write_report(r: DemoResult) -> dict[str, Any]:
    """report.md + report.html (images embedded) + summary.json; prints the one-screen summary."""
    logs = {name: _flatten_cos(rows) for name, rows in r.logs.items()}
    plots = plot_curves(r.out, logs)
    tables = _tables(r, logs)
    md = _markdown(r, tables)
    (r.out / "report.md").write_text("\n".join(md))
    images = {"loss_curves.png": plots["loss"], "alignment_cosine.png": plots["cosine"]}
    images.update({f"runs/{name}/samples/grid.gif": path for name, path in r.grids.items()})
    (r.out / "report.html").write_text(_html(md, images))
    summary = {
        "out": str(r.out),
        "clips": r.clips,
        "fidelity": r.fidelity,
        "fvd": {name: x["value"] for name, x in r.fvd.items()},
        "iicr": {name: x.get("iicr_video") for name, x in r.iicr["encoders"].items()},
        "final_flow_loss": {name: _last(rows, "flow_loss") for name, rows in logs.items()},
        "seconds": dict(r.timings),
    }
    (r.out / "summary.json").write_text(json.dumps(summary, indent=2))
    click.secho("\n== summary ==", bold=True)
    for key in ("train", "fidelity", "fvd", "iicr"):
        click.echo(format_table(*tables[key]))
        click.echo()
    total = sum(s for _, s in r.timings)
    click.echo(f"total {total:.0f}s   report: {r.out / 'report.md'} (and report.html)")
    return summary


def _fidelity(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.5f}"


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
