"""IICR on known answers, against brute force, over a real zarr store and straight from videos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cache_schema import validate_store
from pipeline.cli import main
from stages.evaluate.iicr import INTER_MIN, format_table, iicr_from_array, iicr_from_store


def _brute(x: np.ndarray, vid: np.ndarray, lab: np.ndarray | None) -> dict[str, float]:
    """Pairwise cosines written out with explicit frame-by-frame matrices."""
    n, t = x.shape[:2]
    u = x.mean(axis=(2, 3)) if x.ndim == 5 else x
    u = u / np.linalg.norm(u, axis=-1, keepdims=True)
    intra = np.mean(
        [np.mean([u[i, a] @ u[i, b] for a in range(t) for b in range(t) if a != b]) for i in range(n)]
    )
    flat = u.reshape(n * t, -1)
    gram = flat @ flat.T
    fv = np.repeat(vid, t)
    out = {"intra": intra, "inter_video": gram[fv[:, None] != fv[None, :]].mean()}
    if lab is not None:
        fl = np.repeat(lab, t)
        ok = (fl[:, None] >= 0) & (fl[None, :] >= 0) & (fl[:, None] != fl[None, :])
        out["inter_class"] = gram[ok].mean()
    return out


def test_constant_within_video_gives_intra_one_and_orthogonal_videos_inter_zero() -> None:
    n, t, h, w, d = 5, 4, 2, 3, 8
    x = np.broadcast_to(np.eye(d)[:n, None, None, None, :], (n, t, h, w, d)).copy()
    r = iicr_from_array(x)
    assert r["intra"] == pytest.approx(1.0, abs=1e-9)
    assert r["inter_video"] == pytest.approx(0.0, abs=1e-9)
    assert r["iicr_video"] is None  # intra / 0 is undefined, reported as null, with the reason
    assert "below 0.1" in r["undefined"]["iicr_video"] and r["gap_video"] == pytest.approx(1.0)
    assert r["per_position"]["intra"] == pytest.approx(1.0, abs=1e-9)
    assert np.allclose(r["per_position"]["intra_map"], 1.0)

    # every video the same constant direction: intra = inter = 1, IICR = 1
    same = np.ones((n, t, h, w, d))
    r = iicr_from_array(same)
    assert (
        r["intra"] == pytest.approx(1.0)
        and r["inter_video"] == pytest.approx(1.0)
        and r["iicr"] == pytest.approx(1.0)
    )

    # frames alternate between two orthogonal directions inside each clip: intra = (T/2-1)/(T-1) ... = 1/3
    alt = np.zeros((n, t, d))
    alt[:, 0::2, 0] = 1.0
    alt[:, 1::2, 1] = 1.0
    assert iicr_from_array(alt)["intra"] == pytest.approx(1 / 3)


def test_ratio_is_left_undefined_where_inter_is_near_zero_or_negative() -> None:
    """Features spread around the origin: per-video content, inter cosine about 0 (the case that gave
    IICR -15 on a random DINOv2). intra and inter stay; the ratio is None with the reason; the gap
    intra - inter ranks the encoder instead. Shifted away from the origin, the ratio is back."""
    rng = np.random.default_rng(1)
    content = rng.normal(size=(8, 1, 16))
    x = content + 0.3 * rng.normal(size=(8, 4, 16))  # 8 videos, 4 frames each, frame features
    ref = _brute(x, np.arange(8), None)
    assert abs(ref["inter_video"]) < INTER_MIN and ref["intra"] > 0.8
    r = iicr_from_array(x)
    assert r["intra"] == pytest.approx(ref["intra"]) and r["inter_video"] == pytest.approx(ref["inter_video"])
    assert r["iicr_video"] is None and r["iicr"] is None
    assert f"inter cosine {ref['inter_video']:.4f} is below {INTER_MIN}" in r["undefined"]["iicr_video"]
    assert r["gap_video"] == pytest.approx(ref["intra"] - ref["inter_video"])
    table = format_table({"encoders": {"enc": r}})
    assert "n/a: enc IICR(video): inter cosine" in table
    shifted = iicr_from_array(x + 3.0)  # a shared direction: inter well above INTER_MIN
    ref = _brute(x + 3.0, np.arange(8), None)
    assert ref["inter_video"] > INTER_MIN and "undefined" not in shifted
    assert shifted["iicr_video"] == pytest.approx(ref["intra"] / ref["inter_video"])
    assert abs(shifted["iicr_video"]) <= 1 / INTER_MIN


def test_matches_brute_force_with_videos_and_labels() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3, 2, 2, 6)) + 0.5  # a shared offset keeps inter away from 0
    vid = np.array([0, 0, 1, 2, 2, 2, 3])
    lab = np.array([0, 0, 1, 0, 0, 0, -1])  # one unlabelled clip: left out of the class figure
    r = iicr_from_array(x, vid, lab)
    ref = _brute(x, vid, lab)
    for key in ("intra", "inter_video", "inter_class"):
        assert r[key] == pytest.approx(ref[key], abs=1e-6)
    assert r["iicr_class"] == pytest.approx(ref["intra"] / ref["inter_class"], rel=1e-5)
    assert r["iicr"] == r["iicr_class"]
    # per position: position (i, j) is its own set of frame vectors
    maps = np.array(r["per_position"]["inter_video_map"])
    for i in range(2):
        for j in range(2):
            pos = _brute(x[:, :, i : i + 1, j : j + 1], vid, None)
            assert maps[i, j] == pytest.approx(pos["inter_video"], abs=1e-5)
            assert r["per_position"]["intra_map"][i][j] == pytest.approx(pos["intra"], abs=1e-5)


def _make_store(path: Path, seed: int = 0) -> dict:
    """A schema-v2 store written with the extract stage's own store writer: 2 encoders in
    float16 (exact), 11 clips in blocks of 4, videos spanning block borders, one failed clip."""
    from helpers import layout_entries

    from cache_schema import content_fingerprint
    from stages.extract.store import StorePlan, create_store, mark_block_done, write_block

    rng = np.random.default_rng(seed)
    n, t, h, w = 11, 4, 3, 3
    dims = {"enc_a": 6, "enc_b": 4}
    video_index = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 5], np.int32)  # videos span block borders
    labels = np.array([0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 1], np.int64)
    valid = np.ones(n, np.uint8)
    valid[5] = 0  # failed clip: must be skipped
    targets = {}
    for name, d in dims.items():
        base = rng.normal(size=(6, 1, 1, 1, d))[video_index]  # per-video content
        x = base + 0.6 * rng.normal(size=(n, t, h, w, d))
        x = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)
        x[5] = 0  # what an extraction writes for a failed clip
        targets[name] = x
    encs = layout_entries("float16", list(dims.items()), frames=t)
    spec = {"dataset": {"files": [[f"v{i}.mp4", 0] for i in range(6)]}, "grid": [t, h, w]}
    derived = {"pca": {}, "fidelity": {}}
    block = 4
    plan = StorePlan(n, block, (4, t, 2 * h, 2 * w), (t, h, w), encs, labels, video_index,
                     np.zeros(n, np.int32), np.zeros(n, np.uint8))  # fmt: skip
    attrs = {
        "schema_version": 2, "fingerprint": content_fingerprint(spec, derived), "spec": spec,
        "derived": derived, "grid": [t, h, w], "patch_size": [1, 2, 2], "latent_shape": [4, t, 2 * h, 2 * w],
        "encoders": [e.to_dict() for e in encs], "class_names": ["a", "b"], "num_clips": n, "block_size": block,
        "num_blocks": plan.num_blocks, "sources": [f[0] for f in spec["dataset"]["files"]],
    }  # fmt: skip
    group = create_store(str(path), plan, attrs, "zstd", 3, {})
    for b in range(plan.num_blocks):
        lo, hi = plan.block_range(b)
        write_block(group, lo, np.zeros((hi - lo, *plan.latent_shape)), {k: (v[lo:hi], None) for k, v in targets.items()},
                    valid[lo:hi])  # fmt: skip
        mark_block_done(group, b)
    return {"targets": targets, "video_index": video_index, "labels": labels, "valid": valid.astype(bool),
            "encs": encs}  # fmt: skip


@pytest.mark.parametrize("block_clips", [None, 3])
def test_store_iicr_equals_in_memory(tmp_path: Path, block_clips: int | None) -> None:
    store = tmp_path / "cache.zarr"
    ref = _make_store(store)
    assert validate_store(store) == []
    res = iicr_from_store(str(store), block_clips=block_clips, progress=False)
    assert res["num_clips"] == 10 and res["skipped_invalid"] == 1 and res["labels"]
    keep = ref["valid"]
    for enc in ref["encs"]:
        x = ref["targets"][enc.name][keep].astype(np.float32)
        expect = iicr_from_array(x, ref["video_index"][keep], ref["labels"][keep])
        got = res["encoders"][enc.name]
        for key in ("intra", "inter_video", "inter_class", "gap_video", "gap_class"):
            assert got[key] == pytest.approx(expect[key], rel=1e-4), key  # float16 tokens re-normalised
        for key in ("iicr_video", "iicr_class"):  # None (inter below INTER_MIN) on both sides, or equal
            assert got[key] == (None if expect[key] is None else pytest.approx(expect[key], rel=1e-4)), key
        assert got["per_position"]["intra"] == pytest.approx(expect["per_position"]["intra"], rel=1e-4)
        assert got["per_position"]["inter_video"] == pytest.approx(
            expect["per_position"]["inter_video"], rel=1e-4
        )
        assert got["intra"] > got["inter_video"]  # clips share their video's content
    only_b = iicr_from_store(str(store), encoders=["enc_b"], progress=False)
    assert list(only_b["encoders"]) == ["enc_b"]
    with pytest.raises(ValueError, match="enc_c"):
        iicr_from_store(str(store), encoders=["enc_c"], progress=False)


def test_analyze_command_over_a_store(tmp_path: Path) -> None:
    store = tmp_path / "cache.zarr"
    _make_store(store)
    out = tmp_path / "analysis"
    res = CliRunner().invoke(main, ["analyze", "--cache", str(store), "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "iicr.json").read_text())
    assert set(data["encoders"]) == {"enc_a", "enc_b"}
    spatial = json.loads((out / "spatial.json").read_text())  # iREPA's metrics beside IICR
    assert set(spatial["encoders"]) == {"enc_a", "enc_b"} and "LDS" in res.output
    assert all(r["clips"] == 10 and r["rmsc"] > 0 for r in spatial["encoders"].values())
    assert "enc_a" in res.output and "IICR(class)" in res.output
    png = (out / "iicr.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    res = CliRunner().invoke(main, ["analyze", "--out", str(out)])
    assert res.exit_code != 0 and "exactly one" in res.output


def test_analyze_straight_from_videos_with_tiny_encoders(synth_videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "from_videos"
    args = [
        "analyze",
        "--videos",
        str(synth_videos),
        "--encoders",
        "dino",
        "--preset",
        "tiny",
        "--out",
        str(out),
    ]
    args += ["--frames", "4", "--stride", "2", "--clips-per-video", "2", "--size", "64", "--device", "cpu"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "iicr.json").read_text())
    r = data["encoders"]["dino"]
    assert data["labels"] is True and data["num_clips"] == 12
    assert r["frames_per_clip"] == 4 and -1.0 <= r["inter_video"] <= 1.0 and -1.0 <= r["intra"] <= 1.0
    assert "per_position" in r and r["gap_class"] == pytest.approx(r["intra"] - r["inter_class"])
    # the random tiny DINOv2's frame features spread around the origin: the ratio is n/a, with why
    if r["inter_class"] < INTER_MIN:
        assert r["iicr_class"] is None and "n/a: dino IICR(class): inter cosine" in res.output
    else:
        assert r["iicr_class"] == pytest.approx(r["intra"] / r["inter_class"])
