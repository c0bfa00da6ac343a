"""`pipeline pack` (schema v2): rows in a seeded permutation (shards mix classes), a latents-only twin
with the same keys and order, per-sample checksums, and tars that the stock webdataset reader and
our fast reader read alike."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import zarr
from helpers import tiny_extract_config

from cache_schema import constants as C
from cache_schema import validate_shards, verify_checksum
from cache_schema.tars import TarFormatError, iter_samples
from stages.extract.runner import run_extract
from stages.pack.packer import PackConfig, run_pack


@pytest.fixture(scope="module")
def store(synth_videos: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "store.zarr"
    run_extract(
        tiny_extract_config(synth_videos, out, encoders=["dino", "sam2"], clips_per_video=2, hflip=True)
    )
    return out


def pack(store: Path, out: Path, seed: int = 0) -> dict:
    return run_pack(
        PackConfig(cache=str(store), out=str(out), samples_per_shard=6, seed=seed, progress=False)
    )


def stock_samples(folder: Path) -> list[dict]:
    index = json.loads((folder / C.SHARD_INDEX).read_text())
    urls = [str(folder / s["name"]) for s in index["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def test_shards_mix_classes_in_a_seeded_permutation(store: Path, tmp_path: Path) -> None:
    labels_in_store = zarr.open_group(str(store), mode="r")[C.LABELS][:]
    assert list(labels_in_store) == sorted(labels_in_store)  # extraction order is class order
    index = pack(store, tmp_path / "a")
    assert (
        index["order"] == {"kind": "permutation", "seed": 0} and validate_shards(tmp_path / "a", True) == []
    )
    read = [int(s["cls"]) for s in stock_samples(tmp_path / "a")]
    assert sorted(read) == sorted(labels_in_store.tolist()) and read != sorted(read)
    per_shard = [read[i : i + 6] for i in range(0, len(read), 6)]
    assert sum(len(set(shard)) > 1 for shard in per_shard) >= len(per_shard) - 1  # shards mix classes
    again = pack(store, tmp_path / "b")
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in index["shards"]]  # reproducible
    other = pack(store, tmp_path / "c", seed=1)
    assert [s["sha256"] for s in other["shards"]] != [s["sha256"] for s in index["shards"]]


def test_latents_only_twin_has_the_same_keys_in_the_same_order(store: Path, tmp_path: Path) -> None:
    index = pack(store, tmp_path / "shards")
    full = stock_samples(tmp_path / "shards")
    lean = stock_samples(tmp_path / "shards" / C.LATENTS_ONLY_DIR)
    assert [s["__key__"] for s in lean] == [s["__key__"] for s in full]
    for a, b in zip(full, lean, strict=True):
        np.testing.assert_array_equal(a["latent.npy"], b["latent.npy"])
        assert "dino.npy" in a and not any(k.endswith(".npy") and k != "latent.npy" for k in b)
    assert index["latents_only"]["num_samples"] == index["num_samples"]
    assert index["latents_only"]["bytes"] < sum(s["bytes"] for s in index["shards"]) / 2


def test_our_reader_and_the_stock_reader_see_the_same_samples(store: Path, tmp_path: Path) -> None:
    index = pack(store, tmp_path / "shards")
    for shard in index["shards"]:
        path = tmp_path / "shards" / shard["name"]
        with open(path, "rb") as fh:
            ours = list(iter_samples(fh, str(path)))
        stock = list(wds.WebDataset([str(path)], shardshuffle=False))
        assert [s["__key__"] for s in ours] == [s["__key__"] for s in stock]
        for a, b in zip(ours, stock, strict=True):
            assert {k: v for k, v in a.items() if not k.startswith("__")} == {
                k: v for k, v in b.items() if not k.startswith("__")
            }
            assert verify_checksum(a) is None


def test_reader_handles_long_names_and_refuses_a_cut_tar(tmp_path: Path) -> None:
    path = tmp_path / "long.tar"
    long_key = "k" * 120
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (
            (f"{long_key}.latent.npy", b"abc"),
            (f"{long_key}.cls", b"1"),
            ("short.cls", b"2"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as fh:
        samples = list(iter_samples(fh, str(path)))
    assert [s["__key__"] for s in samples] == [long_key, "short"] and samples[0]["latent.npy"] == b"abc"
    data = path.read_bytes()
    with pytest.raises(TarFormatError, match="ends early"):
        list(iter_samples(io.BytesIO(data[:1100]), "cut.tar"))
