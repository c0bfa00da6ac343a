"""Video datasets: real files written with PyAV, decoded with decord, checked against the
frames we wrote (resized independently with PIL)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from stages.common.synth import write_mp4
from stages.common.video import (
    ClipDataset,
    ClipRef,
    ClipSpec,
    VideoDecodeError,
    VideoEntry,
    clip_starts,
    collate_clips,
    discover,
    manifest_from_ucf_split,
    natural_key,
    plan_clips,
    read_clip,
    resize_crop,
)


def source_frames(n: int, h: int = 240, w: int = 320, gray: bool = False) -> np.ndarray:
    """Smooth patterns whose phase moves a lot per frame, so a wrong frame index shows."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for t in range(n):
        r = 128 + 100 * np.sin(2 * math.pi * (xx / w * 1.5 + 0.17 * t))
        g = 128 + 100 * np.cos(2 * math.pi * (yy / h * 1.2 - 0.11 * t))
        b = 128 + 90 * np.sin(2 * math.pi * ((xx + yy) / (w + h) + 0.23 * t))
        out.append(np.stack([r, g, b], -1))
    frames = np.clip(np.rint(np.stack(out)), 0, 255).astype(np.uint8)
    if gray:
        return frames.mean(-1).round().astype(np.uint8)
    return frames


def write_video(path: Path, frames: np.ndarray, fps: int = 25) -> Path:
    """H.264 near-lossless for .mp4; MPEG-4 Part 2 at a high bit rate (FFV1 for gray) for .avi."""
    gray = frames.ndim == 3
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        if path.suffix == ".mp4":
            stream = container.add_stream("libx264", rate=fps)
            stream.options = {"crf": "4", "threads": "1"}
            stream.pix_fmt = "gray" if gray else "yuv420p"
        elif gray:
            stream = container.add_stream("ffv1", rate=fps)
            stream.pix_fmt = "gray"
        else:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.bit_rate = 40_000_000
            stream.pix_fmt = "yuv420p"
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        for f in frames:
            frame = av.VideoFrame.from_ndarray(f, format="gray" if gray else "rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def pil_reference(frames: np.ndarray, size: int) -> np.ndarray:
    """Independent resize (PIL bilinear, antialiased) + center crop."""
    out = []
    for f in frames:
        img = Image.fromarray(f)
        w, h = img.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        out.append(np.asarray(img.convert("RGB").crop((left, top, left + size, top + size))))
    return np.stack(out)


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def test_clip_starts_and_span() -> None:
    spec = ClipSpec(frames=5, stride=3, clips_per_video=3)
    assert spec.span == 13
    assert clip_starts(40, spec) == [0, 14, 27]
    assert clip_starts(13, spec) == [0]  # only one placement possible: duplicates dropped
    assert clip_starts(12, spec) == []
    assert clip_starts(41, ClipSpec(frames=5, stride=3)) == [14]  # one clip: the middle one
    with pytest.raises(ValueError, match="stride"):
        ClipSpec(stride=0)


def test_resize_crop_matches_pil() -> None:
    frames = source_frames(3)
    ours = resize_crop(frames, 64)
    assert ours.shape == (3, 64, 64, 3) and ours.dtype == torch.uint8
    assert mae(ours.numpy(), pil_reference(frames, 64)) < 0.5
    portrait = resize_crop(frames.transpose(0, 2, 1, 3), 48)
    assert portrait.shape == (3, 48, 48, 3)
    assert mae(portrait.numpy(), pil_reference(frames.transpose(0, 2, 1, 3).copy(), 48)) < 0.5


@pytest.mark.parametrize("ext", [".mp4", ".avi"])
def test_decode_real_video_odd_size(tmp_path: Path, ext: str) -> None:
    frames = source_frames(40)  # 320x240 at 25 fps
    path = write_video(tmp_path / "clips" / f"v{ext}", frames)
    source = discover(tmp_path / "clips")
    assert source.layout == "files" and len(source) == 1

    spec = ClipSpec(frames=5, stride=3, clips_per_video=2, size=64)
    clips, skipped, lengths = plan_clips(source, spec, progress=False)
    assert skipped == [] and lengths == [40]
    assert [c.start_frame for c in clips] == [0, 27]
    for clip in clips:
        got = read_clip(source.entries[0], clip.start_frame, spec)
        assert got.shape == (5, 64, 64, 3) and got.dtype == np.uint8
        idx = [clip.start_frame + 3 * j for j in range(5)]
        err = mae(got, pil_reference(frames[idx], 64))
        shifted = mae(got, pil_reference(frames[[i + 1 if i + 1 < len(frames) else i - 1 for i in idx]], 64))
        assert err < 3.0, f"{path.name}: decoded frames differ from the source (mae {err:.2f})"
        assert shifted > 3 * err  # the comparison can tell neighbouring frames apart


@pytest.mark.parametrize("ext", [".mp4", ".avi"])
def test_grayscale_video_gives_three_channels(tmp_path: Path, ext: str) -> None:
    """4:0:0 H.264 (libx264 'gray') and lossless FFV1 'gray' AVI."""
    gray = source_frames(20, gray=True)
    stored = gray
    if ext == ".mp4":  # H.264 luma is limited range (16-235): store it that way
        stored = np.rint(16 + gray.astype(np.float32) * 219 / 255).astype(np.uint8)
    path = write_video(tmp_path / f"gray{ext}", stored)
    spec = ClipSpec(frames=4, stride=2, size=96)
    got = read_clip(VideoEntry(str(path), None, "file"), 3, spec)
    assert got.shape == (4, 96, 96, 3)
    assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 1], got[..., 2])
    ref = pil_reference(np.repeat(gray[[3, 5, 7, 9], ..., None], 3, -1), 96)
    assert mae(got, ref) < 3.0


