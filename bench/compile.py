"""Benchmark `--compile`: the trainer's own `train_step`, eager against torch.compile (inductor),
side by side in one process on one resident device batch (no loader: only the step changes).

Both states are built with `build_state` from the same seed; the compiled one goes through
`stages.train.compiled.compile_state` exactly as `pipeline train --compile` does. The first
`--warmup` steps (which include compilation) are not timed; their losses are compared (the two
states see the same batch and the same noise, so only the floating-point order differs). Then
rounds of `--steps` steps alternate eager / compiled (`--repeats` rounds, median reported).
Both wall time and this process's CPU time are recorded: with one thread on a shared machine the
CPU time per step is the figure other load does not inflate. Prints a table and writes JSON
(`--out FILE.json`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from train_step import LAMBDA, Shapes, machine, resident_batch  # bench/ is on sys.path as a script

from pipeline.summary import format_table
from stages.train.compiled import compile_state
from stages.train.config import TrainConfig
from stages.train.state import build_state
from stages.train.step import StepConfig, train_step


def build(args, shapes: Shapes, device: torch.device, compiled: bool):
    layout = shapes.layout("float16")
    dims = {n: d for n, (d, _) in shapes.encoders.items()}
    cfg = TrainConfig(model=args.model, projector_dim=args.projector_dim)
    state = build_state(cfg, layout, dims, dict.fromkeys(dims, LAMBDA), device)
    if compiled:
        compile_state(state)
    state.model.train()
    step_cfg = StepConfig(device=device, encoders={}, frames=shapes.grid[0], use_bf16=device.type == "cuda")
    return state, step_cfg, dict.fromkeys(dims, LAMBDA)


def run(state, step_cfg, weights, batch, n: int) -> tuple[tuple[float, float], list[float]]:
    """((wall s, process CPU s), losses) of n steps."""
    if step_cfg.device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu, losses = time.perf_counter(), time.process_time(), []
    for _ in range(n):
        losses.append(train_step(state, [batch], step_cfg, weights).loss)
    if step_cfg.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start, time.process_time() - cpu), losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--frames", type=int, default=8, help="latent frames")
    p.add_argument("--latent", type=int, default=8, help="latent side (4 channels)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--projector-dim", type=int, default=64)
    p.add_argument("--dims", default="dino=64,sam2=32", help="encoder target dims")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dims = {k: int(v) for k, v in (part.split("=") for part in args.dims.split(","))}
    grid = (args.frames, args.latent // 2, args.latent // 2)
    shapes = Shapes(
        (4, args.frames, args.latent, args.latent), grid, {n: (d, args.frames) for n, d in dims.items()}
    )
    batch = resident_batch(shapes, args.batch_size, device)
    eager, compiled = build(args, shapes, device, False), build(args, shapes, device, True)
    _, eager_losses = run(*eager, batch, args.warmup)
    (compile_s, compile_cpu_s), compiled_losses = run(*compiled, batch, args.warmup)
    times: dict[str, list[tuple[float, float]]] = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        times["eager"].append(run(*eager, batch, args.steps)[0])
        times["compiled"].append(run(*compiled, batch, args.steps)[0])
    step_ms = {k: 1000 * float(np.median([w for w, _ in v])) / args.steps for k, v in times.items()}
    cpu_ms = {k: 1000 * float(np.median([c for _, c in v])) / args.steps for k, v in times.items()}
    rel = [abs(a - b) / abs(a) for a, b in zip(eager_losses, compiled_losses, strict=True)]
    res = {
        "machine": machine(),
        "device": str(device),
        "args": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "step_ms": step_ms,
        "cpu_ms_per_step": cpu_ms,
        "rounds_wall_cpu_s": times,
        "compiled_over_eager_speed": step_ms["eager"] / step_ms["compiled"],
        "compiled_over_eager_speed_cpu": cpu_ms["eager"] / cpu_ms["compiled"],
        "warmup_s_compiled": compile_s,
        "warmup_cpu_s_compiled": compile_cpu_s,
        "warmup_losses": {"eager": eager_losses, "compiled": compiled_losses},
        "max_rel_loss_diff": max(rel),
    }
    print(f"\n{res['machine']}  model {args.model}  latents 4x{args.frames}x{args.latent}x{args.latent}  "
          f"batch {args.batch_size}  {args.steps} steps x {args.repeats} rounds (median)")  # fmt: skip
    rows = [(k, f"{step_ms[k]:.1f}", f"{cpu_ms[k]:.1f}") for k in step_ms]
    rows.append(("speed-up (eager / compiled)", f"{res['compiled_over_eager_speed']:.2f}",
                 f"{res['compiled_over_eager_speed_cpu']:.2f}"))  # fmt: skip
    rows.append(("first steps incl. compilation, s", f"{compile_s:.1f}", f"{compile_cpu_s:.1f}"))
    rows.append(("max relative loss difference (warm-up)", f"{res['max_rel_loss_diff']:.2e}", ""))
    print(format_table(["", "wall ms/step", "CPU ms/step"], rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
