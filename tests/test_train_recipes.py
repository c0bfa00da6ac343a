"""Alignment recipes in the trainer: per-encoder weights, schedules, the end of alignment (projectors
leave the optimizer and the checkpoints, the loader stops reading targets), exact resume across the
switch, and compact (int8) shards training like float16 ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import checkpoint_weights, make_shards
from helpers import tiny_train_config as tiny
from safetensors.torch import load_file

from cache_schema import RunDir
from stages.train import data as D
from stages.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=32, per_shard=8)


def test_alignment_ends_for_good_and_targets_are_never_decoded_after(
    shards: Path, tmp_path: Path, monkeypatch
) -> None:
    run = tmp_path / "run"
    counts = {"samples": 0, "target_bytes": 0}  # what the loader decoded (no workers: this process)
    real_decode = D.DecodeSamples.decode

    def counting_decode(self, sample):
        out = real_decode(self, sample)
        counts["samples"] += 1
        counts["target_bytes"] += out["target_bytes"]
        return out

    monkeypatch.setattr(D.DecodeSamples, "decode", counting_decode)
    summary = train(tiny(shards, run, steps=5, align_until=2, checkpoint_every=5), progress=False)
    rows = RunDir(run).read_log()
    assert [r["align_weight"] for r in rows] == [{"dino": 0.5, "sam2": 0.5}] * 2 + [{}] * 3
    assert all(r["align_loss"] == 0 and r["cos_sim"] == {} for r in rows[2:])
    assert all(r["loss"] == pytest.approx(r["flow_loss"]) for r in rows[2:])
    # two steps of 4 targets, plus the shuffle buffer's read-ahead of the full set, and not one byte after
    decoded = counts["target_bytes"]
    per_sample = 4 * 4 * 4 * (8 + 16) * 2  # T*H*W*(dino+sam2 dims) float16 bytes
    assert decoded <= (2 * 4 + 8) * per_sample
    assert counts["samples"] >= 5 * 4
    # the projectors are gone from the checkpoint and the optimizer
    final = RunDir(run).latest_checkpoint()
    assert not (final / "projectors.safetensors").exists()
    state = torch.load(final / "train_state.pt", weights_only=True)
    assert [g["name"] for g in state["optimizer"]["param_groups"]] == ["model"]
    assert summary["step"] == 5


def test_batches_after_the_switch_carry_no_target_bytes(shards: Path) -> None:
    import cache_schema
    from stages.train.loop import RunSetup, loader_specs

    layout = cache_schema.read_shard_layout(shards)
    setup = RunSetup(layout, cache_schema.encoder_entries(layout), {"dino": 0.5, "sam2": 0.5}, None)
    full, lean = loader_specs(tiny(shards, shards / "unused"), setup, segment_steps=4, pin=False)
    full.num_workers = lean.num_workers = 2
    stream = D.iterate_steps(full, 0, lean=lean, switch_after=3)
    try:
        sizes = [next(stream)[0]["target_bytes"] for _ in range(6)]
    finally:
        stream.close()
    assert all(s > 0 for s in sizes[:3]) and sizes[3:] == [0, 0, 0]


@pytest.mark.parametrize("stop_at", [2, 5])
def test_resume_before_and_after_the_switch_equals_a_straight_run(
    shards: Path, tmp_path: Path, stop_at
) -> None:
    common = dict(align_until=3, checkpoint_every=4, align_schedule="linear", grad_accum=2, batch_size=3)
    train(tiny(shards, tmp_path / "straight", steps=7, **common), progress=False)
    train(tiny(shards, tmp_path / "split", steps=stop_at, **common), progress=False)
    train(tiny(shards, tmp_path / "split", steps=7, resume=True, **common), progress=False)
    a, b = RunDir(tmp_path / "straight"), RunDir(tmp_path / "split")
    for part in ("model", "ema"):
        wa, wb = (
            checkpoint_weights(a.latest_checkpoint() / part),
            checkpoint_weights(b.latest_checkpoint() / part),
        )
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")
    la, lb = a.read_log(), b.read_log()
    assert [r["step"] for r in lb] == list(range(1, 8))
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-5)
    # the linear schedule reaches 0 at the end of alignment: 1, 2/3, 1/3 of lambda
    np.testing.assert_allclose(
        [r["align_weight"].get("dino", 0) for r in la[:4]], [0.5, 1 / 3, 1 / 6, 0], atol=1e-9
    )


def test_alignment_off_reads_targets_only_on_log_steps(shards: Path, tmp_path: Path) -> None:
    """lambda 0: the frozen projectors only measure, on log steps; other steps move latents only."""
    run = tmp_path / "run"
    train(tiny(shards, run, steps=4, align_lambda=0.0, log_every=3, checkpoint_every=4), progress=False)
    rows = RunDir(run).read_log()
    assert [r["step"] for r in rows] == [3, 4] and all(set(r["cos_sim"]) == {"dino", "sam2"} for r in rows)
    assert all(r["align_loss"] == 0 and r["align_weight"] == {} for r in rows)


def test_per_encoder_weights_reach_the_loss(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(shards, run, steps=3, align_lambda="dino=0.0,sam2=1.0", checkpoint_every=3), progress=False)
    rows = RunDir(run).read_log()
    assert rows[-1]["align_weight"] == {"dino": 0.0, "sam2": 1.0}
    # only sam2 contributes: align_loss = (1/2) * 1.0 * (-cos_sam2)
    assert rows[-1]["align_loss"] == pytest.approx(-0.5 * rows[-1]["cos_sim"]["sam2"], rel=1e-4)
    # the dino projector (weight 0) never moved; the sam2 projector did
    saved = load_file(RunDir(run).latest_checkpoint() / "projectors.safetensors")
    initial = _init_head(run)
    assert saved.keys() == initial.keys()
    moved = {k.split(".")[1] for k in saved if not torch.equal(saved[k], initial[k])}
    assert moved == {"sam2"}


def _init_head(run: Path) -> dict[str, torch.Tensor]:
    """The projectors as a fresh run of this config initialises them (same seed, same order)."""
    import cache_schema
    from stages.train.state import build_state

    cfg = tiny(Path("."), run, align_lambda="dino=0.0,sam2=1.0")
    layout = cache_schema.read_shard_layout(RunDir(run).read_config()["shards"])
    state = build_state(cfg, layout, {"dino": 8, "sam2": 16}, {"dino": 0.0, "sam2": 1.0}, torch.device("cpu"))
    return state.head.state_dict()


@pytest.mark.parametrize("projector,norm", [("conv", "token"), ("mlp", "spatial")])
def test_irepa_options_train(shards: Path, tmp_path: Path, projector, norm) -> None:
    run = tmp_path / "run"
    train(tiny(shards, run, steps=2, projector=projector, target_norm=norm), progress=False)
    rows = RunDir(run).read_log()
    assert np.isfinite([r["loss"] for r in rows]).all() and set(rows[-1]["cos_sim"]) == {"dino", "sam2"}
    keys = load_file(RunDir(run).latest_checkpoint() / "projectors.safetensors").keys()
    assert any(".conv." in k for k in keys) == (projector == "conv")


def test_int8_shards_train_like_float16_on_the_same_batches(tmp_path: Path) -> None:
    f16 = make_shards(tmp_path / "f16", num_samples=24, per_shard=8, fmt="float16")
    i8 = make_shards(tmp_path / "i8", num_samples=24, per_shard=8, fmt="int8")
    rows = {}
    for name, folder in (("f16", f16), ("i8", i8)):
        train(tiny(folder, tmp_path / f"run-{name}", steps=8, checkpoint_every=8), progress=False)
        rows[name] = RunDir(tmp_path / f"run-{name}").read_log()
    # same seeds, same samples: int8 targets (cosine >= 0.9999 to float16) barely move the losses
    flow = np.array([[r["flow_loss"] for r in rows[k]] for k in ("f16", "i8")])
    align = np.array([[r["align_loss"] for r in rows[k]] for k in ("f16", "i8")])
    np.testing.assert_allclose(flow[0], flow[1], rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(align[0], align[1], rtol=2e-3, atol=2e-4)


@pytest.mark.gpu
def test_device_prefetch_copies_on_a_side_stream_and_matches_the_cpu(shards: Path) -> None:
    import cache_schema
    from stages.train.loop import RunSetup, loader_specs
    from stages.train.step import StepConfig, prepare_batch

    layout = cache_schema.read_shard_layout(shards)
    setup = RunSetup(layout, cache_schema.encoder_entries(layout), {"dino": 0.5, "sam2": 0.5}, None)
    full, _ = loader_specs(tiny(shards, shards / "unused"), setup, segment_steps=4, pin=True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    prefetch = D.DevicePrefetch(D.iterate_steps(full, 0), cuda)
    plain = D.iterate_steps(full, 0)
    try:
        for _ in range(3):
            (on_gpu,), (on_cpu,) = next(prefetch), next(plain)
            assert on_gpu["device_buffer"].is_cuda
            a = prepare_batch(on_gpu, StepConfig(device=cuda, encoders=setup.encoders, frames=4))
            b = prepare_batch(on_cpu, StepConfig(device=cpu, encoders=setup.encoders, frames=4))
            torch.testing.assert_close(a["x0"].cpu(), b["x0"])
            for name in setup.encoders:
                torch.testing.assert_close(a["targets"][name].cpu(), b["targets"][name], rtol=1e-5, atol=1e-6)
    finally:
        prefetch.close()
        plain.close()