@pytest.fixture()
def mixed_folder(tmp_path: Path) -> Path:
    """Class layout with one good video and bad ones: too short, empty, truncated, garbage."""
    root = tmp_path / "mixed"
    write_video(root / "good" / "a.mp4", source_frames(30, 120, 160))
    write_video(root / "good" / "short.avi", source_frames(5, 120, 160))
    (root / "bad").mkdir(parents=True)
    (root / "bad" / "empty.mp4").write_bytes(b"")
    whole = write_video(tmp_path / "whole.mp4", source_frames(30, 120, 160)).read_bytes()
    (root / "bad" / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    (root / "bad" / "garbage.mkv").write_bytes(np.random.default_rng(0).bytes(5000))
    return root


def test_bad_videos_are_skipped_with_reasons(mixed_folder: Path) -> None:
    source = discover(mixed_folder)
    assert source.layout == "classes" and source.class_names == ["bad", "good"]
    by_name = {Path(e.path).name: e for e in source.entries}
    assert by_name["a.mp4"].label == 1 and by_name["empty.mp4"].label == 0

    spec = ClipSpec(frames=5, stride=3, size=32)
    clips, skipped, lengths = plan_clips(source, spec, progress=False)
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert set(reasons) == {"short.avi", "empty.mp4", "truncated.mp4", "garbage.mkv"}
    assert reasons["short.avi"] == "too short: 5 frames < 13 needed"
    assert "empty" in reasons["empty.mp4"] and "0 bytes" in reasons["empty.mp4"]
    assert reasons["truncated.mp4"].startswith("cannot open")
    assert reasons["garbage.mkv"].startswith("cannot open")
    good = [i for i, e in enumerate(source.entries) if Path(e.path).name == "a.mp4"]
    assert [(c.video_index, c.start_frame) for c in clips] == [(good[0], 8)]
    assert lengths[good[0]] == 30 and sorted(lengths)[:3] == [0, 0, 0]


def test_clip_dataset_returns_errors_in_workers(mixed_folder: Path) -> None:
    source = discover(mixed_folder)
    spec = ClipSpec(frames=5, stride=3, size=32)
    clips, _, _ = plan_clips(source, spec, progress=False)
    trunc = next(i for i, e in enumerate(source.entries) if e.path.endswith("truncated.mp4"))
    refs = [clips[0], ClipRef(trunc, 0), clips[0]]
    dataset = ClipDataset(source, refs, spec)
    with pytest.raises(VideoDecodeError, match="truncated.mp4"):
        read_clip(source.entries[trunc], 0, spec)

    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=collate_clips)
    (batch,) = list(loader)
    assert batch["ok"] == [True, False, True]
    assert batch["ok_index"] == [0, 2]
    assert batch["frames"].shape == (2, 5, 32, 32, 3) and batch["frames"].dtype == torch.uint8
    assert batch["error"][0] is None and "truncated.mp4" in batch["error"][1]
    assert batch["label"] == [1, 0, 1]


