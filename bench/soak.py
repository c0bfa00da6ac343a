"""Soak test (not part of CI): kill -9 extract, pack, train and sample at random moments, rerun each
until it finishes, and check that the final store, shards, weights and samples equal an
uninterrupted run, and that a killed sampler never leaves a torn videos.npz under its final name.

    python bench/soak.py --kills 12 --sample-kills 4 --seed 0 --out bench/results/soak-cpu.json

On the built-in synthetic set with the tiny preset (CPU). Each stage is run as the real CLI in a
subprocess; a seeded schedule kills it with SIGKILL after a random delay within its measured
duration, then the same command is rerun (train with --resume) until it exits 0. Reported: kills
per stage, reruns, and bytes that differ from the reference (the goal is 0: resume loses nothing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cache_schema import RunDir  # noqa: E402
from pipeline.summary import format_table  # noqa: E402


def commands(root: Path, data: Path, name: str) -> dict[str, list[str]]:
    base = [sys.executable, "-m", "pipeline.cli"]
    out = root / name
    return {
        "extract": [*base, "extract", "--data", str(data), "--out", str(out / "store.zarr"), "--preset", "tiny",
                    "--block-size", "2", "--pca-dims", "dino=8", "--clips-per-video", "2"],
        "pack": [*base, "pack", str(out / "store.zarr"), "--out", str(out / "shards"), "--samples-per-shard", "4"],
        "train": [*base, "train", "--shards", str(out / "shards"), "--out", str(out / "run"), "--preset", "tiny",
                  "--steps", "40", "--checkpoint-every", "5", "--device", "cpu", "--set", "projector_dim=32"],
        "sample": [*base, "sample", "--run", str(out / "run"), "--out", str(out / "samples"), "--num", "48",
                   "--steps", "4", "--batch-size", "4", "--device", "cpu"],
    }  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def run_once(cmd: list[str], kill_after: float | None) -> tuple[int, float]:
    """Run `cmd`; SIGKILL it after `kill_after` seconds if still running. (return code, seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(), cwd=REPO)
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(
            f"{' '.join(cmd[2:4])} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}"
        )
    return proc.returncode, time.perf_counter() - start


def rerun_args(stage: str, cmd: list[str]) -> list[str]:
    """What a user adds to rerun a killed stage: nothing for extract (it resumes by itself),
    --overwrite for pack (its own partial shard set), --resume for a run that has a config."""
    if stage == "pack":
        return ["--overwrite"]
    if stage == "train" and RunDir(cmd[cmd.index("--out") + 1]).exists():
        return ["--resume"]
    return []


def soak_stage(stage: str, cmd: list[str], kills: int, duration: float, rng: random.Random) -> dict:
    """Kill the stage `kills` times at random moments, then let it finish; count the reruns. A run
    that finishes before its kill teaches the schedule a shorter duration and the stage starts over.
    After every kill of `sample`, a videos.npz under its final name must be complete (torn: 0)."""
    out = Path(cmd[cmd.index("--out") + 1])
    done, runs, killed, torn = False, 0, 0, 0
    while not done:
        kill_after = (
            rng.uniform(0.3, 0.9) * duration if killed < kills else None
        )  # durations include start-up
        code, seconds = run_once(cmd + (rerun_args(stage, cmd) if runs else []), kill_after)
        runs += 1
        killed += code == -signal.SIGKILL
        if stage == "sample" and code == -signal.SIGKILL:
            torn += not complete_npz(out / "videos.npz", int(cmd[cmd.index("--num") + 1]))
        done = code == 0 and killed >= kills
        if code == 0 and not done:  # finished too soon: shorter kills, from scratch
            duration = seconds
            shutil.rmtree(out)
    return {"kills": killed, "runs": runs, "torn": torn}


def complete_npz(path: Path, num: int) -> bool:
    """Absent (still being written under its temporary name), or complete with `num` videos."""
    if not path.exists():
        return True
    try:
        with np.load(path) as data:
            return data["videos"].shape[0] == num
    except Exception:
        return False


