"""`--eval-every`: a fixed, seeded sample set from the EMA weights every N steps (and at the last),
scored by the synthetic-domain evaluator, logged in log.jsonl and TensorBoard; a resumed run
continues the series exactly. Runs on pixel-space (patchify-8) shards of flat synthetic videos."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tiny_extract_config, tiny_train_config

from cache_schema import RunDir
from stages.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pixel_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages.common.synth import make_synthetic
    from stages.extract.runner import run_extract
    from stages.pack.packer import PackConfig, run_pack

    root = tmp_path_factory.mktemp("pixel")
    make_synthetic(
        root / "data", videos=8, classes=4, frames=8, size=32, seed=0, background="flat", progress=False
    )
    cfg = tiny_extract_config(root / "data", root / "st.zarr", encoders=["dino"], size=32, vae_kind="pixel",
                              vae="patchify-8", patch_size=4)  # fmt: skip
    run_extract(cfg)
    run_pack(
        PackConfig(cache=str(root / "st.zarr"), out=str(root / "shards"), samples_per_shard=4, progress=False)
    )
    return root / "shards"


@pytest.fixture(scope="module")
def evaluator() -> str:
    from stages.common.trained import trained_models

    return trained_models(names=["classifier"])["classifier"]["folder"]


def _config(shards: Path, out: Path, evaluator: str, **over):
    values = dict(model="mini/4", prediction="sample", steps=6, log_every=2, checkpoint_every=3, eval_every=3,
                  eval_num=4, eval_steps=2, eval_cfg=1.5, eval_evaluator=evaluator, sample_every=0)  # fmt: skip
    values.update(over)
    return tiny_train_config(shards, out, **values)


def _evals(run: Path) -> dict[int, dict]:
    return {r["step"]: r["eval"] for r in RunDir(run).read_log() if "eval" in r}


def test_eval_every_logs_at_its_steps_and_a_resume_continues_the_series(pixel_shards, evaluator, tmp_path):
    whole = tmp_path / "whole"
    train(_config(pixel_shards, whole, evaluator), progress=False)
    rows = RunDir(whole).read_log()
    assert [r["step"] for r in rows] == [2, 3, 4, 6]  # log steps plus the evaluation step 3
    series = _evals(whole)
    assert sorted(series) == [3, 6]
    for scores in series.values():
        assert set(scores) == {"synth_class_acc", "synth_frechet"}
        assert 0.0 <= scores["synth_class_acc"] <= 1.0 and scores["synth_frechet"] >= 0.0

    # the same run killed after step 3 and resumed: the series continues exactly
    split = tmp_path / "split"
    train(_config(pixel_shards, split, evaluator, steps=3), progress=False)
    assert sorted(_evals(split)) == [3]
    train(_config(pixel_shards, split, evaluator, resume=True), progress=False)
    assert _evals(split) == series

    # TensorBoard holds the same numbers under eval/<metric>
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(RunDir(whole).tensorboard))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("eval/synth_class_acc")}
    assert logged == pytest.approx({s: v["synth_class_acc"] for s, v in series.items()})


def test_eval_every_refuses_a_resume_that_changes_the_series(pixel_shards, evaluator, tmp_path):
    run = tmp_path / "run"
    train(_config(pixel_shards, run, evaluator, steps=3), progress=False)
    with pytest.raises(ValueError, match="eval_num"):
        train(_config(pixel_shards, run, evaluator, resume=True, eval_num=8), progress=False)


def test_eval_every_computes_fvd_against_real_stats_with_the_samples_protocol(pixel_shards, tmp_path):
    """`--eval-metric fvd`: the samples' FVD under the real stats file's protocol, equal to the FVD of
    the same videos computed by the evaluate stage's own path (features of an .npz of videos)."""
    import numpy as np

    from stages.common import fvd
    from stages.common.models.vae import VAEWrapper
    from stages.common.sampling import generate_latents
    from stages.common.tiny_i3d import make_tiny_i3d
    from stages.sample.checkpoint import load_model, resolve_checkpoint

    weights = make_tiny_i3d(tmp_path / "i3d.pt", features=16, seed=0)
    data = pixel_shards.parent / "data"
    cfg = fvd.EvalConfig(detector_weights=str(weights), frames=8, resolution=32, num_videos=8, progress=False)
    real = fvd.compute_stats(fvd.build_detector(cfg), data, cfg)
    real.save(tmp_path / "real.npz")
    run = tmp_path / "run"
    train(_config(pixel_shards, run, None, steps=3, eval_every=3, eval_metric="fvd",
                  eval_real_stats=str(tmp_path / "real.npz"), eval_detector_weights=str(weights)), progress=False)  # fmt: skip
    logged = _evals(run)[3]["fvd"]

    # the same sample set, decoded and scored through the evaluate stage's file path
    resolved = resolve_checkpoint(str(run), None, ema=True)
    adapter = load_model(resolved)
    latents, labels = generate_latents(adapter, adapter.module, 4, steps=2, seed=0, cfg_scale=1.5)
    videos = VAEWrapper.load("patchify-8", kind="pixel").decode(latents).numpy()
    np.savez(tmp_path / "fake.npz", videos=videos, labels=labels)
    expected = fvd.compute_fvd(tmp_path / "real.npz", tmp_path / "fake.npz", cfg)["value"]
    assert logged == pytest.approx(expected, rel=1e-5)
