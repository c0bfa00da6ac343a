"""Text in the cache: captioned manifests -> `extract --base` -> pack -> the loader's prompt tensors.

On the tiny WanPipeline of the real classes (stages.common.presets.tiny_wan_pipeline: UMT5 and a T5
tokenizer built locally). The reference is diffusers' own WanPipeline.encode_prompt."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import tiny_extract_config

from cache_schema import (
    CacheError,
    open_group,
    read_shard_layout,
    store_layout,
    validate_shards,
    validate_store,
)
from cache_schema import constants as C
from cache_schema.tars import iter_samples, open_shard
from stages.extract import runner
from stages.extract.budget import NPY_HEADER, tar_member_bytes
from stages.extract.runner import ExtractError
from stages.pack.packer import PackConfig, PackError, run_pack
from stages.train.data import DecodeSamples, SkipLog, collate, empty_prompt
from stages.train.step import StepConfig, prepare_batch

MAX_LENGTH = 16  # tokens per prompt in these tests (Wan's 512 costs time, not coverage)
CAPTIONS = {
    "video_0000": "a small red square drifting right on a gradient background",
    "video_0001": "a blue circle moves slowly left",
    "video_0002": "a green triangle drifts right",
    "video_0003": "a yellow bar drifting left with textured background, quickly",
    "video_0004": "",  # missing: the video is skipped and reported
    "video_0005": "an object moves left",
}


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> str:
    from stages.common.presets import tiny_wan_pipeline

    return tiny_wan_pipeline()


@pytest.fixture(scope="module")
def reference(wan: str):
    """Prompt -> diffusers' WanPipeline.encode_prompt embeddings [L, D] (the pipeline's own code)."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(wan)

    def encode(prompt: str) -> torch.Tensor:
        embeds, _ = pipe.encode_prompt(
            prompt,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_LENGTH,
            device=torch.device("cpu"),
        )
        return embeds[0].float()

    return encode


def _videos(synth_videos: Path) -> list[Path]:
    return sorted(synth_videos.rglob("*.mp4"))


