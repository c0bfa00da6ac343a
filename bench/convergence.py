"""The controlled convergence experiment: does alignment make a video DiT learn faster here?

Arms (same data, same seed -> same batches and noise within a seed):
  baseline     lambda = 0
  informative  lambda > 0, targets from the tiny encoders pretrained on synthetic clips
  random       lambda > 0, targets from random-initialised encoders of the same configs (the
               control: does alignment help because the features carry information?)
Each arm runs with several seeds; every run evaluates its EMA weights during training
(`--eval-every`: class accuracy of class-conditional samples and the synthetic-domain Fréchet
distance, stages/common/synth_eval.py). The table and the plot give, per arm and step, the mean
over seeds with a 95% t-interval. Results go to bench/results/convergence.json and .png.

    python bench/convergence.py --seeds 0 1 2 --steps 3000 --eval-every 750

The result is reported as it comes out, whatever its sign (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("synth_class_acc", "synth_frechet", "flow_loss")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/convergence", help="where data, stores, shards and runs go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--videos", type=int, default=64)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=750)
    p.add_argument("--eval-num", type=int, default=32)
    p.add_argument("--lambda", dest="lam", type=float, default=0.5)
    p.add_argument("--model", default="mini/4")
    p.add_argument("--arms", nargs="+", default=["baseline", "informative", "random"])
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="data, models, stores and shards only (then run seeds in parallel)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument(
        "--summarise-only", action="store_true", help="read the runs' logs as they are; train nothing"
    )
    return p.parse_args()


def demo_config(args: argparse.Namespace):
    """The demo's data, model and training recipe (pipeline/demo.py), with this run's sizes."""
    from pipeline.demo import DemoConfig

    return DemoConfig(videos=args.videos, model=args.model, steps=args.steps, eval_every=args.eval_every,
                      eval_num=args.eval_num, align_lambda=args.lam)  # fmt: skip


def prepare(work: Path, demo) -> dict[str, Any]:
    """The demo's synthetic set, the trained and random tiny encoders, and one store + shard set per
    encoder family (the same clips, latents and shard order; only the targets differ)."""
    from pipeline.demo import extract_config, trained_recipe
    from stages.common.synth import make_synthetic
    from stages.common.trained import trained_models
    from stages.extract.runner import run_extract
    from stages.pack.packer import PackConfig, run_pack

    data = work / "data"
    if not (data / "synth.json").is_file():
        make_synthetic(data, videos=demo.videos, classes=demo.classes, frames=demo.frames, size=demo.size,
                       seed=demo.seed, background=demo.background, objects=demo.objects,
                       object_scale=demo.object_scale, progress=False)  # fmt: skip
    names = [*demo.encoders, *(f"random-{name}" for name in demo.encoders), "classifier"]
    models = trained_models(recipe=trained_recipe(demo), names=names)
    shards = {}
    for family, prefix in (("informative", ""), ("random", "random-")):
        store, shard_dir = work / f"{family}.zarr", work / f"{family}-shards"
        if not (shard_dir / "index.json").is_file():
            folders = {name: models[prefix + name]["folder"] for name in demo.encoders}
            run_extract(extract_config(demo, data, store, folders))
            run_pack(PackConfig(cache=str(store), out=str(shard_dir), samples_per_shard=16, progress=False))
        shards[family] = shard_dir
    return {"shards": shards, "evaluator": models["classifier"]["folder"], "models": models}


def run_arm(demo, work: Path, prep: dict, arm: str, seed: int) -> list[dict[str, Any]]:
    """One training run; its log rows (resumes a killed run, reuses a finished one)."""
    from cache_schema import RunDir
    from pipeline.demo import train_config
    from stages.train.loop import train

    run = RunDir(work / "runs" / f"{arm}-seed{seed}")
    if not (run.exists() and any(r.get("step") == demo.steps for r in run.read_log())):
        family = "random" if arm == "random" else "informative"
        lam = 0.0 if arm == "baseline" else demo.align_lambda
        train(
            train_config(demo, prep["shards"][family], run.path, lam, prep["evaluator"], seed), progress=False
        )
    return run.read_log()


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and the two ends of a 95% Student-t interval over seeds."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def summarise(logs: dict[str, dict[int, list[dict]]]) -> dict[str, dict[str, list[dict]]]:
    """{arm: {metric: [{step, mean, lo, hi, n}]}} over the steps every seed of the arm logged."""
    out: dict[str, dict[str, list[dict]]] = {}
    for arm, by_seed in logs.items():
        out[arm] = {}
        for metric in METRICS:
            per_step: dict[int, list[float]] = {}
            for rows in by_seed.values():
                for row in rows:
                    value = (row.get("eval") or {}).get(metric) if metric != "flow_loss" else row.get(metric)
                    if isinstance(value, (int, float)):
                        per_step.setdefault(int(row["step"]), []).append(float(value))
            complete = {s: v for s, v in sorted(per_step.items()) if len(v) == len(by_seed)}
            out[arm][metric] = [
                dict(zip(("step", "mean", "lo", "hi"), (s, *interval(v)), strict=True), n=len(v))
                for s, v in complete.items()
            ]
    return out


def arm_labels(encoders: list[str]) -> dict[str, str]:
    """Legend names that say what each arm aligns to (e.g. "aligned: hog")."""
    names = ", ".join(encoders)
    random_names = ", ".join(f"random-{name}" for name in encoders)
    return {"baseline": "baseline", "informative": f"aligned: {names}", "random": f"aligned: {random_names}"}


def plot(summary: dict, path: Path, arm_names: dict[str, str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"synth_class_acc": "class accuracy of samples", "synth_frechet": "synthetic-domain Fréchet distance",
              "flow_loss": "flow-matching loss (train)"}  # fmt: skip
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.6))
    for ax, metric in zip(axes, METRICS, strict=True):
        for arm, series in summary.items():
            pts = series[metric]
            if not pts:
                continue
            steps = [p["step"] for p in pts]
            ax.plot(
                steps,
                [p["mean"] for p in pts],
                marker="o" if metric != "flow_loss" else None,
                label=(arm_names or {}).get(arm, arm),
            )
            ax.fill_between(steps, [p["lo"] for p in pts], [p["hi"] for p in pts], alpha=0.2)
        ax.set_xlabel("step")
        ax.set_title(labels[metric], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("mean over seeds, 95% t-interval", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from cache_schema import RunDir

    args = parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    demo = demo_config(args)
    prep = prepare(work, demo)
    if args.prepare_only:
        return
    logs: dict[str, dict[int, list[dict]]] = {arm: {} for arm in args.arms}
    for seed in args.seeds:
        for arm in args.arms:
            t0 = time.perf_counter()
            if args.summarise_only:
                logs[arm][seed] = RunDir(work / "runs" / f"{arm}-seed{seed}").read_log()
                continue
            logs[arm][seed] = run_arm(demo, work, prep, arm, seed)
            print(f"{arm} seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
    summary = summarise(logs)
    RESULTS.mkdir(exist_ok=True)
    plot(summary, RESULTS / "convergence.png", arm_labels(list(demo.encoders)))
    record = {"args": vars(args), "machine": platform.processor() or platform.machine(),
              "seconds": round(time.perf_counter() - start), "summary": summary,
              "per_seed_final": {arm: {str(s): rows[-1].get("eval") for s, rows in by_seed.items()}
                                 for arm, by_seed in logs.items()},
              "models": {n: {k: m.get(k) for k in ("objective", "steps", "sha256")} for n, m in prep["models"].items()}}  # fmt: skip
    (RESULTS / "convergence.json").write_text(json.dumps(record, indent=2))
    print(f"\n{'arm':<12} {'step':>6} " + " ".join(f"{m:>26}" for m in METRICS))
    for arm, series in summary.items():
        for _i, point in enumerate(series["synth_class_acc"]):
            cells = []
            for m in METRICS:
                match = [p for p in series[m] if p["step"] == point["step"]]
                cells.append(
                    f"{match[0]['mean']:.3f} [{match[0]['lo']:.3f}, {match[0]['hi']:.3f}]" if match else ""
                )
            print(f"{arm:<12} {point['step']:>6} " + " ".join(f"{c:>26}" for c in cells))
    print(f"\nwrote {RESULTS / 'convergence.json'} and convergence.png")


if __name__ == "__main__":
    main()
