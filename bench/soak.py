"""Soak test (not part of CI): kill -9 extract, pack (threads and the processes scheduler), train and
sample at random moments, rerun each until it finishes, and check that the final store, shards,
weights and samples equal an uninterrupted run, that no process of a killed command survives it,
and that a killed sampler never leaves a torn videos.npz under its final name.

    python bench/soak.py --kills 12 --seed 0 --out bench/results/soak-cpu.json
    python bench/soak.py --kills 4 --stages pack-processes     # one stage (the others run unkilled)

On the built-in synthetic set with the tiny preset (CPU). Each stage is run as the real CLI in a
subprocess; a seeded schedule kills it with SIGKILL after a random delay within its measured
duration, then the same command is rerun (train with --resume) until it exits 0. Reported: kills
per stage, reruns, and bytes that differ from the reference (the goal is 0: resume loses nothing).
"""

from __future__ import annotations

import argparse
import contextlib
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
        "pack-processes": [*base, "pack", str(out / "store.zarr"), "--out", str(out / "shards-processes"),
                           "--samples-per-shard", "4", "--scheduler", "processes", "--workers", "2"],
        "train": [*base, "train", "--shards", str(out / "shards"), "--out", str(out / "run"), "--preset", "tiny",
                  "--steps", "40", "--checkpoint-every", "5", "--device", "cpu", "--set", "projector_dim=32"],
        "sample": [*base, "sample", "--run", str(out / "run"), "--out", str(out / "samples"), "--num", "48",
                   "--steps", "4", "--batch-size", "4", "--device", "cpu"],
    }  # fmt: skip


STAGES = ("extract", "pack", "pack-processes", "train", "sample")


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


ORPHAN_WAIT_S = 10.0  # how long a killed command's processes may take to follow it


def run_once(cmd: list[str], kill_after: float | None, orphans: list[str] | None = None) -> tuple[int, float]:
    """Run `cmd`; SIGKILL it after `kill_after` seconds if still running. (return code, seconds).
    After a kill, any of its processes still alive ORPHAN_WAIT_S later is killed and added to `orphans`."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(), cwd=REPO)
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(children, timeout=ORPHAN_WAIT_S)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                (orphans if orphans is not None else []).append(" ".join(p.cmdline()[-2:]))
                p.kill()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(
            f"{' '.join(cmd[2:4])} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}"
        )
    return proc.returncode, time.perf_counter() - start


def rerun_args(stage: str, cmd: list[str]) -> list[str]:
    """What a user adds to rerun a killed stage: nothing for extract (it resumes by itself),
    --overwrite for pack (its own partial shard set), --resume for a run that has a config."""
    if stage.startswith("pack"):
        return ["--overwrite"]
    if stage == "train" and RunDir(cmd[cmd.index("--out") + 1]).exists():
        return ["--resume"]
    return []


def soak_stage(stage: str, cmd: list[str], kills: int, duration: float, rng: random.Random) -> dict:
    """Kill the stage `kills` times at random moments, then let it finish; count the reruns and the
    processes that outlived a kill. A run that finishes before its kill teaches the schedule a
    shorter duration and the stage starts over. After every kill of `sample`, a videos.npz under
    its final name must be complete (torn: 0)."""
    out = Path(cmd[cmd.index("--out") + 1])
    done, runs, killed, orphans, torn = False, 0, 0, [], 0
    while not done:
        kill_after = (
            rng.uniform(0.3, 0.9) * duration if killed < kills else None
        )  # durations include start-up
        code, seconds = run_once(cmd + (rerun_args(stage, cmd) if runs else []), kill_after, orphans)
        runs += 1
        killed += code == -signal.SIGKILL
        if stage == "sample" and code == -signal.SIGKILL:
            torn += not complete_npz(out / "videos.npz", int(cmd[cmd.index("--num") + 1]))
        done = code == 0 and killed >= kills
        if code == 0 and not done:  # finished too soon: shorter kills, from scratch
            duration = seconds
            shutil.rmtree(out)
    return {
        "kills": killed,
        "runs": runs,
        "orphans": len(orphans),
        "orphan_commands": orphans[:5],
        "torn": torn,
    }


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
    shard_diff = {}
    for folder in ("shards", "shards-processes"):  # both schedulers must write the reference bytes
        shards_b = file_digests(soaked / folder, "**/*.tar")
        shard_diff[folder] = sum(
            (ref / "shards" / k).stat().st_size for k in shards_a if shards_b.get(k) != shards_a[k]
        )
    wa = RunDir(ref / "run").latest_checkpoint()
    wb = RunDir(soaked / "run").latest_checkpoint()
    weights_a, weights_b = file_digests(wa, "*/*.safetensors"), file_digests(wb, "*/*.safetensors")
    weight_diff = sum((wa / k).stat().st_size for k in weights_a if weights_b.get(k) != weights_a[k])
    with np.load(ref / "samples" / "videos.npz") as va, np.load(soaked / "samples" / "videos.npz") as vb:
        sample_diff = int(np.sum(va["videos"] != vb["videos"])) + int(np.sum(va["labels"] != vb["labels"]))
    return {"store": store_diff, "shards": shard_diff["shards"], "shards-processes": shard_diff["shards-processes"],
            "weights": weight_diff, "samples": sample_diff, "checkpoint": wb.name}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=12, help="kill -9s in all, spread over the soaked stages")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"stages to kill ({','.join(STAGES)})")
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
            if stage != "pack-processes":  # the reference shards come from the default scheduler
                durations[stage] = run_once(cmd, None)[1]
        durations["pack-processes"] = durations["pack"]
        chosen = [s for s in args.stages.split(",") if s]
        per_stage = {stage: 0 for stage in STAGES}
        for i in range(args.kills):
            per_stage[chosen[i % len(chosen)]] += 1
        stages = {}
        for stage, cmd in commands(root, data, "soaked").items():
            stages[stage] = soak_stage(stage, cmd, per_stage[stage], durations[stage], rng)
        diff = compare(root / "reference", root / "soaked")
    compared = {
        "extract": "store",
        "pack": "shards",
        "pack-processes": "shards-processes",
        "train": "weights",
        "sample": "samples",
    }
    rows = [(s, stages[s]["kills"], stages[s]["runs"], f"{durations[s]:.1f}", diff[compared[s]], stages[s]["orphans"],
             stages[s]["torn"]) for s in stages]  # fmt: skip
    print(
        format_table(
            ["stage", "kill -9s", "runs", "clean run s", "bytes differing", "orphans", "torn files"], rows
        )
    )
    total_kills = sum(s["kills"] for s in stages.values())
    lost = sum(diff[compared[s]] for s in stages) + sum(s["torn"] for s in stages.values())
    orphans = sum(s["orphans"] for s in stages.values())
    print(
        f"kills survived: {total_kills}   bytes lost: {lost}   orphans: {orphans}   final checkpoint {diff['checkpoint']}"
    )
    result = {"kills": total_kills, "bytes_lost": lost, "orphans": orphans, "stages": stages, "durations_s": durations,
              "diff": diff, "seed": args.seed, "machine": f"{os.cpu_count()} CPUs"}  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    if lost or orphans:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
