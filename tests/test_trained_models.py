"""The tiny-trained models (issue 16 items 2 and 3): informative encoders against their random
twins, the synthetic evaluator's classifier, reproducible builds and `pipeline models build`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stages.common.synth import SEED_OFFSETS, SHAPES, render_clips, render_shape_clips, render_video

# Margins (trained minus random twin, held-out probe accuracy, absolute) each informative encoder
# should beat on the task it is meant for. MEASURED with the default (the demo's) recipe, 384 probe
# clips, seed 0 (BENCHMARKS.md "Informative tiny encoders"): videomae motion -1.0 points (29.2 % vs
# 30.2 %, chance 25 %), dino shape -6.4 points (30.7 % vs 37.1 %, chance 33 %): not informative yet.
# The margin test is a strict xfail that says so until a recipe reaches these margins.
VIDEOMAE_MOTION_MARGIN = 0.10
DINO_SHAPE_MARGIN = 0.10
# The weight-free target (stages.common.models.hog) against its random-filter twin, on the motion probe.
# MEASURED (same probe set): hog 100 % vs random-hog 28.1 %, a 72-point margin; we ask for 50.
HOG_MOTION_MARGIN = 0.50


def _short_recipe(seed: int = 0):
    from stages.common.pretrain import PretrainConfig
    from stages.common.synth_classifier import ClassifierConfig
    from stages.common.trained import TrainedRecipe

    return TrainedRecipe(
        seed=seed,
        pretrain_clips=8,
        videomae=PretrainConfig(objective="mae", steps=2, batch_size=4, warmup=1),
        dino=PretrainConfig(objective="distill", steps=2, batch_size=4, warmup=1),
        classifier=ClassifierConfig(train_clips=8, test_clips=4, steps=2, batch_size=4),
    )


@pytest.fixture(scope="session")
def trained():
    """The default recipe's classifier, built once per session in the session's model home (the
    demo's, shared with the demo and --eval-every tests)."""
    from stages.common.trained import trained_models

    return trained_models(names=["classifier"])


@pytest.fixture(scope="session")
def probes():
    """Every default-recipe model (built once per session in the session's model home) and its
    probes, as `pipeline models build` runs them."""
    from stages.common.trained import TrainedRecipe, trained_models
    from stages.evaluate.probe import probe_models, recipe_probe

    cfg, render = recipe_probe(TrainedRecipe())
    return probe_models(trained_models(), cfg, None, render)


def test_in_memory_clips_use_their_own_seed_streams():
    clips, labels = render_clips(3, 5, SEED_OFFSETS["probe"], classes=2, frames=4, size=32)
    assert labels.tolist() == [0, 1, 0]
    again = render_video(np.random.default_rng([5, SEED_OFFSETS["probe"] + 2]), 0, 4, 32)
    np.testing.assert_array_equal(clips[2], again)
    # the written dataset's video 0 (make_synthetic draws [seed, i]) is not among them
    assert not np.array_equal(clips[0], render_video(np.random.default_rng([5, 0]), 0, 4, 32))
    shapes_a, idx_a = render_shape_clips(12, 1, SEED_OFFSETS["probe_shape"], frames=3, size=32)
    shapes_b, idx_b = render_shape_clips(12, 1, SEED_OFFSETS["probe_shape"], frames=3, size=32)
    np.testing.assert_array_equal(shapes_a, shapes_b)
    assert shapes_a.shape == (12, 3, 32, 32, 3) and set(idx_a.tolist()) == set(range(len(SHAPES)))


def test_short_build_is_reproducible(tmp_path, one_thread):
    from stages.common.trained import TRAINED_NAMES, trained_models

    a = trained_models(tmp_path / "a", _short_recipe())
    b = trained_models(tmp_path / "b", _short_recipe())
    assert list(a) == list(TRAINED_NAMES)
    assert {n: r["sha256"] for n, r in a.items()} == {n: r["sha256"] for n, r in b.items()}
    assert a["videomae"]["sha256"] != a["random-videomae"]["sha256"]  # pretraining changed the weights
    other = trained_models(tmp_path / "a", _short_recipe(seed=1))
    assert other["dino"]["folder"] != a["dino"]["folder"]
    assert other["dino"]["sha256"] != a["dino"]["sha256"]


def test_random_twin_is_the_pretraining_start_and_loads_like_a_checkpoint(tmp_path):
    from stages.common.models.encoders import load_encoder
    from stages.common.trained import trained_models

    rec = trained_models(tmp_path, _short_recipe(), names=["random-videomae", "random-dino"])
    vm = load_encoder("videomae", rec["random-videomae"]["folder"])
    dino = load_encoder("dino", rec["random-dino"]["folder"])
    clip = torch.from_numpy(render_clips(1, 0, SEED_OFFSETS["probe"])[0])
    assert vm.input_size == 64 and vm.features(clip).shape == (1, 4, 4, 4, 64)
    assert dino.input_size == 56 and dino.features(clip).shape == (1, 8, 4, 4, 64)


def test_a_cache_of_another_recipe_is_refused(tmp_path):
    from stages.common.trained import RECIPE_FILE, trained_models

    rec = trained_models(tmp_path, _short_recipe(), names=["random-dino"])
    path = f"{rec['random-dino']['folder']}/{RECIPE_FILE}"
    info = json.loads(open(path).read())
    info["recipe"]["dino"]["steps"] = 999
    open(path, "w").write(json.dumps(info))
    with pytest.raises(ValueError, match="was built from another recipe"):
        trained_models(tmp_path, _short_recipe(), names=["random-dino"])


def test_classifier_holds_out_95_percent(trained):
    """The evaluator's classifier on held-out clips of the demo's kind (seeds no training clip used)."""
    from stages.common.synth_classifier import classifier_data
    from stages.common.synth_eval import SynthEvaluator
    from stages.common.trained import TrainedRecipe, recipe_render

    rec = trained["classifier"]
    assert rec["heldout_acc"] >= 0.95, rec
    ev = SynthEvaluator.load(rec["folder"])
    assert ev.sha256 == rec["sha256"] and ev.reference is not None  # the reference is stored with it
    recipe = TrainedRecipe()
    test_clips, test_labels = classifier_data(recipe.classifier, recipe_render(recipe))["test"]
    ev.reference_stats(test_clips[:128])
    res = ev.evaluate(test_clips[128:], test_labels[128:])
    assert res["synth_class_acc"] >= 0.95
    # wrong labels score low; noise videos are far from the real clips in feature space
    wrong = ev.evaluate(test_clips[128:], (test_labels[128:] + 1) % 4)
    assert wrong["synth_class_acc"] < 0.1
    noise = np.random.default_rng(0).integers(0, 256, test_clips[128:].shape, dtype=np.uint8)
    assert ev.evaluate(noise)["synth_frechet"] > 10 * res["synth_frechet"]


def test_evaluator_input_rule(trained, tmp_path):
    from stages.common.synth_eval import SynthEvaluator

    ev = SynthEvaluator.load(trained["classifier"]["folder"])
    clips, labels = render_clips(16, 3, SEED_OFFSETS["classifier_test"] + 50_000, frames=12, size=96)
    cache = tmp_path / "ref.npz"
    ref = ev.reference_stats(clips, cache=cache)  # 12 frames at 96 px: first 8 frames, resized
    assert cache.is_file() and ev.reference_stats(clips[:2], cache=cache).n == ref.n == 16
    res = ev.evaluate(clips, labels)
    assert set(res) == {"synth_class_acc", "synth_frechet"} and 0 <= res["synth_class_acc"] <= 1
    assert res["synth_frechet"] < 1e-2 * max(
        1.0, float(np.trace(ref.sigma))
    )  # the reference set against itself
    with pytest.raises(ValueError, match="needs at least 8"):
        ev.evaluate(clips[:, :4], labels)
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        ev.evaluate(clips, labels + 4)
    with pytest.raises(FileNotFoundError, match="pipeline models build"):
        SynthEvaluator.load(tmp_path)


@pytest.mark.xfail(
    strict=True,
    reason="measured: the ~2-minute pretraining recipes do not beat their random twins (videomae motion "
    "-1.0 points, dino shape -6.4 points; BENCHMARKS.md, Informative tiny encoders)",
)
def test_informative_encoders_beat_their_random_twins(probes):
    vm, vm_rand = probes["videomae"], probes["random-videomae"]
    dino, dino_rand = probes["dino"], probes["random-dino"]
    assert vm["motion"]["test_acc"] - vm_rand["motion"]["test_acc"] >= VIDEOMAE_MOTION_MARGIN, (vm, vm_rand)
    assert dino["shape"]["test_acc"] - dino_rand["shape"]["test_acc"] >= DINO_SHAPE_MARGIN, (dino, dino_rand)
    for r in probes.values():
        assert r["iicr"]["intra"] is not None and r["iicr"]["inter_class"] is not None


def test_weight_free_target_beats_its_random_twin(probes):
    hog, rand = probes["hog"], probes["random-hog"]
    assert hog["motion"]["test_acc"] - rand["motion"]["test_acc"] >= HOG_MOTION_MARGIN, (hog, rand)
    assert hog["motion"]["test_acc"] >= 0.9 and hog["iicr"]["inter_class"] is not None


def test_models_build_command(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    args = ["models", "build", "--out", str(tmp_path), "--pretrain-steps", "2", "--classifier-steps", "2",
            "--probe-clips", "16"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "random-videomae" in result.output and "shape probe" in result.output
    summary = next(tmp_path.rglob("models.json"))
    assert set(json.loads(summary.read_text())["probes"]) == {
        "videomae",
        "random-videomae",
        "dino",
        "random-dino",
        "hog",
        "random-hog",
    }
    bad = CliRunner().invoke(main, ["models", "build", "--out", str(tmp_path), "--pretrain-steps", "0"])
    assert bad.exit_code == 2 and "--pretrain-steps" in bad.output
