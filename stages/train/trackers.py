"""Where every log.jsonl row also goes (`--report-to`): TensorBoard, Weights & Biases, or nowhere.

One small interface, `Tracker` (log a row, close), so the loop never knows which one is in use.
A row is flattened the same way for every tracker (`flatten_row`): scalars as `train/<key>`,
per-encoder dicts as `align/cos_<encoder>` and `align/weight_<encoder>`, any other dict as
`<key>/<name>`; lists (the skipped keys) stay in log.jsonl only. W&B is an optional extra
(`pip install 'align4gen[wandb]'`); WANDB_MODE=offline runs it without network.
"""

from __future__ import annotations

from typing import Any, Protocol

from cache_schema import RunDir

WANDB_ID_FILE = "run-id"  # RUN/wandb/run-id: a resumed run logs into the same W&B run
WANDB_PROJECT = "align4gen"  # unless WANDB_PROJECT is set
_PREFIXES = {"cos_sim": "align/cos_", "align_weight": "align/weight_", "eval": "eval/"}


class Tracker(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def flatten_row(row: dict[str, Any]) -> dict[str, float]:
    """Every number of a log row under its tracker tag (the step is the x axis, not a value)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "step":
            continue
        if isinstance(value, bool | int | float):
            out[f"train/{key}"] = float(value)
        elif isinstance(value, dict):
            prefix = _PREFIXES.get(key, f"{key}/")
            for name, inner in value.items():
                if isinstance(inner, bool | int | float):
                    out[f"{prefix}{name}"] = float(inner)
    return out


class NoTracker:
    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """RUN/tensorboard; a resumed run first drops the events after its checkpoint (purge_step)."""

    def __init__(self, run: RunDir, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.tensorboard), purge_step=start_step + 1 if start_step else None)

    def log(self, row: dict[str, Any]) -> None:
        for tag, value in flatten_row(row).items():
            self.writer.add_scalar(tag, value, row["step"])

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per training run (its id kept in RUN/wandb/run-id, so --resume continues it),
    its config the run's resolved config.yaml. W&B drops rows of steps it has already seen, so the
    steps between the last checkpoint and a crash keep their first values there (log.jsonl is
    truncated to the checkpoint and rewritten)."""

    def __init__(self, run: RunDir, config: dict[str, Any]) -> None:
        import os
        import uuid

        import wandb

        run.wandb.mkdir(parents=True, exist_ok=True)
        id_file = run.wandb / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
            name=run.path.name,
            id=run_id,
            resume="allow",
            dir=str(run.path),
            config=config,
        )

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(flatten_row(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


def check_tracker(report_to: str) -> None:
    """Refuse --report-to wandb before anything runs when wandb is not installed."""
    if report_to != "wandb":
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError(
            "report_to: wandb is not installed; install the extra (pip install 'align4gen[wandb]') "
            "or choose --report-to tensorboard or none"
        ) from None


def make_tracker(report_to: str, run: RunDir, start_step: int, config: dict[str, Any]) -> Tracker:
    """The tracker --report-to names (rank 0 only; the other ranks log nothing)."""
    if report_to == "tensorboard":
        return TensorBoardTracker(run, start_step)
    if report_to == "wandb":
        return WandbTracker(run, config)
    return NoTracker()
