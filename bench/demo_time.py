"""Wall time of `pipeline demo` as a new user meets it: an empty model home (the tiny trained
models are built inside the timed run), an empty output folder, default settings.

    python bench/demo_time.py                 # the default (tiny) preset
    python bench/demo_time.py --preset small

Prints the demo's own per-step table and writes bench/results/demo_time[_<preset>].json with the
total, each step's seconds, the machine and the samples' scores. Run it alone: two heavy jobs on
2 cores distort every timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--keep", default=None, help="keep the demo output here instead of a temporary folder")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="demo-time-") as tmp:
        out = Path(args.keep or Path(tmp) / "demo-out")
        env = {**os.environ, "ALIGN4GEN_HOME": str(Path(tmp) / "home")}  # a fresh machine: nothing cached
        cmd = [sys.executable, "-m", "pipeline.cli", "demo", "--out", str(out), "--preset", args.preset]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
        total = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
    record = {
        "preset": args.preset,
        "total_s": round(total, 1),
        "steps_s": {k: round(v, 1) for k, v in summary["seconds"].items()},
        "scores": summary["scores"],
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },  # fmt: skip
    }
    print(f"{'step':<55} {'seconds':>8}")
    for name, sec in record["steps_s"].items():
        print(f"{name:<55} {sec:>8.1f}")
    print(f"{'total (process wall time)':<55} {total:>8.1f}")
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if args.preset == "tiny" else f"_{args.preset}"
    (RESULTS / f"demo_time{suffix}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