def _manifest(synth_videos: Path, folder: Path, kind: str) -> Path:
    """A manifest of the synthetic videos with CAPTIONS (video_0004's caption is empty in CSV and
    absent in JSONL)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(str(v), v.parent.name, CAPTIONS[v.stem]) for v in _videos(synth_videos)]
    if kind == "csv":
        path = folder / "captions.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "label", "caption"])
            writer.writerows(rows)
        return path
    path = folder / "captions.jsonl"
    lines = [{"path": p, "label": lab, **({"caption": c} if c else {})} for p, lab, c in rows]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def _extract(data: Path, out: Path, wan: str | None, **over):
    cfg = tiny_extract_config(data, out, encoders=["dino"], clips_per_video=1, fidelity_clips=1, num_workers=0,
                              **({"base": wan, "text_max_length": MAX_LENGTH} if wan else {}), **over)  # fmt: skip
    return runner.run_extract(cfg)


def _loader_batch(shards: Path, with_text: bool = True):
    index = read_shard_layout(shards)
    decode = DecodeSamples(index.encoder_entries(), "stop", SkipLog(), text=index.text if with_text else None)
    samples, keys = [], []
    for shard in index.shards:
        with open_shard(str(shards / shard.name)) as fh:
            for s in iter_samples(fh, shard.name):
                samples.append(decode.decode(s) | {"skipped": []})
                keys.append(json.loads(s[C.SAMPLE_META])["video"])
    batch = collate(samples)
    cfg = StepConfig(device=torch.device("cpu"), encoders=index.encoder_entries(), frames=index.grid[0])
    return keys, batch, cfg


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_captions_are_embedded_once_and_reach_the_loader(kind, synth_videos, wan, reference, tmp_path):
    manifest = _manifest(synth_videos, tmp_path / "data", kind)
    store, shards = tmp_path / "store.zarr", tmp_path / "shards"
    result = _extract(manifest, store, wan)
    assert validate_store(store) == []
    missing = [s for s in result.skipped if "video_0004" in s["path"]]
    assert missing and "no caption" in missing[0]["reason"]  # reported like a bad video
    report = json.loads((store / C.REPORT_FILE).read_text())
    assert any("video_0004" in s["path"] and "no caption" in s["reason"] for s in report["skipped"])
    group = open_group(store)
    layout = store_layout(group)
    assert layout.text is not None and (layout.text.max_length, layout.text.dim) == (MAX_LENGTH, 32)
    assert layout.num_clips == 5 and group[C.TEXT_EMBEDS].shape == (5, MAX_LENGTH, 32)
    assert layout.spec["text"]["captions"] and layout.spec["text"]["max_length"] == MAX_LENGTH
    assert group[C.TEXT_EMBEDS].dtype == np.float16 and group[C.TEXT_MASK].dtype == np.uint8
    assert {C.TEXT_EMBEDS, C.TEXT_MASK} <= set(layout.crc_columns)  # checksummed like every per-clip array
    # the empty prompt: once per store, once per shard set, never per clip
    torch.testing.assert_close(
        torch.from_numpy(group[C.TEXT_EMPTY_EMBEDS][...].astype(np.float32)),
        reference(""),
        rtol=1e-3,
        atol=1e-3,
    )
    run_pack(PackConfig(cache=str(store), out=str(shards), samples_per_shard=2, progress=False))
    assert validate_shards(shards, verify_hashes=True) == []
    index = read_shard_layout(shards)
    assert index.text is not None and index.text.empty["name"] == C.TEXT_EMPTY_FILE
    assert sorted(p.name for p in shards.glob("*.npz")) == [C.TEXT_EMPTY_FILE]
    embeds, mask = empty_prompt(str(shards), index)
    torch.testing.assert_close(embeds, reference(""), rtol=1e-3, atol=1e-3)
    assert mask.sum() == 1  # the empty prompt is one token: </s>
    keys, batch, cfg = _loader_batch(shards)
    out = prepare_batch(batch, cfg)
    assert out["text_embeds"].shape == (5, MAX_LENGTH, 32) and out["text_mask"].dtype == torch.bool
    for i, video in enumerate(keys):
        want = reference(CAPTIONS[Path(video).stem])
        torch.testing.assert_close(out["text_embeds"][i], want, rtol=1e-3, atol=1e-3)  # float16 storage
        assert int(out["text_mask"][i].sum()) == int((want.abs().sum(-1) > 0).sum())
    # after alignment ends (latents only), the prompt still comes with every batch
    lean = prepare_batch(batch, cfg, with_targets=False)
    torch.testing.assert_close(lean["text_embeds"], out["text_embeds"])
    assert lean["targets"] == {}
    with open_shard(str(shards / C.LATENTS_ONLY_DIR / index.shards[0].name)) as fh:
        sample = next(iter_samples(fh, "lean"))
    assert C.SAMPLE_TEXT in sample and C.SAMPLE_TEXT_MASK in sample


def test_shards_hold_only_the_prompts_rows_and_a_bad_member_is_caught(synth_videos, wan, tmp_path):
    manifest = _manifest(synth_videos, tmp_path / "data", "csv")
    store, shards = tmp_path / "store.zarr", tmp_path / "shards"
    _extract(manifest, store, wan)
    run_pack(PackConfig(cache=str(store), out=str(shards), samples_per_shard=8, progress=False))
    name = read_shard_layout(shards).shards[0].name
    with open_shard(str(shards / name)) as fh:
        sample = next(iter_samples(fh, name))
    rows = np.load(io.BytesIO(sample[C.SAMPLE_TEXT]))
    mask = np.load(io.BytesIO(sample[C.SAMPLE_TEXT_MASK]))
    assert rows.shape == (int(mask.sum()), 32) and mask.shape == (MAX_LENGTH,) and rows.shape[0] < MAX_LENGTH
    # a corrupted text chunk in the store: pack names the array instead of packing zeros
    chunk = store / C.TEXT_EMBEDS / "c" / "0" / "0" / "0"  # block 0's zarr shard
    chunk.write_bytes(b"\0" * chunk.stat().st_size)
    with pytest.raises(PackError, match="text/embeds block 0"):
        run_pack(PackConfig(cache=str(store), out=str(tmp_path / "bad"), samples_per_shard=8, progress=False))


def test_the_text_entry_round_trips_in_both_layouts() -> None:
    from cache_schema import ShardLayout, StoreLayout
    from cache_schema.layout import TextEntry

    text = TextEntry("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 512, 4096)
    assert TextEntry.from_dict(text.to_dict()) == text and text.to_dict()["dtype"] == "float16"
    assert [a.shape for a in text.arrays()] == [(512, 4096), (512,)]
    common = dict(fingerprint="f", spec={}, derived={"text": {"empty_sha256": "e"}}, grid=(2, 2, 2),
                  latent_shape=(4, 2, 4, 4), encoders=(), text=text)  # fmt: skip
    store = StoreLayout(**common, num_clips=1, block_size=1, num_blocks=1, sources=["a.mp4"])
    assert StoreLayout.from_attrs(store.to_attrs()) == store and store.empty_prompt_sha256 == "e"
    assert store.crc_columns[1:3] == [C.TEXT_EMBEDS, C.TEXT_MASK]  # checksummed after the targets
    shards = ShardLayout(**{**common, "text": TextEntry("w", 512, 4096, empty={"name": "x", "sha256": "y"})},
                         num_samples=0, shards=())  # fmt: skip
    assert ShardLayout.from_index(shards.to_index()) == shards
    with pytest.raises(CacheError, match="`text` entry lacks field\\(s\\) dim"):
        StoreLayout.from_attrs({**store.to_attrs(), "text": {"encoder": "w", "max_length": 512}})


def test_base_without_captions_is_refused(synth_videos, wan, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    with pytest.raises(ExtractError, match="has none: give a CSV or JSONL manifest with a `caption` column"):
        _extract(synth_videos, tmp_path / "store.zarr", wan)
    args = ["extract", "--data", str(synth_videos), "--out", str(tmp_path / "cli.zarr"), "--preset", "tiny",
            "--base", wan, "--encoders", "dino", "--num-workers", "0"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"--base {wan} embeds each video's caption, but" in errors[0]
    assert not (tmp_path / "cli.zarr" / "zarr.json").exists()


def test_an_uncaptioned_store_is_written_and_read_as_before(synth_videos, tmp_path):
    """No --base: no text arrays, no `text` field, the dataset description without captions, and
    shards the loader reads without prompt tensors (the legacy fixture of test_layout covers stores
    written before this change)."""
    manifest = _manifest(synth_videos, tmp_path / "data", "csv")
    plain = tmp_path / "plain"
    plain.mkdir()
    for video in _videos(synth_videos)[:2]:
        shutil.copy(video, plain / video.name)
    for data in (manifest, plain):
        store, shards = tmp_path / f"{data.name}.zarr", tmp_path / f"{data.name}-shards"
        _extract(data, store, None)
        attrs = dict(zarr.open_group(str(store), mode="r").attrs)
        assert "text" not in attrs and "text" not in attrs["spec"] and "text" not in attrs["derived"]
        assert "captions" not in attrs["spec"]["dataset"]  # the fingerprint ignores captions without --base
        assert C.TEXT_EMBEDS not in attrs["integrity"]["columns"] and not (store / "text").exists()
        run_pack(PackConfig(cache=str(store), out=str(shards), samples_per_shard=8, progress=False))
        assert "text" not in json.loads((shards / C.SHARD_INDEX).read_text()) and not list(
            shards.glob("*.npz")
        )
        _, batch, cfg = _loader_batch(shards)
        out = prepare_batch(batch, cfg)
        assert "text_embeds" not in out and out["targets"]["dino"].shape[0] == len(out["x0"])


def test_dry_run_counts_the_prompt_bytes_per_clip(synth_videos, wan, tmp_path):
    from transformers import AutoTokenizer

    manifest = _manifest(synth_videos, tmp_path / "data", "csv")
    with_text = _extract(manifest, tmp_path / "a.zarr", wan, dry_run=True).sizes
    without = _extract(manifest, tmp_path / "b.zarr", None, dry_run=True).sizes
    assert not (tmp_path / "a.zarr").exists()
    store, shard = with_text.text_per_clip
    assert with_text.measured_clip == without.measured_clip == 0  # store row 0: the first video's clip
    tokens = AutoTokenizer.from_pretrained(wan, subfolder="tokenizer")(CAPTIONS["video_0000"]).input_ids
    n = min(len(tokens), MAX_LENGTH)
    assert shard == tar_member_bytes(NPY_HEADER + n * 32 * 2) + tar_member_bytes(NPY_HEADER + MAX_LENGTH)
    assert 0 < store < MAX_LENGTH * 32 * 2 + MAX_LENGTH  # compressed: the zero tail costs little
    for a, b in zip(with_text.formats, without.formats, strict=True):
        assert a.store_per_clip == pytest.approx(b.store_per_clip + store)
        assert a.shard_per_clip == pytest.approx(b.shard_per_clip + shard)
        assert a.latents_only_per_clip == pytest.approx(b.latents_only_per_clip + shard)
