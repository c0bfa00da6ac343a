"""The built-in synthetic dataset: real H.264 files, deterministic, labelled by motion."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from stages.common.synth import class_names, make_synthetic, render_video
from stages.common.video import ClipSpec, discover, plan_clips, read_clip


def decode_all(root: Path, frames: int, size: int) -> list[np.ndarray]:
    source = discover(root)
    spec = ClipSpec(frames=frames, stride=1, size=size)
    return [read_clip(e, 0, spec) for e in source.entries]


def test_fixture_set_is_decodable_and_labelled(synth_videos: Path) -> None:
    source = discover(synth_videos)
    assert source.layout == "classes"
    assert source.class_names == ["class_00_drift_right", "class_01_drift_left"]
    assert len(source) == 6
    for entry in source.entries:
        assert entry.path.endswith(".mp4") and entry.kind == "file"
        assert Path(entry.path).parent.name == source.class_names[entry.label]
    assert [e.label for e in source.entries].count(0) == 3

    spec = ClipSpec(frames=12, stride=1, size=64)
    clips, skipped, lengths = plan_clips(source, spec, progress=False)
    assert skipped == [] and lengths == [12] * 6 and len(clips) == 6
    clip = read_clip(source.entries[0], clips[0].start_frame, spec)
    assert clip.shape == (12, 64, 64, 3) and clip.dtype == np.uint8
    assert clip.std() > 20  # textured, not blank


def test_same_seed_same_video_other_seed_differs(tmp_path: Path) -> None:
    kwargs = dict(videos=4, classes=2, frames=8, size=32, progress=False)
    a = make_synthetic(tmp_path / "a", seed=3, **kwargs)
    b = make_synthetic(tmp_path / "b", seed=3, **kwargs)
    c = make_synthetic(tmp_path / "c", seed=4, **kwargs)
    frames_a, frames_b, frames_c = (decode_all(Path(x.root), 8, 32) for x in (a, b, c))
    for fa, fb, fc in zip(frames_a, frames_b, frames_c, strict=True):
        assert np.array_equal(fa, fb)
        assert np.abs(fa.astype(int) - fc.astype(int)).mean() > 10
    # the files themselves are identical (single-threaded x264 without the macroblock tree, see write_mp4)
    for pa, pb in zip(a.paths, b.paths, strict=True):
        assert Path(pa).read_bytes() == Path(pb).read_bytes()
    assert (tmp_path / "a" / "synth.json").read_text() == (tmp_path / "b" / "synth.json").read_text()


_WRITE_SET = (
    "import sys; from stages.common.synth import make_synthetic; "
    "make_synthetic(sys.argv[1], videos=6, classes=3, frames=16, size=64, seed=7, progress=False)"
)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_separate_processes_write_byte_identical_files(tmp_path: Path) -> None:
    """Regression: libx264's AVX-512 macroblock-tree kernels read uninitialised heap memory on
    small frames, so the bytes depended on what the process had allocated before. Two processes
    with different heap garbage (glibc's MALLOC_PERTURB_) must still write identical files."""
    repo = Path(__file__).resolve().parents[1]
    for name, perturb in (("a", "85"), ("b", "170")):
        env = {**os.environ, "MALLOC_PERTURB_": perturb}
        subprocess.run(
            [sys.executable, "-c", _WRITE_SET, str(tmp_path / name)], cwd=repo, env=env, check=True
        )
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert len(a) == 8 and a.keys() == b.keys()  # 6 videos, synth.json, the folder's marker
    assert [k for k in a if a[k] != b[k]] == []


def test_decoded_pixels_match_rendered_frames(synth_videos: Path) -> None:
    source = discover(synth_videos)
    for i in (0, 1):  # video i is written with the RNG seeded by (seed, i)
        rendered = render_video(np.random.default_rng([0, i]), i % 2, 12, 64)
        entry = next(e for e in source.entries if e.path.endswith(f"video_{i:04d}.mp4"))
        decoded = read_clip(entry, 0, ClipSpec(frames=12, stride=1, size=64))
        assert np.abs(decoded.astype(np.float32) - rendered).mean() < 6.0


def _mean_shift(frames: np.ndarray) -> tuple[int, int]:
    """Dominant non-zero (dx, dy) between consecutive frames by circular cross-correlation of
    foreground (frame minus the temporal median); the synthetic frames wrap like a torus."""
    gray = frames.astype(np.float32).mean(-1)
    fg = gray - np.median(gray, axis=0, keepdims=True)
    spec = np.fft.fft2(fg)
    power = (spec[1:] * np.conj(spec[:-1])).sum(0)
    corr = np.real(np.fft.ifft2(power))
    corr[0, 0] = -np.inf  # residue of the static background (median errors) sits at zero shift
    dy, dx = np.unravel_index(int(np.argmax(corr)), corr.shape)
    size = corr.shape[0]
    return (dx + size // 2) % size - size // 2, (dy + size // 2) % size - size // 2


def test_motion_depends_on_class(synth_videos: Path) -> None:
    source = discover(synth_videos)
    spec = ClipSpec(frames=6, stride=2, size=64)  # ~3 px between sampled frames
    for entry in source.entries:
        dx, dy = _mean_shift(read_clip(entry, 0, spec))
        if entry.label == 0:  # drift_right
            assert dx >= 1 and abs(dy) < abs(dx), (entry.path, dx, dy)
        else:  # drift_left
            assert dx <= -1 and abs(dy) < abs(dx), (entry.path, dx, dy)


def test_class_names_and_bad_arguments(tmp_path: Path) -> None:
    names = class_names(10)
    assert names[4] == "class_04_rotate_cw" and names[8] == "class_08_drift_right_x1.5"
    with pytest.raises(ValueError, match="even"):
        make_synthetic(tmp_path / "x", videos=1, size=63, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        make_synthetic(tmp_path / "file", videos=1, progress=False)
    with pytest.raises(ValueError, match=r"files that align4gen did not write \(file\)"):
        make_synthetic(tmp_path, videos=1, progress=False)
    assert (tmp_path / "file").read_text() == "x"


def test_an_existing_set_is_kept_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "s"
    make_synthetic(out, videos=12, classes=3, frames=2, size=16, progress=False)
    before = _digests(out)
    result = CliRunner().invoke(main, ["data", "synth", "--out", str(out), "--videos", "2", "--classes", "2",
                                       "--frames", "2", "--size", "16"])  # fmt: skip
    assert (
        result.exit_code == 1 and "already holds a synthetic set of other sizes (videos 12" in result.output
    )
    assert "--overwrite" in result.output and _digests(out) == before  # nothing deleted
    with pytest.raises(ValueError, match="already holds this synthetic set"):
        make_synthetic(out, videos=12, classes=3, frames=2, size=16, progress=False)
    # --overwrite deletes only what the set wrote: a user's file stops it before anything goes
    (out / "class_02_drift_down" / "mine.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"also class_02_drift_down/mine.txt.*nothing was deleted"):
        make_synthetic(out, videos=2, classes=2, frames=2, size=16, progress=False, overwrite=True)
    assert _digests(out).items() >= before.items()
    (out / "class_02_drift_down" / "mine.txt").unlink()
    result = CliRunner().invoke(main, ["data", "synth", "--out", str(out), "--videos", "2", "--classes", "2",
                                       "--frames", "2", "--size", "16", "--overwrite"])  # fmt: skip
    assert result.exit_code == 0, result.output
    source = discover(out)
    assert len(source) == 2 and source.class_names == class_names(2)
    assert sorted(p.name for p in out.iterdir()) == [".align4gen.json", *class_names(2), "synth.json"]


def test_an_unfinished_set_is_redone(tmp_path: Path) -> None:
    out = tmp_path / "s"
    make_synthetic(out, videos=4, classes=2, frames=2, size=16, progress=False)
    (out / "synth.json").unlink()  # killed before the set was finished
    info = make_synthetic(out, videos=2, classes=2, frames=2, size=16, progress=False)
    assert len(discover(out)) == 2 and len(info.paths) == 2


def test_all_motion_classes_render_and_move() -> None:
    for label in range(8):
        video = render_video(np.random.default_rng([1, label]), label, 6, 32)
        assert video.shape == (6, 32, 32, 3) and video.dtype == np.uint8
        assert np.abs(np.diff(video.astype(np.int16), axis=0)).mean() > 0.5, class_names(8)[label]


def test_cli_data_synth(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = [
        "data",
        "synth",
        "--out",
        str(out),
        "--videos",
        "3",
        "--classes",
        "3",
        "--frames",
        "6",
        "--size",
        "32",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "class_02_drift_down" in result.output and "3 x 6 frames" in result.output
    source = discover(out)
    assert source.class_names == class_names(3) and [e.label for e in source.entries] == [0, 1, 2]
    bad = CliRunner().invoke(main, ["data", "synth", "--out", str(tmp_path / "odd"), "--size", "33"])
    assert bad.exit_code != 0 and "even" in bad.output


def _object_pixels(clip: np.ndarray) -> np.ndarray:
    """Per frame, how many pixels differ from the video's own background (the mode over time)."""
    still = np.median(clip.astype(np.float32), axis=0)
    return (np.abs(clip.astype(np.float32) - still).max(-1) > 40).sum((1, 2))


def test_object_count_and_scale_are_honoured_and_defaults_draw_as_before() -> None:
    rng = lambda i: np.random.default_rng([0, i])  # noqa: E731
    for i in range(6):
        # the defaults are the two keyword values written out: the same pixels
        assert np.array_equal(
            render_video(rng(i), 0, 8, 32, "flat"), render_video(rng(i), 0, 8, 32, "flat", (2, 3), 1.0)
        )
    single = [render_video(rng(i), 2, 8, 64, "flat", objects=(1, 1)) for i in range(6)]
    large = [render_video(rng(i), 2, 8, 64, "flat", objects=(1, 1), object_scale=2.0) for i in range(6)]
    # one object of twice the radius covers about four times the pixels (less where it overlaps itself)
    ratio = np.mean(
        [
            _object_pixels(b).mean() / max(_object_pixels(a).mean(), 1)
            for a, b in zip(single, large, strict=True)
        ]
    )
    assert 2.0 < ratio < 5.0, ratio
    for bad in ((0, 1), (3, 2), (1, 2, 3)):
        with pytest.raises(ValueError, match="objects must be"):
            render_video(rng(0), 0, 2, 32, "flat", objects=bad)
    with pytest.raises(ValueError, match="object_scale must be > 0"):
        render_video(rng(0), 0, 2, 32, "flat", object_scale=0)


def test_object_settings_are_recorded_and_a_set_with_others_is_not_reused(tmp_path: Path) -> None:
    import json

    info = make_synthetic(
        tmp_path, videos=2, frames=4, size=32, objects=(1, 1), object_scale=1.5, progress=False
    )
    params = json.loads((tmp_path / "synth.json").read_text())["params"]
    assert params["objects"] == [1, 1] and params["object_scale"] == 1.5 and info.params.objects == (1, 1)
    with pytest.raises(ValueError, match="this synthetic set .*objects \\(1, 1\\), object_scale 1.5"):
        make_synthetic(
            tmp_path, videos=2, frames=4, size=32, objects=(1, 1), object_scale=1.5, progress=False
        )
    with pytest.raises(ValueError, match="other sizes"):
        make_synthetic(tmp_path, videos=2, frames=4, size=32, progress=False)