def file_digests(folder: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob(pattern)) if p.is_file()}  # fmt: skip


def compare(ref: Path, soaked: Path) -> dict[str, int]:
    """Bytes that differ between the two pipelines' outputs, per stage (0 = nothing lost)."""
    a, b = (
        zarr.open_group(str(ref / "store.zarr"), mode="r"),
        zarr.open_group(str(soaked / "store.zarr"), mode="r"),
    )
    store_diff = 0
    for name, array in a.arrays():
        other = b[name][:]
        store_diff += int(np.sum(array[:].view(np.uint8) != other.view(np.uint8)))
    for group_name, group in a.groups():
        for name, array in group.arrays():
            store_diff += int(np.sum(array[:].view(np.uint8) != b[group_name][name][:].view(np.uint8)))
        for sub_name, sub in group.groups():
            for name, array in sub.arrays():
                other = b[group_name][sub_name][name][:]
                store_diff += int(np.sum(array[:].view(np.uint8) != other.view(np.uint8)))
    shards_a = file_digests(ref / "shards", "**/*.tar")
    shards_b = file_digests(soaked / "shards", "**/*.tar")
    shard_diff = sum((ref / "shards" / k).stat().st_size for k in shards_a if shards_b.get(k) != shards_a[k])
    wa = RunDir(ref / "run").latest_checkpoint()
    wb = RunDir(soaked / "run").latest_checkpoint()
    weights_a, weights_b = file_digests(wa, "*/*.safetensors"), file_digests(wb, "*/*.safetensors")
    weight_diff = sum((wa / k).stat().st_size for k in weights_a if weights_b.get(k) != weights_a[k])
    with np.load(ref / "samples" / "videos.npz") as va, np.load(soaked / "samples" / "videos.npz") as vb:
        sample_diff = int(np.sum(va["videos"] != vb["videos"])) + int(np.sum(va["labels"] != vb["labels"]))
    return {"store": store_diff, "shards": shard_diff, "weights": weight_diff, "samples": sample_diff,
            "checkpoint": wb.name}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=12, help="kill -9s spread over extract, pack and train")
    ap.add_argument("--sample-kills", type=int, default=4, help="kill -9s of pipeline sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    from stages.common.synth import make_synthetic

    with tempfile.TemporaryDirectory(prefix="align4gen-soak-") as tmp:
        root = Path(tmp)
        data = root / "videos"
        make_synthetic(data, videos=12, classes=3, frames=24, size=64, seed=args.seed, progress=False)
        durations = {}
        for stage, cmd in commands(root, data, "reference").items():
            durations[stage] = run_once(cmd, None)[1]
        per_stage = {"extract": args.kills // 3, "pack": args.kills // 3}
        per_stage["train"] = args.kills - 2 * (args.kills // 3)
        per_stage["sample"] = args.sample_kills
        stages = {}
        for stage, cmd in commands(root, data, "soaked").items():
            stages[stage] = soak_stage(stage, cmd, per_stage[stage], durations[stage], rng)
        diff = compare(root / "reference", root / "soaked")
    rows = [(s, stages[s]["kills"], stages[s]["runs"], f"{durations[s]:.1f}", diff[{"extract": "store", "pack": "shards",
             "train": "weights", "sample": "samples"}[s]], stages[s]["torn"]) for s in stages]  # fmt: skip
    print(format_table(["stage", "kill -9s", "runs", "clean run s", "bytes differing", "torn files"], rows))
    total_kills = sum(s["kills"] for s in stages.values())
    lost = (
        diff["store"]
        + diff["shards"]
        + diff["weights"]
        + diff["samples"]
        + sum(s["torn"] for s in stages.values())
    )
    print(f"kills survived: {total_kills}   bytes lost: {lost}   final checkpoint {diff['checkpoint']}")
    result = {"kills": total_kills, "bytes_lost": lost, "stages": stages, "durations_s": durations, "diff": diff,
              "seed": args.seed, "machine": f"{os.cpu_count()} CPUs"}  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    if lost:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
