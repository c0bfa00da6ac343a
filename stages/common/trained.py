"""The ``tiny-trained`` models: informative tiny encoders, their random twins, and the synthetic
evaluator's classifier, built once from a seed and cached.

Why: the demo and the convergence experiment need alignment targets that carry information
(and, as a control, random encoders of the same shapes), and an evaluator of the synthetic
domain, all without downloading weights. Each model is built like the tiny preset's
(``presets._build``: a private temp folder renamed into place, first writer wins) and holds
``recipe.json`` (objective, steps, seeds, data seeds, measured loss / accuracy, wall time) and
the sha256 of its weights file; the folders load with ``load_encoder`` and
``SynthVideoClassifier.from_pretrained`` like any checkpoint.

Layout: ``<root>/tiny-trained-v1/{videomae,random-videomae,dino,random-dino,hog,random-hog,classifier}`` for
the default recipe (root: ``$ALIGN4GEN_HOME`` or ``~/.cache/align4gen``); any other recipe (a
seed, a step count, render arguments) goes to ``tiny-trained-v1/<recipe hash>/`` so caches of
different recipes never mix. The random twins are the pretraining runs' exact initial weights;
``hog`` (weight-free, stages.common.models.hog) is saved as it is, and ``random-hog`` is its pipeline with
seeded random filters.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stages.common import presets
from stages.common.pretrain import PretrainConfig
from stages.common.synth_classifier import ClassifierConfig

TRAINED_VERSION = "tiny-trained-v1"
TRAINED_NAMES = ("videomae", "random-videomae", "dino", "random-dino", "hog", "random-hog", "classifier")
RECIPE_FILE = "recipe.json"
# The encoder registry name each encoder folder loads as (load_encoder(kind, folder)).
ENCODER_KIND = {
    "videomae": "videomae", "random-videomae": "videomae", "dino": "dino", "random-dino": "dino",
    "hog": "hog", "random-hog": "hog",
}  # fmt: skip


@dataclass
class TrainedRecipe:
    """Everything that decides the weights: one seed, the three training recipes, and extra
    keyword arguments of ``render_video`` for the training clips (e.g. a background kind)."""

    seed: int = 0
    pretrain_clips: int = 256
    # the clips every model here is trained on: the demo's (32 px, every other frame, flat backgrounds)
    clip_size: int = 32
    clip_stride: int = 2
    videomae: PretrainConfig = field(
        default_factory=lambda: PretrainConfig(objective="mae", steps=200, mask_ratio=0.75, lr=1.5e-3)
    )
    dino: PretrainConfig = field(
        default_factory=lambda: PretrainConfig(objective="distill", steps=400, mask_ratio=0.5, lr=1e-3)
    )
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    render_kwargs: dict[str, Any] = field(default_factory=lambda: {"background": "flat"})

    def __post_init__(self) -> None:
        for part in (self.videomae, self.dino, self.classifier):
            part.seed = self.seed
        self.classifier.size = self.clip_size

    def as_dict(self) -> dict[str, Any]:
        return {"version": TRAINED_VERSION, **asdict(self)}

    def fingerprint(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_base(root: str | Path | None, recipe: TrainedRecipe) -> Path:
    """The folder of one recipe's models (module doc: default recipe at the top level)."""
    base = (Path(root).expanduser() if root is not None else presets._home()) / TRAINED_VERSION
    return base if recipe.fingerprint() == TrainedRecipe().fingerprint() else base / recipe.fingerprint()


def recipe_render(recipe: TrainedRecipe):
    """The recipe's clip renderer (rng, label, frames, size) -> uint8 clip: its stride and background."""
    return _render(recipe)


def _render(recipe: TrainedRecipe):
    from stages.common.synth import render_strided

    return functools.partial(render_strided, stride=recipe.clip_stride, **recipe.render_kwargs)


def _pretrain_clips(recipe: TrainedRecipe):
    from stages.common.synth import MOTIONS, SEED_OFFSETS, render_clips

    clips, _ = render_clips(
        recipe.pretrain_clips,
        recipe.seed,
        SEED_OFFSETS["pretrain"],
        len(MOTIONS),
        8,
        recipe.clip_size,
        _render(recipe),
    )
    return clips


