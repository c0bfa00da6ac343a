"""FVD detectors, stats protocol, Frechet distance and the `pipeline evaluate` command."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import make_run, tiny_dit

from pipeline.cli import main
from stages.common import fvd
from stages.common.detectors import DetectorError, load_detector, load_videomae_v2
from stages.common.tiny_i3d import make_tiny_i3d

cdfvd_vit = pytest.importorskip("cdfvd.third_party.VideoMAEv2.videomaev2_finetune")
cdfvd_vmae_utils = pytest.importorskip("cdfvd.third_party.VideoMAEv2.utils")
cdfvd_i3d_utils = pytest.importorskip("cdfvd.third_party.i3d.utils")


def _script_i3d(path: Path, features: int) -> Path:
    return make_tiny_i3d(path, features=features, seed=0)


@pytest.fixture(scope="module")
def i3d_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _script_i3d(tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt", 400)


@pytest.fixture(scope="module")
def small_i3d_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same signature, 24-d output: keeps the 3 sqrtm calls of the CLI test cheap on 2 cores."""
    return _script_i3d(tmp_path_factory.mktemp("i3d") / "i3d_small.pt", 24)


def _tiny_vit(heads: int, init_values: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    model = cdfvd_vit.VisionTransformer(
        img_size=224,
        patch_size=56,
        embed_dim=64 * heads,
        depth=2,
        num_heads=heads,
        mlp_ratio=48 / 11,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_classes=7,
        all_frames=16,
        tubelet_size=2,
        use_mean_pooling=True,
        init_values=init_values,
    ).eval()
    with torch.no_grad():  # move norms/biases off their trivial init so a wrong mapping shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


# an FVD protocol as stats files recorded it before the real-subset fields existed
PROTOCOL = {
    "detector": "i3d",
    "weights_sha256": "ab",
    "frames": 16,
    "frame_stride": 1,
    "resolution": 256,
    "count": 8,
}


def _fvd_args(real: Path, fake: Path, out: Path | None = None) -> list[str]:
    """`pipeline evaluate fvd --real REAL --fake FAKE [--out OUT]`."""
    args = ["evaluate", "fvd", "--real", str(real), "--fake", str(fake)]
    return args if out is None else [*args, "--out", str(out)]


def _i3d_args(weights: Path, frames: int, resolution: int) -> list[str]:
    """The tiny I3D detector (`weights`) on the CPU, clips of `frames` frames at `resolution` px."""
    args = ["--detector", "i3d", "--detector-weights", str(weights), "--frames", str(frames)]
    return [*args, "--resolution", str(resolution), "--device", "cpu"]


def _videos(n: int, t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, t, h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- detectors


def test_i3d_torchscript_protocol_matches_reference_preprocessing(i3d_path: Path) -> None:
    det = load_detector("i3d", i3d_path)
    videos = _videos(3, 8, 40, 56)
    ours = det.features(videos)
    model = torch.jit.load(str(i3d_path))
    with torch.no_grad():
        ref = model(
            cdfvd_i3d_utils.preprocess_i3d(videos), rescale=False, resize=False, return_features=True
        ).numpy()
    assert ours.shape == (3, 400) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert len(det.weights_sha256) == 64


@pytest.mark.parametrize("wrap,heads,init_values", [("module", 1, 0.0), ("plain", 2, 0.1)])
def test_videomae_v2_original_checkpoint_matches_reference(
    tmp_path: Path, wrap: str, heads: int, init_values: float
) -> None:
    model = _tiny_vit(heads, init_values)
    sd = model.state_dict()
    path = tmp_path / "vit_tiny_ssv2_ft.pth"
    torch.save({"module": sd} if wrap == "module" else sd, path)
    # 1 head is what the 64-d-per-head rule infers for width 64; 2 heads must be passed
    det = load_videomae_v2(path, num_heads=None if heads == 1 else heads)
    videos = _videos(2, 16, 48, 40)
    ours = det.features(videos)
    with torch.no_grad():
        ref = model.forward_features(cdfvd_vmae_utils.preprocess_videomae(videos)).numpy()
    assert ours.shape == (2, 64 * heads)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    assert det.feature_dim == 64 * heads


def test_videomae_v2_rejects_bad_inputs(tmp_path: Path) -> None:
    model = _tiny_vit(1)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict()}, path)
    det = load_videomae_v2(path)
    with pytest.raises(ValueError, match="16 frames"):
        det.features(_videos(1, 8, 32, 32))
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("fc_norm")}
    torch.save(sd, path)
    with pytest.raises(DetectorError, match="fc_norm"):
        load_videomae_v2(path)
    with pytest.raises(DetectorError, match="--detector-weights"):
        load_detector("videomae-v2", tmp_path / "missing.pth")