def _write_frames(folder: Path, frames: np.ndarray, ext: str) -> None:
    folder.mkdir(parents=True)
    for i in reversed(range(len(frames))):  # creation order must not matter
        Image.fromarray(frames[i]).save(folder / f"{i:05d}{ext}", quality=95)


def test_frame_folder_dataset(tmp_path: Path) -> None:
    root = tmp_path / "sky"
    a0, a1 = source_frames(12, 90, 120), source_frames(14, 90, 120)[2:]
    _write_frames(root / "video_a" / "clip_0", a0, ".png")
    _write_frames(root / "video_a" / "clip_1", a1, ".png")
    _write_frames(root / "video_b", source_frames(8, 100, 100, gray=True), ".jpg")
    (root / "video_b" / "notes.txt").write_text("not a frame")

    source = discover(root)
    assert source.layout == "frames" and source.class_names is None
    assert [Path(e.path).relative_to(root).as_posix() for e in source.entries] == [
        "video_a/clip_0",
        "video_a/clip_1",
        "video_b",
    ]
    assert all(e.kind == "frames" and e.label is None for e in source.entries)

    spec = ClipSpec(frames=4, stride=3, size=48)
    clips, skipped, lengths = plan_clips(source, spec, progress=False)
    assert lengths == [12, 12, 8]
    assert [Path(s.path).name for s in skipped] == ["video_b"] and "too short: 8 frames < 10" in skipped[
        0
    ].reason
    got = read_clip(source.entries[1], clips[1].start_frame, spec)
    idx = [clips[1].start_frame + 3 * j for j in range(4)]
    assert got.shape == (4, 48, 48, 3)
    assert mae(got, pil_reference(a1[idx], 48)) < 0.5  # PNG is lossless: only resize differences
    gray = read_clip(source.entries[2], 0, ClipSpec(frames=2, stride=1, size=32))
    assert gray.shape == (2, 32, 32, 3) and np.array_equal(gray[..., 0], gray[..., 2])


