"""A run's checkpoint -> a diffusers pipeline folder (model_index.json at its root) that
`DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)` loads without this package:

    FOLDER/model_index.json         components, latent_scale, vae_kind
    FOLDER/pipeline_videodit.py     VideoDiTPipeline (this folder's pipeline_videodit.py)
    FOLDER/transformer/             VideoDiT config + safetensors (EMA by default) + videodit.py,
                                    the model's own module (stages/common/models/dit.py, standalone)
    FOLDER/vae/                     the run's VAE, saved with save_pretrained
    FOLDER/scheduler/               FlowMatchEulerDiscreteScheduler (shift 1); the pipeline gives
                                    it our Euler grid as sigmas (pipeline_videodit.py)
    FOLDER/README.md                how it was made and how to load and upload it
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cache_schema
from cache_schema import RunDir
from cache_schema.run import weights_folder
from stages.common.models import dit

PIPELINE_MODULE = "pipeline_videodit"
PIPELINE_CLASS = "VideoDiTPipeline"
MODEL_MODULE = "videodit"
WEIGHTS = ("ema", "model")


@dataclass
class ExportConfig:
    run: str = ""
    checkpoint: str | None = None  # step-XXXXXXX inside the run; None: the latest
    out: str = ""
    weights: str = "ema"  # ema | model
    vae: str | None = None  # VAE id or folder; None: the run's recorded VAE
    overwrite: bool = False

    def validate(self) -> None:
        if not self.run:
            raise ValueError("run: a training run directory (RUN) is required")
        if not self.out:
            raise ValueError("out: an output folder (--out) is required")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights: {self.weights!r} is not one of {' | '.join(WEIGHTS)}")


def _checkpoint(run: RunDir, name: str | None) -> Path:
    if name is None:
        latest = run.latest_checkpoint()
        if latest is None:
            raise cache_schema.RunError(
                f"run {run.path} has no checkpoint yet (checkpoints/latest is missing)"
            )
        return latest
    path = run.checkpoints / name
    if not path.is_dir():
        have = sorted(p.name for p in run.checkpoints.glob("step-*"))
        raise FileNotFoundError(
            f"checkpoint {name} is not in {run.checkpoints} (it holds: {', '.join(have)})"
        )
    return path


def _transformer(src: Path, dest: Path) -> None:
    """The weights folder as saved, plus the model's module, named in config.json's _class_name."""
    shutil.copytree(src, dest)
    shutil.copy2(dit.__file__, dest / f"{MODEL_MODULE}.py")


def _vae(vae_id: str, spec: dict[str, Any], dest: Path):
    from stages.common.models.vae import VAEWrapper

    vae = VAEWrapper.load(vae_id, kind=spec.get("kind", "image"), scale=spec.get("scale"))
    vae.model.save_pretrained(dest, safe_serialization=True)
    return vae


def _scheduler(dest: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(dest)


def _model_index(vae: Any, vae_kind: str) -> dict[str, Any]:
    import diffusers

    return {
        "_class_name": [PIPELINE_MODULE, PIPELINE_CLASS],
        "_diffusers_version": diffusers.__version__,
        "transformer": [MODEL_MODULE, "VideoDiT"],
        "vae": ["diffusers", type(vae.model).__name__],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "latent_scale": float(vae.scale),
        "vae_kind": vae_kind,
    }


def export_pipeline(cfg: ExportConfig) -> dict[str, Any]:
    """Write the folder; returns a summary (what was exported from where)."""
    cfg.validate()
    run = RunDir(cfg.run).require()
    step = _checkpoint(run, cfg.checkpoint)
    src, kind = weights_folder(step, ema=cfg.weights == "ema")
    if kind != cfg.weights:
        raise cache_schema.RunError(f"{step} has no {cfg.weights}/ weights (--weights {cfg.weights})")
    spec = run.vae_spec()
    vae_id = cfg.vae or spec.get("id")
    if not vae_id:
        raise ValueError(f"{run.path} records no VAE in its config.yaml (vae_spec); pass --vae ID_OR_FOLDER")
    out = Path(cfg.out)
    cache_schema.prepare_output(out, "pipeline", overwrite=cfg.overwrite, inputs={"RUN": run.path})
    with cache_schema.OutputLock(str(out), "pipeline export"):
        _transformer(src, out / "transformer")
        vae = _vae(vae_id, spec, out / "vae")
        _scheduler(out / "scheduler")
        shutil.copy2(Path(__file__).with_name(f"{PIPELINE_MODULE}.py"), out / f"{PIPELINE_MODULE}.py")
        vae_kind = spec.get("kind", "image")
        (out / "model_index.json").write_text(json.dumps(_model_index(vae, vae_kind), indent=2) + "\n")
        summary = {"run": str(run.path), "checkpoint": step.name, "weights": kind, "vae": str(vae_id),
                   "latent_scale": float(vae.scale), "vae_kind": vae_kind, "out": str(out)}  # fmt: skip
        (out / "README.md").write_text(_readme(summary))
    return summary


def _readme(summary: dict[str, Any]) -> str:
    return f"""# VideoDiT exported by align4gen

From run `{summary["run"]}`, checkpoint `{summary["checkpoint"]}` ({summary["weights"]} weights);
VAE `{summary["vae"]}` ({summary["vae_kind"]}, latent scale {summary["latent_scale"]}).

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
videos = pipe(num_videos=4, num_inference_steps=50, seed=0, guidance_scale=1.0).videos  # uint8 [N,T,H,W,3]
```

The same seed, steps, guidance scale and batch size give the videos of
`pipeline sample --run RUN --checkpoint {summary["checkpoint"]} --sampler euler`.
Upload: `hf upload USER/REPO PATH .`
"""
