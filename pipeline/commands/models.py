"""`pipeline models build`: the informative tiny encoders, their random twins and the synthetic
evaluator's classifier, built once (seeded, cached) and probed."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group(name="models")
def models() -> None:
    """Locally trained tiny models (no downloads): encoders, random twins, the synthetic classifier."""


@models.command(name="build")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Cache root [default: $ALIGN4GEN_HOME or ~/.cache/align4gen].",
)
@click.option("--seed", default=0, show_default=True, type=int, help="One seed for weights, data and masks.")
@click.option(
    "--pretrain-steps",
    type=click.IntRange(min=1),
    help="Steps of both encoders' pretraining [default: the recipe's].",
)
@click.option(
    "--classifier-steps", type=click.IntRange(min=1), help="Steps of the classifier [default: the recipe's]."
)
@click.option(
    "--probe-clips", default=384, show_default=True, type=click.IntRange(min=8), help="Clips per probe task."
)
@click.option("--no-probe", is_flag=True, help="Skip the linear probes.")
def build(out: str | None, seed: int, pretrain_steps: int | None, classifier_steps: int | None,
          probe_clips: int, no_probe: bool) -> None:  # fmt: skip
    """Build (or reuse) every tiny-trained model and print what each is and how informative."""
    from pipeline.commands.common import cli_errors
    from stages.common.trained import TrainedRecipe, default_base, trained_models

    with cli_errors():
        recipe = TrainedRecipe(seed=seed)
        if pretrain_steps:
            recipe.videomae.steps = recipe.dino.steps = pretrain_steps
        if classifier_steps:
            recipe.classifier.steps = classifier_steps
        records = trained_models(out, recipe)
        base = default_base(out, recipe)
        probes = {}
        if not no_probe:
            from stages.common.trained import recipe_render
            from stages.evaluate.probe import ProbeConfig, probe_models

            # the motion probe's clips are the recipe's (the demo's size, stride, background, drifts)
            cfg = ProbeConfig(
                clips=probe_clips, seed=seed, size=recipe.clip_size, motion_classes=recipe.classifier.classes
            )
            probes = probe_models(records, cfg, str(base / "probe.json"), recipe_render(recipe))
    summary = {"base": str(base), "recipe": recipe.as_dict(), "models": records, "probes": probes}
    (base / "models.json").write_text(json.dumps(summary, indent=2) + "\n")
    _table(records, probes)
    click.echo(f"models in {base} (summary: {Path(base) / 'models.json'})")


def _ratio(value: float | None) -> str:
    """IICR is undefined (None) where the inter-video cosine is not clearly positive."""
    return "n/a" if value is None else f"{value:.3f}"


def _table(records: dict, probes: dict) -> None:
    from pipeline.summary import print_table

    def pct(x) -> str:
        return "" if x is None else f"{100 * x:.1f}%"

    rows = []
    for name, rec in records.items():
        p = probes.get(name, {})
        extra = (
            (pct(p["motion"]["test_acc"]), pct(p["shape"]["test_acc"]), _ratio(p["iicr"].get("iicr_class")))
            if p
            else ("", "", "")
        )
        if name == "classifier":
            extra = (f"held-out {pct(rec['heldout_acc'])}", "", "")
        rows.append(
            (name, rec["objective"], str(rec["steps"]), f"{rec['wall_s']:.1f}", *extra, rec["sha256"][:12])
        )
    print_table(
        ["model", "objective", "steps", "wall s", "motion probe", "shape probe", "IICR(class)", "sha256"],
        rows,
    )
