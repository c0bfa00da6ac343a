"""`pipeline demo` at its smallest size: every artifact exists and is valid."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from cache_schema import validate_shards, validate_store


def _finite_numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _finite_numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _finite_numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_demo_smallest_size_writes_a_valid_report(tmp_path: Path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "demo",
        "--out",
        str(out),
        "--videos",
        "8",
        "--classes",
        "2",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--eval-num",
        "4",
        "--batch-size",
        "4",
        "--num-samples",
        "4",
        "--sample-steps",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "report:" in proc.stdout

    assert validate_store(out / "cache.zarr") == []
    assert validate_shards(out / "shards", verify_hashes=True) == []
    for run in ("aligned", "baseline"):
        rows = [json.loads(line) for line in (out / "runs" / run / "log.jsonl").read_text().splitlines()]
        assert rows and rows[-1]["step"] == 6
        assert all(math.isfinite(r["loss"]) for r in rows)
        grid = Image.open(out / "runs" / run / "samples" / "grid.gif")
        assert grid.format == "GIF" and grid.n_frames == 8
    for png in (
        "loss_curves.png",
        "alignment_cosine.png",
        "eval_synth_class_acc.png",
        "eval_synth_frechet.png",
    ):
        image = Image.open(out / png)
        image.verify()
        assert image.size[0] > 100

    # evaluation during training: both runs scored at steps 3 and 6 (the last), same metrics
    for run in ("aligned", "baseline"):
        rows = [json.loads(line) for line in (out / "runs" / run / "log.jsonl").read_text().splitlines()]
        evals = {r["step"]: r["eval"] for r in rows if "eval" in r}
        assert sorted(evals) == [3, 6]
        assert all(0.0 <= e["synth_class_acc"] <= 1.0 and e["synth_frechet"] >= 0 for e in evals.values())
        strip = Image.open(out / "runs" / run / "samples" / "filmstrip.png")
        assert strip.size == (2 * (8 * 32 + 7 * 2), 2 * (4 * 32 + 3 * 2))  # 4 videos x 8 frames, 2x

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["scores"]) == {"aligned", "baseline"}
    numbers = _finite_numbers({k: summary[k] for k in ("scores", "final_flow_loss", "seconds")})
    assert numbers and all(math.isfinite(x) for x in numbers)
    assert set(summary["models"]) == {"hog", "classifier"}
    assert all(len(m["sha256"]) == 64 for m in summary["models"].values())
    iicr = json.loads((out / "iicr.json").read_text())
    assert set(iicr["encoders"]) == {"hog"}
    assert all(0.0 <= r["intra"] <= 1.0 + 1e-6 for r in iicr["encoders"].values())

    report = (out / "report.md").read_text()
    for section in (
        "## Samples",
        "## Evaluation during training",
        "## Training",
        "## IICR",
        "Neither is FVD",
    ):
        assert section in report
    for target in ("loss_curves.png", "eval_synth_class_acc.png", "runs/aligned/samples/grid.gif",
                   "runs/aligned/samples/filmstrip.png"):  # fmt: skip
        assert f"]({target})" in report and (out / target).is_file()
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and page.count("data:image/gif;base64,") == 2
    assert "<table>" in page
