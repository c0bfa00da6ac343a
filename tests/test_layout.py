"""The typed cache contract (cache_schema/layout.py): round trips, today's on-disk form unchanged,
one place for shapes, and readers that use attributes instead of string keys."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_schema import (
    CacheError,
    EncoderEntry,
    ShardLayout,
    StoreLayout,
    open_group,
    read_index,
    read_shard_layout,
    store_layout,
    validate_shards,
    validate_store,
)
from cache_schema import constants as C
from cache_schema.integrity import StoreVerifier
from cache_schema.tars import iter_samples, open_shard

REPO = Path(__file__).resolve().parents[1]
# A store (2 clips, int8, dino with PCA 8, videomae on its own time grid) and its shards, written by
# the code before the typed contract existed (commit 5ae5a4b, tiny preset). Never regenerate it.
LEGACY = REPO / "tests" / "data" / "legacy_v2_cache.tar.gz"


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("legacy")
    with tarfile.open(LEGACY) as tar:
        tar.extractall(root, filter="data")
    return root


def test_encoder_entry_round_trips_and_keeps_unknown_fields() -> None:
    entry = EncoderEntry.build("dino", 768, "int4", 16, pca_dims=256, raw_tokens=C.RAW_FROM_NORMS,
                               id="facebook/dinov2-base", input_size=224)  # fmt: skip
    assert entry.values == (128, "uint8") and entry.scales == (8, "float16") and entry.stored_dim == 256
    data = entry.to_dict()
    assert EncoderEntry.from_dict(data) == entry and EncoderEntry.from_dict(data).to_dict() == data
    newer = {**data, "added_later": [1, 2]}  # a field a later version writes: kept on rewrite
    assert EncoderEntry.from_dict(newer).to_dict() == newer
    older = {k: v for k, v in data.items() if k != C.RAW_TOKENS}  # written before norms were kept
    assert (
        EncoderEntry.from_dict(older).raw_tokens is None and EncoderEntry.from_dict(older).to_dict() == older
    )
    assert not EncoderEntry.from_dict(older).stores_norms and entry.stores_norms


def test_an_entry_missing_a_field_is_refused_naming_it() -> None:
    data = EncoderEntry.build("sam2", 256, "int8", 8).to_dict()
    del data["time_frames"]
    with pytest.raises(CacheError, match=r"x/index.json: .*encoder 'sam2' lacks field\(s\) time_frames"):
        EncoderEntry.from_dict(data, "x/index.json")
    with pytest.raises(CacheError, match="malformed"):
        EncoderEntry.from_dict({**EncoderEntry.build("sam2", 256, "int8", 8).to_dict(), "values": 3})


def test_store_attributes_written_before_the_contract_round_trip_byte_for_byte(legacy: Path) -> None:
    attrs = dict(open_group(legacy / "store").attrs)
    layout = StoreLayout.from_attrs(attrs)
    assert layout.to_attrs() == attrs
    assert json.dumps(layout.to_attrs()) == json.dumps(attrs)  # the same keys in the same order
    assert layout.extra.keys() == {"source_root", "config"} and layout.integrity is not None
    assert [e.name for e in layout.encoders] == ["dino", "sam2", "videomae"]
    assert layout.encoder("dino").pca and layout.encoder("videomae").raw_tokens == C.RAW_IN_VALUES


def test_shard_indexes_written_before_the_contract_round_trip_byte_for_byte(legacy: Path) -> None:
    for folder in (legacy / "shards", legacy / "shards" / C.LATENTS_ONLY_DIR):
        text = (folder / C.SHARD_INDEX).read_text()
        index = ShardLayout.from_index(json.loads(text))
        assert json.dumps(index.to_index(), indent=2) == text
    full = read_shard_layout(legacy / "shards")
    assert full.lean_dir == C.LATENTS_ONLY_DIR and full.num_samples == sum(s.samples for s in full.shards)
    assert read_shard_layout(legacy / "shards" / C.LATENTS_ONLY_DIR).lean_dir is None


def test_the_layout_gives_the_shapes_the_store_and_the_shards_have(legacy: Path) -> None:
    group = open_group(legacy / "store")
    layout = store_layout(group)
    arrays = layout.clip_arrays()
    assert len(arrays) == 9  # latents; dino values/scales/norms; sam2 the same; videomae values/scales
    for array in arrays:
        on_disk = group[array.path]
        assert tuple(on_disk.shape) == (layout.num_clips, *array.shape), array.path
        assert str(on_disk.dtype) == array.dtype, array.path
    with open_shard(str(legacy / "shards" / read_shard_layout(legacy / "shards").shards[0].name)) as fh:
        sample = next(iter_samples(fh, "shard"))
    for array in arrays:
        member = np.load(io.BytesIO(sample[array.member]))
        assert member.shape == array.shape and str(member.dtype) == array.dtype, array.member
    assert layout.crc_columns == [a.path for a in arrays] + [*C.META_ARRAYS, C.VALID]


def test_a_store_and_shards_written_before_the_contract_still_read_and_pack_the_same(
    legacy: Path, tmp_path: Path
) -> None:
    from stages.pack.packer import PackConfig, run_pack

    store, shards = legacy / "store", legacy / "shards"
    assert validate_store(store) == [] and validate_shards(shards, verify_hashes=True) == []
    group = open_group(store)
    assert StoreVerifier(group, store).blocks(range(store_layout(group).num_blocks)).problems == []
    index = run_pack(
        PackConfig(cache=str(store), out=str(tmp_path / "again"), samples_per_shard=1, progress=False)
    )
    old = read_index(shards)
    assert {k: v for k, v in index.items() if k != "source_store"} == {
        k: v for k, v in old.items() if k != "source_store"
    }
    for name in [s["name"] for s in old["shards"]]:  # the same tar bytes, member for member
        for sub in ("", C.LATENTS_ONLY_DIR + "/"):
            new_tar, old_tar = (
                (tmp_path / "again" / sub / name).read_bytes(),
                (shards / sub / name).read_bytes(),
            )
            assert hashlib.sha256(new_tar).digest() == hashlib.sha256(old_tar).digest(), sub + name


def test_the_trainer_reads_shards_written_before_the_contract(legacy: Path) -> None:
    from stages.train.data import DecodeSamples, SkipLog, collate
    from stages.train.step import StepConfig, prepare_batch

    index = read_shard_layout(legacy / "shards")
    encoders = index.encoder_entries()
    decode = DecodeSamples(encoders, "stop", SkipLog(), norms=True)
    samples = []
    for shard in index.shards:
        with open_shard(str(legacy / "shards" / shard.name)) as fh:
            samples += [decode.decode(s) | {"skipped": []} for s in iter_samples(fh, shard.name)]
    from cache_schema.bases import shard_bases
    from cache_schema.formats import basis_tensors

    bases = {n: basis_tensors(b) for n, b in shard_bases(str(legacy / "shards"), index).items()}
    cfg = StepConfig(device=torch.device("cpu"), encoders=encoders, bases=bases, frames=index.grid[0])
    batch = prepare_batch(collate(samples), cfg)
    assert batch["x0"].shape == (2, *index.latent_shape)
    for name, entry in encoders.items():  # reconstructed in each encoder's own space, unit tokens
        assert batch["targets"][name].shape == (2, *index.grid, entry.dim)
        torch.testing.assert_close(batch["targets"][name].norm(dim=-1), torch.ones(2, *index.grid))


def test_replacing_a_field_gives_a_new_layout_and_the_old_stays() -> None:
    entry = EncoderEntry.build("dino", 32, "int8", 4)
    other = dataclasses.replace(entry, raw_tokens=C.RAW_FROM_NORMS)
    assert other != entry and other.stores_norms and not entry.stores_norms


# ---------------------------------------------------------------------------------------- audit


# The fields the contract's objects own: a reader takes them as attributes. The schema version is
# left out: it is read raw on purpose, to refuse another schema before its fields are parsed.
def _contract_fields() -> list[str]:
    names = set()
    for cls in (EncoderEntry, StoreLayout, ShardLayout):
        names |= {f.name for f in dataclasses.fields(cls)}
    return sorted(names - {"extra", "schema_version"})


# Receivers that held layouts (store attrs, index.json, encoder entries) before the contract.
_RECEIVER = r"(?:\b(?:attrs|index|layout|entry|enc|e|lean_info|meta)|\.attrs|attrs\))"


def _string_key_read() -> re.Pattern[str]:
    keys = "|".join(_contract_fields())
    key = rf"(?:['\"](?:{keys})['\"]|(?:C\.)?RAW_TOKENS\b)"
    return re.compile(_RECEIVER + r"\s*(?:\[\s*|\.get\(\s*)" + key)


def test_the_audit_finds_the_string_key_reads_the_code_had() -> None:
    pattern = _string_key_read()
    before = ['layout["fingerprint"]', "enc['time_frames']", 'attrs["encoders"]', 'e.get("pca")',
              'entry.get("scales")', "dict(group.attrs).get(\"spec\", {})", "e.get(RAW_TOKENS)",
              'group.attrs["grid"]', 'index["shards"]', 'setup.layout.get("latents_only")']  # fmt: skip
    assert all(pattern.search(line) for line in before), [b for b in before if not pattern.search(b)]
    assert not pattern.search("layout.fingerprint") and not pattern.search('flags["encoders"]')


def test_stage_code_reads_layout_fields_as_attributes_not_string_keys() -> None:
    pattern = _string_key_read()
    found = []
    for root in ("stages", "pipeline", "bench", "cache_schema"):
        for path in sorted((REPO / root).rglob("*.py")):
            if path.name == "layout.py":  # where the to/from conversions live
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == [], "read these through cache_schema.layout's attributes:\n" + "\n".join(found)