def test_csv_and_jsonl_manifests(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_video(data / "walk" / "w1.mp4", source_frames(16, 60, 80))
    write_video(data / "run" / "r1.avi", source_frames(16, 60, 80))
    _write_frames(data / "frames" / "f1", source_frames(16, 60, 80), ".png")

    csv_path = data / "list.csv"
    csv_path.write_text("path,label\nwalk/w1.mp4,walk\nrun/r1.avi,run\nframes/f1,walk\n")
    source = discover(csv_path)
    assert source.layout == "csv" and source.class_names == ["run", "walk"]
    assert [e.label for e in source.entries] == [1, 0, 1]
    assert [e.kind for e in source.entries] == ["file", "file", "frames"]
    assert source.entries[0].path == str((data / "walk" / "w1.mp4").resolve())
    clips, skipped, _ = plan_clips(source, ClipSpec(frames=4, stride=2, size=32), progress=False)
    assert skipped == [] and len(clips) == 3
    assert source.describe()["files"][0] == ["walk/w1.mp4", 1]

    jsonl = tmp_path / "other" / "list.jsonl"
    jsonl.parent.mkdir()
    lines = [
        {"path": str(data / "run" / "r1.avi"), "label": 3},
        {},
        {"path": "../data/walk/w1.mp4", "label": "0"},
        {"path": "../data/frames/f1"},
    ]
    jsonl.write_text("\n".join(json.dumps(x) if x else "" for x in lines) + "\n")
    source = discover(jsonl)
    assert source.layout == "jsonl" and source.class_names == ["0", "1", "2", "3"]  # ints stay labelled
    assert [e.label for e in source.entries] == [3, 0, None]
    assert source.entries[1].path == str((data / "walk" / "w1.mp4").resolve())
    assert source.entries[2].kind == "frames"

    # A manifest entry whose file is missing is skipped at planning time, not fatal.
    (tmp_path / "missing.csv").write_text(f"path\n{data / 'walk' / 'w1.mp4'}\nnope.mp4\n")
    _, skipped, _ = plan_clips(discover(tmp_path / "missing.csv"), ClipSpec(frames=2), progress=False)
    assert [(Path(s.path).name, s.reason) for s in skipped] == [("nope.mp4", "file not found")]


def test_clear_errors_for_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        discover(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no videos found"):
        discover(tmp_path / "empty")
    (tmp_path / "nopath.csv").write_text("file,label\na.mp4,1\n")
    with pytest.raises(ValueError, match="'path' column"):
        discover(tmp_path / "nopath.csv")
    (tmp_path / "bad.jsonl").write_text('{"path": "a.mp4"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        discover(tmp_path / "bad.jsonl")
    (tmp_path / "empty.csv").write_text("path,label\n")
    with pytest.raises(ValueError, match="lists no videos"):
        discover(tmp_path / "empty.csv")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported video source"):
        discover(tmp_path / "notes.txt")


# --------------------------------------------------------------------------- manifests with integer labels


def test_integer_manifest_labels_give_class_names(tmp_path: Path) -> None:
    write_mp4(tmp_path / "a.mp4", source_frames(8, 32, 48), fps=8)
    for copy in ("b", "c", "d"):
        (tmp_path / f"{copy}.mp4").write_bytes((tmp_path / "a.mp4").read_bytes())
    csv_path = tmp_path / "ints.csv"
    csv_path.write_text("path,label\na.mp4,2\nb.mp4,\nc.mp4,4\nd.mp4,0\n")
    source = discover(csv_path)
    assert source.class_names == ["0", "1", "2", "3", "4"]  # up to the largest label, gaps included
    assert [e.label for e in source.entries] == [2, None, 4, 0]
    assert source.describe()["class_names"] == ["0", "1", "2", "3", "4"]
    clips, skipped, _ = plan_clips(source, ClipSpec(frames=2, size=16), progress=False)
    assert skipped == [] and len(clips) == 4

    names = tmp_path / "names.csv"
    names.write_text("path,label\na.mp4,zebra\nb.mp4,ant\n")
    assert discover(names).class_names == ["ant", "zebra"]
    unlabelled = tmp_path / "none.csv"
    unlabelled.write_text("path,label\na.mp4,\n")
    assert discover(unlabelled).class_names is None


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("mixed.csv", "path,label\na.mp4,\nb.mp4,3\nc.mp4,walk\nd.mp4,run\n",
         r"mixed.csv:4: label 'walk' mixes name labels with int labels"),
        ("mixed.jsonl", '{"path": "a.mp4", "label": "walk"}\n{"path": "b.mp4", "label": 1}\n',
         r"mixed.jsonl:2: label 1 mixes int labels with name labels"),
        ("neg.csv", "path,label\na.mp4,-1\n", r"neg.csv:2: integer labels must be >= 0, got -1"),
        ("bool.jsonl", '{"path": "a.mp4", "label": true}\n',
         r"bool.jsonl:1: label must be an integer or a class name, got True"),
    ],
)  # fmt: skip
def test_mixed_or_bad_manifest_labels_name_the_line(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    manifest = tmp_path / name
    manifest.write_text(text)
    with pytest.raises(ValueError, match=message):
        discover(manifest)


def test_repeated_manifest_rows_are_used_once_and_conflicting_labels_refused(tmp_path: Path, caplog) -> None:
    vids = tmp_path / "vids"
    vids.mkdir()
    write_mp4(vids / "x.mp4", source_frames(8, 32, 48), fps=8)
    (vids / "y.mp4").write_bytes((vids / "x.mp4").read_bytes())
    same = tmp_path / "same.csv"
    same.write_text("path,label\nvids/x.mp4,walk\nvids/y.mp4,run\n./vids/x.mp4,walk\nvids/x.mp4,walk\n")
    with caplog.at_level("WARNING", logger="stages.common.video"):
        source = discover(same)
    assert [Path(e.path).name for e in source.entries] == ["x.mp4", "y.mp4"]
    assert f"lists 2 video(s) more than once; each is used once: {same}:4 repeats {same}:2" in caplog.text
    for text, second in (
        ("path,label\nvids/x.mp4,walk\nvids/y.mp4,run\n./vids/x.mp4,run\n", "label 'run'"),
        ("path,label\nvids/x.mp4,walk\nvids/x.mp4,\n", "no label"),
    ):
        clash = tmp_path / "clash.csv"
        clash.write_text(text)
        where = f"{clash}:{text.count(chr(10))}"
        with pytest.raises(ValueError) as info:
            discover(clash)
        assert str(info.value).startswith(
            f"{where}: {(vids / 'x.mp4').resolve()} is listed again with {second}"
        )
        assert f"but {clash}:2 gives it label 'walk'; a video cannot be in two classes" in str(info.value)
    jsonl = tmp_path / "ints.jsonl"
    jsonl.write_text('{"path": "vids/x.mp4", "label": 1}\n{"path": "vids/x.mp4", "label": "1"}\n')
    assert len(discover(jsonl)) == 1  # 1 and "1" are the same integer label


def test_manifest_from_ucf_split(tmp_path: Path) -> None:
    """A miniature copy of UCF-101's split files, in their published format."""
    root = tmp_path / "UCF-101"
    videos = {
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi": source_frames(10, 32, 48),
        "Archery/v_Archery_g08_c01.avi": source_frames(10, 32, 48),
        "YoYo/v_YoYo_g01_c02.avi": source_frames(10, 32, 48),
    }
    for rel, frames in videos.items():
        write_video(root / rel, frames)
    splits = tmp_path / "ucfTrainTestlist"
    splits.mkdir()
    (splits / "classInd.txt").write_text("1 ApplyEyeMakeup\r\n2 Archery\r\n3 YoYo\r\n")
    (splits / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\nYoYo/v_YoYo_g01_c02.avi 3\r\n"
    )
    (splits / "testlist01.txt").write_text("Archery/v_Archery_g08_c01.avi\r\n\r\n")

    train = manifest_from_ucf_split(
        splits / "trainlist01.txt", splits / "classInd.txt", root, tmp_path / "m" / "train.csv"
    )
    source = discover(train)
    assert source.layout == "csv" and source.class_names == ["ApplyEyeMakeup", "YoYo"]
    assert [(Path(e.path).name, e.label) for e in source.entries] == [
        ("v_ApplyEyeMakeup_g08_c01.avi", 0),
        ("v_YoYo_g01_c02.avi", 1),
    ]
    clips, skipped, lengths = plan_clips(source, ClipSpec(frames=4, stride=2, size=16), progress=False)
    assert skipped == [] and lengths == [10, 10] and len(clips) == 2

    test = discover(
        manifest_from_ucf_split(splits / "testlist01.txt", splits / "classInd.txt", root, tmp_path / "t.csv")
    )
    assert test.class_names == ["Archery"] and test.entries[0].path == str(
        (root / "Archery" / "v_Archery_g08_c01.avi").resolve()
    )

    (splits / "bad.txt").write_text("YoYo/v_YoYo_g01_c02.avi 7\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: class id 7 is not in"):
        manifest_from_ucf_split(splits / "bad.txt", splits / "classInd.txt", root, tmp_path / "x.csv")
    (splits / "bad2.txt").write_text("Nope/v_Nope_g01_c01.avi\n")
    with pytest.raises(ValueError, match=r"class folder 'Nope'"):
        manifest_from_ucf_split(splits / "bad2.txt", splits / "classInd.txt", root, tmp_path / "x.csv")


# --------------------------------------------------------------------------- natural frame order


def test_frame_files_read_in_natural_order(tmp_path: Path) -> None:
    """Unpadded names 1.png .. 40.png; each frame's grey level is 6 x its number, so a decoded
    clip shows exactly which files were read."""
    folder = tmp_path / "frames" / "clip"
    folder.mkdir(parents=True)
    for t in range(1, 41):
        Image.fromarray(np.full((20, 30, 3), 6 * t, np.uint8)).save(folder / f"{t}.png")
    source = discover(tmp_path / "frames")
    spec = ClipSpec(frames=8, stride=1, size=16)
    got = read_clip(source.entries[0], 22, spec)  # frames 23..30: crosses the 29 -> 3 -> 30 trap
    assert got[:, 8, 8, 0].tolist() == [6 * t for t in range(23, 31)]
    assert (got == got[:, :1, :1, :1]).all()  # constant images resize exactly
    assert read_clip(source.entries[0], 0, ClipSpec(frames=40, stride=1, size=16))[:, 0, 0, 0].tolist() == [
        6 * t for t in range(1, 41)
    ]


def test_natural_key_orders_mixed_names() -> None:
    names = ["frame_10.png", "frame_2.png", "Frame_3.png", "frame_02.png", "b.png", "a10b2.png", "a10b10.png"]
    order = sorted(names, key=natural_key)
    assert order == [
        "a10b2.png",
        "a10b10.png",
        "b.png",
        "frame_02.png",
        "frame_2.png",
        "Frame_3.png",
        "frame_10.png",
    ]
    assert sorted(reversed(names), key=natural_key) == order  # deterministic whatever the input order


# --------------------------------------------------------------------------- clip variety


def test_random_placement_reproducible_and_seeded() -> None:
    spec = ClipSpec(frames=5, stride=3, clips_per_video=4, placement="random", seed=7)
    last = 200 - spec.span
    a = clip_starts(200, spec, video_key=(3, "walk/w1.avi"))
    assert a == clip_starts(200, spec, video_key=(3, "walk/w1.avi"))
    assert len(a) == 4 and len(set(a)) == 4 and a == sorted(a) and 0 <= a[0] and a[-1] <= last
    other_seed = ClipSpec(frames=5, stride=3, clips_per_video=4, placement="random", seed=8)
    assert clip_starts(200, other_seed, video_key=(3, "walk/w1.avi")) != a
    assert clip_starts(200, spec, video_key=(4, "walk/w1.avi")) != a  # the video's identity matters
    assert clip_starts(200, spec, video_key=(3, "walk/w2.avi")) != a
    # Fewer possible starts than clips asked for: every start, once.
    assert clip_starts(spec.span + 2, spec, video_key=(0, "x")) == [0, 1, 2]
    assert clip_starts(spec.span - 1, spec, video_key=(0, "x")) == []
    draws = np.concatenate([clip_starts(40, spec, video_key=(i, "v")) for i in range(400)])
    assert draws.min() == 0 and draws.max() == 40 - spec.span  # the whole range is reachable
    with pytest.raises(ValueError, match="'shuffle'"):
        ClipSpec(placement="shuffle")
    with pytest.raises(ValueError, match="seed"):
        ClipSpec(seed=-1)


def test_random_plan_on_real_videos(tmp_path: Path) -> None:
    (tmp_path / "vids").mkdir()
    for name in ("a", "b"):
        write_mp4(tmp_path / "vids" / f"{name}.mp4", source_frames(60, 32, 48), fps=25)
    source = discover(tmp_path / "vids")
    spec = ClipSpec(frames=4, stride=2, clips_per_video=3, size=16, placement="random", seed=1)
    clips, skipped, lengths = plan_clips(source, spec, progress=False)
    assert skipped == [] and lengths == [60, 60] and len(clips) == 6
    again, _, _ = plan_clips(source, spec, progress=False)
    assert again == clips
    per_video = [[c.start_frame for c in clips if c.video_index == i] for i in range(2)]
    assert per_video[0] != per_video[1]  # same length, different identity: different draws
    for i, starts in enumerate(per_video):
        assert starts == clip_starts(60, spec, video_key=(i, f"{'ab'[i]}.mp4"))
    reseeded, _, _ = plan_clips(source, dataclasses.replace(spec, seed=2), progress=False)
    assert reseeded != clips


def test_hflip_clips_are_exact_mirrors(tmp_path: Path) -> None:
    (tmp_path / "vids").mkdir()
    frames = source_frames(30, 48, 64)
    write_mp4(tmp_path / "vids" / "a.mp4", frames, fps=25)
    _write_frames(tmp_path / "folders" / "f", frames[:20], ".png")
    spec = ClipSpec(frames=4, stride=2, clips_per_video=2, size=32, hflip=True)
    for root in (tmp_path / "vids", tmp_path / "folders"):
        source = discover(root)
        clips, _, _ = plan_clips(source, spec, progress=False)
        plain = ClipSpec(frames=4, stride=2, clips_per_video=2, size=32)
        unflipped, _, _ = plan_clips(source, plain, progress=False)
        assert [(c.start_frame, c.flip) for c in clips] == [
            (c.start_frame, f) for c in unflipped for f in (False, True)
        ]
        dataset = ClipDataset(source, clips, spec)
        for k in range(0, len(clips), 2):
            a, b = dataset[k], dataset[k + 1]
            assert (a["flip"], b["flip"]) == (False, True) and a["start_frame"] == b["start_frame"]
            assert torch.equal(b["frames"], a["frames"].flip(2))
            assert b["frames"].is_contiguous() and not torch.equal(a["frames"], b["frames"])
        entry, start = source.entries[0], clips[0].start_frame
        direct = read_clip(entry, start, spec)
        mirrored = read_clip(entry, start, spec, flip=True)
        assert mirrored.flags["C_CONTIGUOUS"] and np.array_equal(mirrored, direct[:, :, ::-1])
        batch = collate_clips([dataset[0], dataset[1]])
        assert batch["flip"] == [False, True]
    assert ClipRef(0, 5) == ClipRef(0, 5, False)  # positional form used by other stages still works


def test_a_stream_decord_mis_sizes_is_decoded_with_pyav(tmp_path: Path) -> None:
    """decord fails on (or mis-sizes) a valid 16 px wide, 1024 px tall H.264 stream; the clip
    comes from PyAV instead of being dropped."""
    path = tmp_path / "tall" / "v.mp4"
    path.parent.mkdir()
    frames = source_frames(12, 1024, 16)
    write_mp4(path, frames, fps=8)
    source = discover(tmp_path / "tall")
    spec = ClipSpec(frames=4, stride=2, size=16)
    clips, skipped, _ = plan_clips(source, spec, progress=False)
    assert skipped == [] and len(clips) == 1
    clip = read_clip(source.entries[0], 2, spec)
    with av.open(str(path)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == (12, 1024, 16, 3)
    expected = resize_crop(decoded[[2, 4, 6, 8]], 16).numpy()
    np.testing.assert_array_equal(clip, expected)
