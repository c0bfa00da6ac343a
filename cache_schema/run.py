"""The training run directory: the hand-off from `train` to `sample`, `info` and the demo report.

    RUN/.align4gen.json        marker (kind "run"), see outputs.py
    RUN/config.yaml            the resolved training config, plus `vae_spec`: the shards' VAE
                               (id, kind, scale, ...), so sampling decodes with the right VAE,
                               and `model_family` (stages/common/models/factory.py)
    RUN/log.jsonl              one JSON row per log step (LOG_FIELDS)
    RUN/tensorboard/           TensorBoard events (--report-to tensorboard)
    RUN/wandb/                 Weights & Biases files and run id (--report-to wandb)
    RUN/loss.png               loss curves
    RUN/samples/               periodic sample GIF grids (step-XXXXXXX.gif)
    RUN/checkpoints/step-XXXXXXX/
        model/                 the adapter's save_pretrained (config.json + safetensors): raw weights
        ema/                   the EMA weights, same format (what sampling uses)
        projectors.safetensors alignment projectors (absent once alignment has ended)
        train_state.pt         optimizer, step, RNG states per rank, loader position
        checksums.json         size and sha256 of every file above (checkpoint.py)
    RUN/checkpoints/latest     text: the newest complete step folder's name

A checkpoint is written into a temporary folder, its checksums recorded, then renamed, and
`latest` is replaced after that, so a crash mid-write never leaves `latest` pointing at a
partial checkpoint, and a file damaged later is named when it is loaded. Every reader
of a run goes through `RunDir`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import verify_checkpoint, write_manifest
from .validate import CacheError, read_yaml_mapping

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
TENSORBOARD = "tensorboard"
WANDB = "wandb"
SAMPLES = "samples"
LOSS_PLOT = "loss.png"
MODEL_WEIGHTS = "model"
EMA_WEIGHTS = "ema"
PROJECTORS_FILE = "projectors.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
# a LoRA run's weights in model/ and ema/ (and the EMA's at the step folder's top): diffusers' LoRA
# file name, what WanPipeline.load_lora_weights(folder) reads
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
STEP_PREFIX = "step-"

# One log row. cos_sim and align_weight are {encoder: value}; skipped lists corrupt sample keys.
LOG_FIELDS = (
    "step",
    "loss",
    "flow_loss",
    "align_loss",
    "cos_sim",
    "align_weight",
    "lr",
    "grad_norm",
    "samples_per_s",
    "samples_seen",
    "skipped",
)


class RunError(CacheError):
    """A run directory that is missing, incomplete or unreadable; names the file."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