def weights_sha256(folder: str | Path) -> str:
    """sha256 of the (single) weights file of a save_pretrained folder."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{folder} should hold one .safetensors weights file, found {len(files)}")
    h = hashlib.sha256()
    with open(files[0], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _finish(model: Any, path: Path, recipe: TrainedRecipe, info: dict[str, Any]) -> None:
    model.float().save_pretrained(path)
    info = {**info, "recipe": recipe.as_dict(), "sha256": weights_sha256(path)}
    (path / RECIPE_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _write_reference(folder: Path, recipe: TrainedRecipe) -> None:
    """The evaluator's real-clip reference (feature mean / covariance of the classifier's held-out
    clips), stored beside its weights so every user of the folder scores against the same stats."""
    from stages.common.synth_classifier import classifier_data
    from stages.common.synth_eval import REFERENCE_FILE, SynthEvaluator

    clips, _ = classifier_data(recipe.classifier, _render(recipe))["test"]
    SynthEvaluator.load(folder).reference_stats(clips, cache=folder / REFERENCE_FILE)


def _builder(name: str, recipe: TrainedRecipe):
    """The function that trains (or initialises) `name` and saves it into a folder."""
    from stages.common import pretrain
    from stages.common.synth import SEED_OFFSETS

    data_seeds = {"seed": recipe.seed, "offset": SEED_OFFSETS["pretrain"], "clips": recipe.pretrain_clips}

    def build(path: Path) -> None:
        t0 = time.perf_counter()
        if name == "videomae":
            model, stats = pretrain.pretrain_videomae(_pretrain_clips(recipe), recipe.videomae)
            info = {"objective": "videomae-mae", "steps": recipe.videomae.steps, "data": data_seeds, **stats}
        elif name == "dino":
            model, stats = pretrain.pretrain_dino(_pretrain_clips(recipe), recipe.dino)
            info = {"objective": f"dinov2-{recipe.dino.objective}", "steps": recipe.dino.steps, "data": data_seeds,
                    **stats}  # fmt: skip
        elif name == "random-videomae":
            model = pretrain.videomae_initial(recipe.seed).videomae
            info = {"objective": "random (videomae's initial weights)", "steps": 0}
        elif name == "random-dino":
            model = pretrain.dino_initial(recipe.seed)
            info = {"objective": "random (dino's initial weights)", "steps": 0}
        elif name in ("hog", "random-hog"):  # weight-free: saved so it loads, hashes and probes like the rest
            from stages.common.models.hog import HogFlow

            model = HogFlow(random_seed=recipe.seed if name == "random-hog" else None)
            info = {"objective": "maskfeat-hog + normal flow" if name == "hog" else "random filters (hog's control)",
                    "steps": 0}  # fmt: skip
        else:
            from stages.common.synth_classifier import train_classifier

            model, stats = train_classifier(recipe.classifier, _render(recipe))
            offsets = {k: SEED_OFFSETS[k] for k in ("classifier", "classifier_test")}
            info = {"objective": "supervised", "steps": recipe.classifier.steps, "data": {"seed": recipe.seed,
                    "offsets": offsets}, **stats}  # fmt: skip
        _finish(model, path, recipe, {"name": name, **info, "wall_s": round(time.perf_counter() - t0, 2)})
        if name == "classifier":
            _write_reference(path, recipe)

    return build


def read_record(folder: str | Path) -> dict[str, Any]:
    """A built model's recipe.json plus its folder."""
    return {**json.loads((Path(folder) / RECIPE_FILE).read_text()), "folder": str(folder)}


def trained_models(
    root: str | Path | None = None, recipe: TrainedRecipe | None = None, names: Iterable[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Build (once) and return ``{name: record}`` (record: recipe.json contents + ``folder``) for
    ``names`` (default all of TRAINED_NAMES). Deterministic for a recipe; safe across processes."""
    recipe = recipe or TrainedRecipe()
    wanted = list(TRAINED_NAMES if names is None else names)
    unknown = sorted(set(wanted) - set(TRAINED_NAMES))
    if unknown:
        raise ValueError(f"unknown trained model(s) {unknown}; choose from {list(TRAINED_NAMES)}")
    base = default_base(root, recipe)
    builders = {n: _builder(n, recipe) for n in wanted}
    paths = presets._ensure(base, wanted, recipe.seed, builders, TRAINED_VERSION)
    records = {n: read_record(p) for n, p in paths.items()}
    for n, rec in records.items():
        if rec["recipe"] != json.loads(json.dumps(recipe.as_dict())):
            raise ValueError(
                f"{paths[n]}/{RECIPE_FILE} was built from another recipe than the one asked for; "
                "delete that folder to rebuild it"
            )
    return records
