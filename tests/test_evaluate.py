"""FVD detectors, stats protocol, Frechet distance and the `pipeline evaluate` command."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from stages.evaluate import fvd
from stages.evaluate.detectors import DetectorError, load_detector, load_videomae_v2
from stages.evaluate.tiny import make_tiny_i3d

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
    base = {
        "detector": "i3d",
        "weights_sha256": "ab",
        "frames": 16,
        "frame_stride": 1,
        "resolution": 256,
        "count": 8,
    }
    feats = np.random.default_rng(0).normal(size=(40, 4))
    fvd.stats_from_features(feats, base).save(tmp_path / "a.npz")
    fvd.stats_from_features(feats, {**base, "frames": 8}).save(tmp_path / "b.npz")
    loaded = fvd.FeatureStats.load(tmp_path / "a.npz")
    assert loaded.protocol == base and loaded.n == 40 and loaded.fingerprint == fvd.protocol_fingerprint(base)
    with pytest.raises(fvd.ProtocolMismatch, match="'frames'") as info:
        fvd.compute_fvd(tmp_path / "a.npz", tmp_path / "b.npz", fvd.EvalConfig())
    assert info.value.field == "frames"
    res = CliRunner().invoke(
        main, ["evaluate", "fvd", "--real", str(tmp_path / "a.npz"), "--fake", str(tmp_path / "b.npz")]
    )
    assert res.exit_code != 0 and "'frames'" in res.output
    res = CliRunner().invoke(
        main, ["evaluate", "fvd", "--real", str(tmp_path / "a.npz"), "--fake", str(tmp_path / "a.npz")]
    )
    assert res.exit_code == 0, res.output
    assert "FVD" in res.output


# --------------------------------------------------------------------------- the command


def test_evaluate_commands_on_real_video_files(
    synth_videos: Path, small_i3d_path: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    common = [
        "--detector",
        "i3d",
        "--detector-weights",
        str(small_i3d_path),
        "--frames",
        "8",
        "--frame-stride",
        "1",
    ]
    common += ["--resolution", "64", "--num-videos", "6", "--batch-size", "4", "--device", "cpu"]
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
    args = [
        "evaluate",
        "fvd",
        "--real",
        str(synth_videos),
        "--fake",
        str(fake),
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
    ]
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

    res = runner.invoke(
        main,
        [
            "evaluate",
            "fvd",
            "--real",
            str(stats_path),
            "--fake",
            str(synth_videos),
            "--out",
            str(out),
            *common,
        ],
    )
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
    args += [
        "--detector-weights",
        str(ckpt),
        "--resolution",
        "32",
        "--num-videos",
        "3",
        "--set",
        "num_heads=2",
    ]
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
    import yaml

    from stages.common.dit import VideoDiT

    torch.manual_seed(0)
    vae = tiny_vae
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-0000001"
    dit = VideoDiT(
        in_channels=4, num_frames=4, sample_size=8, hidden_size=32, depth=2, num_heads=4, num_classes=2
    )
    dit.save_pretrained(step / "model")
    dit.save_pretrained(step / "ema")
    (run / "checkpoints" / "latest").write_text("step-0000001\n")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "tiny", "vae": str(vae), "latent_scale": 0.5}))

    samples = tmp_path / "samples"
    res = CliRunner().invoke(
        main, ["sample", "--run", str(run), "--out", str(samples), "--num", "5", "--steps", "2"]
    )
    assert res.exit_code == 0, res.output
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "fvd",
        "--real",
        str(synth_videos),
        "--fake",
        str(samples / "videos.npz"),
        "--out",
        str(out),
    ]
    args += [
        "--detector",
        "i3d",
        "--detector-weights",
        str(small_i3d_path),
        "--frames",
        "4",
        "--resolution",
        "16",
    ]
    args += ["--num-videos", "5", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_fake"] == 5 and metrics["n_real"] == 5 and metrics["value"] > 0