class RunDir:
    """One training run's folder, read and written through the contract above."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def samples(self) -> Path:
        return self.path / SAMPLES

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def wandb(self) -> Path:
        return self.path / WANDB

    @property
    def loss_plot(self) -> Path:
        return self.path / LOSS_PLOT

    # ------------------------------------------------------------------ config

    def exists(self) -> bool:
        return self.config_file.is_file()

    def require(self) -> RunDir:
        """This run, or a RunError saying what is missing (a mistyped --run or --resume)."""
        if not self.path.is_dir():
            raise RunError(f"no training run at {self.path}: the folder does not exist")
        if not self.exists():
            raise RunError(f"{self.path} is not a training run: it has no {CONFIG_FILE}")
        return self

    def read_config(self) -> dict[str, Any]:
        missing = f"{self.path} is not a training run: it has no {CONFIG_FILE}"
        return read_yaml_mapping(self.config_file, RunError, missing)

    def write_config(self, config: dict[str, Any]) -> None:
        import yaml

        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.config_file.with_name(CONFIG_FILE + ".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(tmp, self.config_file)

    def vae_spec(self) -> dict[str, Any]:
        """The VAE the run's latents came from ({} when the run predates the field)."""
        return dict(self.read_config().get("vae_spec") or {})

    def model_family(self) -> str | None:
        """The model family the run trained (None when the run predates the field)."""
        return self.read_config().get("model_family")

    # ------------------------------------------------------------------ log

    def read_log(self, repair: bool = False) -> list[dict[str, Any]]:
        """The log rows. A torn last line (a crash or a full disk mid-write) is dropped, and with
        `repair` cut from the file; a bad line elsewhere is an error naming file and line."""
        try:
            text = self.log_file.read_text()
        except FileNotFoundError:
            return []
        lines = text.split("\n")
        rows: list[dict[str, Any]] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                last = all(not rest.strip() for rest in lines[number:])
                if not last:
                    raise RunError(
                        f"{self.log_file}:{number} is not a JSON row; fix or delete that line"
                    ) from None
                if repair:
                    good = "".join(json.dumps(r) + "\n" for r in rows)
                    self._replace_log(good)
                    warnings.warn(
                        f"{self.log_file}: dropped a torn last line (line {number}, written during a crash)",
                        stacklevel=2,
                    )
                break
        return rows

    def append_log(self, row: dict[str, Any]) -> None:
        with self.log_file.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def truncate_log(self, after_step: int) -> None:
        """On resume, drop rows written after the checkpoint resumed from (they are redone)."""
        rows = self.read_log(repair=True)
        if any(r.get("step", 0) > after_step for r in rows):
            self._replace_log("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= after_step))

    def _replace_log(self, text: str) -> None:
        tmp = self.log_file.with_name(LOG_FILE + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.log_file)

    # ------------------------------------------------------------------ checkpoints

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / step_dir_name(step)

    def latest_checkpoint(self) -> Path | None:
        """The folder `checkpoints/latest` names, or None when the run has no checkpoint yet."""
        marker = self.checkpoints / LATEST
        if not marker.is_file():
            return None
        folder = self.checkpoints / marker.read_text().strip()
        if not folder.is_dir():
            raise RunError(f"{marker} names {folder.name}, which does not exist")
        return folder

    def step_dirs(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.glob(f"{STEP_PREFIX}*") if p.is_dir() and _is_step_dir(p)]
        return sorted(found, key=_step_of)

    def publish_checkpoint(self, step: int, write: Callable[[Path], None]) -> Path:
        """`write(tmp_folder)` fills a temporary folder; its checksums are recorded, then it becomes
        step-XXXXXXX and `latest`. A failure removes only that temporary folder: `latest` and
        every earlier checkpoint stay as they were."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.step_dir(step)
        tmp = self.checkpoints / (final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a killed writer of this run
        tmp.mkdir()
        try:
            write(tmp)
            write_manifest(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker_tmp = self.checkpoints / (LATEST + ".tmp")
        marker_tmp.write_text(final.name + "\n")
        os.replace(marker_tmp, self.checkpoints / LATEST)
        return final

    def previous_checkpoint(self, folder: Path) -> Path | None:
        """The newest complete checkpoint older than `folder` (what to offer when it is damaged)."""
        if not _is_step_dir(folder):
            return None
        older = [p for p in self.step_dirs() if _step_of(p) < _step_of(folder)]
        return older[-1] if older else None

    def prune_checkpoints(self, keep: int) -> list[Path]:
        """Delete all but the newest `keep` checkpoints up to `latest`, and only once `latest`
        verifies against its checksums: an older one is the way back while a newer is unproven.
        Never `latest`, never a checkpoint newer than it."""
        if keep < 1:
            return []
        latest = self.latest_checkpoint()
        if latest is None:
            return []
        verify_checkpoint(latest)  # CheckpointError: nothing is deleted
        folders = [p for p in self.step_dirs() if _step_of(p) <= _step_of(latest)]
        removed = []
        for folder in folders[: max(0, len(folders) - keep)]:
            if folder.name == latest.name:
                continue
            shutil.rmtree(folder)
            removed.append(folder)
        return removed


def _is_step_dir(folder: Path) -> bool:
    return folder.name.startswith(STEP_PREFIX) and folder.name[len(STEP_PREFIX) :].isdigit()


def _step_of(folder: Path) -> int:
    return int(folder.name[len(STEP_PREFIX) :])


def weights_folder(checkpoint: Path, ema: bool = True) -> tuple[Path, str]:
    """(save_pretrained folder, "ema" | "model" | "pretrained") to sample from in a checkpoint
    folder or a bare save_pretrained folder."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "config.json").is_file():
        return checkpoint, "pretrained"
    order = [EMA_WEIGHTS, MODEL_WEIGHTS] if ema else [MODEL_WEIGHTS]
    for name in order:
        if any((checkpoint / name / f).is_file() for f in ("config.json", LORA_WEIGHTS_FILE)):
            return checkpoint / name, name
    raise RunError(
        f"{checkpoint} is neither a save_pretrained folder (config.json) nor a checkpoint with "
        f"{' or '.join(order)}/ inside"
    )