# --------------------------------------------------------------------------- distance and stats


def _eig_frechet(mu1, s1, mu2, s2) -> float:
    """Independent float64 route: Tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1)))."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(
        ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    )


def test_frechet_distance_matches_eigen_computation() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 12))
    b = rng.normal(size=(150, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    proto = {"detector": "x", "count": 0}
    sa, sb = fvd.stats_from_features(a, proto), fvd.stats_from_features(b, proto)
    ours = fvd.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert ours == pytest.approx(_eig_frechet(sa.mu, sa.sigma, sb.mu, sb.sigma), rel=1e-8)
    assert fvd.frechet_distance(sa.mu, sa.sigma, sa.mu, sa.sigma) == pytest.approx(0.0, abs=1e-8)
    shift = np.full(12, 0.5)
    assert fvd.frechet_distance(sa.mu, sa.sigma, sa.mu + shift, sa.sigma) == pytest.approx(3.0, abs=1e-8)
    np.testing.assert_allclose(sa.sigma, np.cov(a, rowvar=False, bias=True), atol=1e-12)


def test_stats_warn_when_fewer_videos_than_dims() -> None:
    with pytest.warns(UserWarning, match="rank-deficient"):
        st = fvd.stats_from_features(np.random.default_rng(0).normal(size=(5, 16)), {"count": 5})
    assert any("rank-deficient" in w for w in st.warnings)


def test_stats_of_different_protocols_are_refused(tmp_path: Path) -> None:
    base = dict(PROTOCOL)
    feats = np.random.default_rng(0).normal(size=(40, 4))
    fvd.stats_from_features(feats, base).save(tmp_path / "a.npz")
    fvd.stats_from_features(feats, {**base, "frames": 8}).save(tmp_path / "b.npz")
    loaded = fvd.FeatureStats.load(tmp_path / "a.npz")
    assert loaded.protocol == base and loaded.n == 40 and loaded.fingerprint == fvd.protocol_fingerprint(base)
    with pytest.raises(fvd.ProtocolMismatch, match="'frames'") as info:
        fvd.compute_fvd(tmp_path / "a.npz", tmp_path / "b.npz", fvd.EvalConfig())
    assert info.value.field == "frames"
    res = CliRunner().invoke(main, _fvd_args(tmp_path / "a.npz", tmp_path / "b.npz"))
    assert res.exit_code != 0 and "'frames'" in res.output
    res = CliRunner().invoke(main, _fvd_args(tmp_path / "a.npz", tmp_path / "a.npz"))
    assert res.exit_code == 0, res.output
    assert "FVD" in res.output


# --------------------------------------------------------------------------- the command


def test_evaluate_commands_on_real_video_files(
    synth_videos: Path, small_i3d_path: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    common = _i3d_args(small_i3d_path, 8, 64)
    common += ["--frame-stride", "1", "--num-videos", "6", "--batch-size", "4"]
    stats_path, feats_path = tmp_path / "real_stats.npz", tmp_path / "real_feats.npz"
    res = runner.invoke(
        main, ["evaluate", "stats", "--videos", str(synth_videos), "--out", str(stats_path), *common]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        main, ["evaluate", "features", "--videos", str(synth_videos), "--out", str(feats_path), *common]
    )
    assert res.exit_code == 0, res.output
    st = fvd.FeatureStats.load(stats_path)
    with np.load(feats_path) as data:
        feats = data["features"]
    assert feats.shape == (6, 24) and st.n == 6
    assert st.protocol["frames"] == 8 and st.protocol["resolution"] == 64 and st.protocol["count"] == 6
    np.testing.assert_allclose(st.mu, feats.astype(np.float64).mean(0), atol=1e-6)

    fake = tmp_path / "fake.npz"
    np.savez(fake, videos=_videos(6, 10, 80, 96, seed=3))  # other size/length: cut + cropped to protocol
    cache = tmp_path / "cache"
    out = tmp_path / "eval"
    args = [*_fvd_args(synth_videos, fake, out), "--cache-dir", str(cache)]
    res = runner.invoke(main, [*args, *common])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "fvd" and metrics["value"] > 0 and np.isfinite(metrics["value"])
    assert metrics["n_real"] == 6 and metrics["n_fake"] == 6
    assert metrics["protocol"]["weights_sha256"] == st.protocol["weights_sha256"]
    assert len(list(cache.glob("*.npz"))) == 1

    res = runner.invoke(main, [*args, *common])  # real stats now come from the cache
    again = json.loads((out / "metrics.json").read_text())
    assert res.exit_code == 0 and again["value"] == pytest.approx(metrics["value"], rel=1e-9)
    assert any("from cache" in w for w in again["warnings"])

    res = runner.invoke(main, [*_fvd_args(stats_path, synth_videos, out), *common])
    same = json.loads((out / "metrics.json").read_text())
    assert res.exit_code == 0, res.output
    assert abs(same["value"]) < 1e-3 * metrics["value"]  # same videos, same protocol -> ~0


def test_detector_weights_missing_is_a_clear_error(synth_videos: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main,
        [
            "evaluate",
            "stats",
            "--videos",
            str(synth_videos),
            "--detector",
            "i3d",
            "--out",
            str(tmp_path / "s.npz"),
        ],
    )
    assert res.exit_code != 0 and "--detector-weights" in res.output


def test_cd_fvd_features_command_with_videomae_v2(tmp_path: Path) -> None:
    model = _tiny_vit(2, seed=1)
    ckpt = tmp_path / "vit_tiny.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    videos = _videos(3, 16, 32, 32, seed=5)
    npz = tmp_path / "videos.npz"
    np.savez(npz, videos=videos)
    out = tmp_path / "feats.npz"
    args = ["evaluate", "features", "--videos", str(npz), "--out", str(out), "--detector", "videomae-v2"]
    args += ["--detector-weights", str(ckpt), "--resolution", "32", "--num-videos", "3"]
    args += ["--set", "num_heads=2"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    with np.load(out) as data:
        feats, protocol = data["features"], json.loads(str(data["protocol"]))
    with torch.no_grad():
        ref = model.forward_features(cdfvd_vmae_utils.preprocess_videomae(videos)).numpy()
    np.testing.assert_allclose(feats, ref, atol=1e-4)
    assert protocol["detector"] == "videomae-v2" and protocol["frames"] == 16


def test_sample_then_evaluate_round_trip(
    synth_videos: Path, small_i3d_path: Path, tiny_vae: Path, tmp_path: Path
) -> None:
    """A run directory (train stage layout) -> `pipeline sample` -> videos.npz -> `pipeline evaluate fvd`."""
    torch.manual_seed(0)
    dit = tiny_dit(num_frames=4, num_classes=2)
    weights = {"step-0000001/model": dit, "step-0000001/ema": dit}
    run = make_run(tmp_path / "run", tiny_vae, weights, latest="step-0000001")

    samples = tmp_path / "samples"
    res = CliRunner().invoke(
        main, ["sample", "--run", str(run), "--out", str(samples), "--num", "5", "--steps", "2"]
    )
    assert res.exit_code == 0, res.output
    out = tmp_path / "eval"
    args = [*_fvd_args(synth_videos, samples / "videos.npz", out), *_i3d_args(small_i3d_path, 4, 16)]
    args += ["--num-videos", "5", "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_fake"] == 5 and metrics["n_real"] == 5 and metrics["value"] > 0


# --------------------------------------------------------------------------- real subset rule


def test_subset_rule_is_uniform_without_replacement_and_seeded() -> None:
    cfg = fvd.EvalConfig(num_videos=3)
    assert fvd.subset_indices(6, cfg) == [0, 1, 2] and fvd.subset_indices(2, cfg) == [0, 1]
    picks = [
        fvd.subset_indices(6, fvd.EvalConfig(num_videos=3, real_subset="random", subset_seed=s))
        for s in range(2000)
    ]
    assert all(len(set(p)) == 3 and p == sorted(p) and max(p) < 6 for p in picks)
    freq = np.bincount(np.concatenate(picks), minlength=6) / len(picks)
    np.testing.assert_allclose(freq, 0.5, atol=0.04)  # each video is in a uniform 3-of-6 half the time
    assert len({tuple(p) for p in picks}) == 20  # all C(6, 3) subsets occur
    assert picks[7] == fvd.subset_indices(
        6, fvd.EvalConfig(num_videos=3, real_subset="random", subset_seed=7)
    )
    with pytest.raises(ValueError, match="real_subset must be one of first, random, got 'all'"):
        fvd.subset_indices(6, fvd.EvalConfig(real_subset="all"))


def test_old_stats_keep_their_fingerprint_and_subsets_are_protocol_fields() -> None:
    import hashlib

    from cache_schema import canonical_json

    old = dict(PROTOCOL)  # the six fields before the subset rule existed
    first = {**old, "real_subset": "first", "subset_seed": None}
    rand = {**old, "real_subset": "random", "subset_seed": 3}
    # the fingerprint before the subset rule existed: sha256 of the six fields
    assert fvd.protocol_fingerprint(old) == hashlib.sha256(canonical_json(old).encode()).hexdigest()
    assert fvd.protocol_fingerprint(first) == fvd.protocol_fingerprint(old)
    fvd.check_same_protocol(old, first)  # an old default stats file stays comparable
    assert fvd.protocol_fingerprint(rand) != fvd.protocol_fingerprint(first)
    assert fvd.protocol_fingerprint(rand) != fvd.protocol_fingerprint({**rand, "subset_seed": 4})
    with pytest.raises(fvd.ProtocolMismatch, match="'real_subset' is 'first'") as info:
        fvd.check_same_protocol(old, rand)
    assert info.value.field == "real_subset"
    with pytest.raises(fvd.ProtocolMismatch, match="'subset_seed'"):
        fvd.check_same_protocol(rand, {**rand, "subset_seed": 4})


def test_random_real_subset_on_real_videos(synth_videos: Path, small_i3d_path: Path, tmp_path: Path) -> None:
    base = dict(detector="i3d", detector_weights=str(small_i3d_path), frames=8, resolution=64, batch_size=4)
    base.update(device="cpu", progress=False)
    det = fvd.build_detector(fvd.EvalConfig(**base))
    every, _ = fvd.extract_features(det, synth_videos, fvd.EvalConfig(num_videos=6, **base))
    assert len({tuple(np.round(f, 4)) for f in every}) == 6  # six distinguishable videos

    def rows(cfg: fvd.EvalConfig) -> list[int]:
        """Which of the six sorted videos a subset holds, by matching feature rows."""
        feats, _ = fvd.extract_features(det, synth_videos, cfg)
        return [int(np.abs(every - f).sum(1).argmin()) for f in feats]

    first = rows(fvd.EvalConfig(num_videos=3, **base))
    assert first == [0, 1, 2]  # sorted order: all three are class_00 videos
    cfg = fvd.EvalConfig(num_videos=3, real_subset="random", subset_seed=5, **base)
    picked = rows(cfg)
    assert picked == rows(cfg) and picked != first and len(set(picked)) == 3
    assert picked == fvd.subset_indices(6, cfg)
    other = next(
        s
        for s in range(1, 50)
        if fvd.subset_indices(6, fvd.EvalConfig(num_videos=3, real_subset="random", subset_seed=s)) != picked
    )
    assert rows(fvd.EvalConfig(num_videos=3, real_subset="random", subset_seed=other, **base)) != picked

    # recorded in the protocol (stats file, CLI), and a different subset is a different protocol
    st = fvd.compute_stats(det, synth_videos, cfg)
    assert st.protocol["real_subset"] == "random" and st.protocol["subset_seed"] == 5
    out = tmp_path / "stats.npz"
    args = ["evaluate", "stats", "--videos", str(synth_videos), "--out", str(out)]
    args += _i3d_args(small_i3d_path, 8, 64)
    args += ["--num-videos", "3", "--real-subset", "random", "--subset-seed", "5"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    saved = fvd.FeatureStats.load(out)
    assert saved.protocol == st.protocol and saved.fingerprint == st.fingerprint
    np.testing.assert_allclose(saved.mu, every[picked].astype(np.float64).mean(0), atol=1e-6)
    first_stats = fvd.compute_stats(det, synth_videos, fvd.EvalConfig(num_videos=3, **base))
    assert first_stats.protocol["real_subset"] == "first" and first_stats.protocol["subset_seed"] is None
    first_stats.save(tmp_path / "first.npz")
    res = CliRunner().invoke(main, _fvd_args(tmp_path / "first.npz", out))
    assert res.exit_code != 0 and "'real_subset'" in res.output


def test_stats_out_never_replaces_a_file_without_overwrite(
    synth_videos: Path, small_i3d_path: Path, tmp_path: Path
):
    target = tmp_path / "stats.npz"
    target.write_bytes(b"someone else's file")
    args = ["evaluate", "stats", "--videos", str(synth_videos), "--out", str(target), "--detector", "i3d",
            "--detector-weights", str(small_i3d_path), "--frames", "8", "--resolution", "64", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.output
    assert target.read_bytes() == b"someone else's file"
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0
