"""The cache contract: fingerprint stability, validation and the compatibility check."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from cache_schema import (
    CacheError,
    CacheMismatch,
    EncoderEntry,
    StoreLayout,
    compatible,
    fingerprint,
    sample_checksum,
    validate_shards,
    validate_store,
    verify_checksum,
    with_checksum,
)
from cache_schema.fingerprint import canonical_json

SPEC = {
    "dataset": {
        "layout": "class_folders",
        "files": [["a/x.mp4", 0], ["b/y.avi", 1]],
        "class_names": ["a", "b"],
    },
    "clips": {"frames": 16, "stride": 3, "clips_per_video": 1, "size": 256},
    "vae": {"id": "stabilityai/sd-vae-ft-ema", "scale": 0.18215},
    "encoders": [{"name": "dino", "id": "facebook/dinov2-base", "input_size": 224, "dim": 768}],
    "grid": [16, 16, 16],
    "dtype": "float16",
}


def _reordered(value):
    if isinstance(value, dict):
        return {k: _reordered(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reordered(v) for v in value]
    return value


def test_fingerprint_insensitive_to_key_order_and_tuples():
    assert fingerprint(SPEC) == fingerprint(_reordered(SPEC))
    with_tuple = dict(SPEC, grid=(16, 16, 16))
    assert fingerprint(with_tuple) == fingerprint(SPEC)
    assert fingerprint(dict(SPEC, grid=[16, 16, 8])) != fingerprint(SPEC)


def test_fingerprint_stable_across_processes_and_hash_seeds():
    code = (
        "import json,sys; from cache_schema import fingerprint; "
        "print(fingerprint(json.loads(sys.stdin.read())))"
    )
    outs = set()
    for seed in ("0", "123"):
        proc = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(SPEC),
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        )
        outs.add(proc.stdout.strip())
    assert outs == {fingerprint(SPEC)}


def test_canonical_json_is_compact_and_sorted():
    text = canonical_json({"b": 1, "a": {"d": 2.0, "c": [1, 2]}})
    assert text == '{"a":{"c":[1,2],"d":2},"b":1}'


def _layout(**over):
    """A store's root attributes (as a dict, the way they are stored)."""
    layout = {
        "schema_version": 2,
        "fingerprint": fingerprint(SPEC),
        "spec": SPEC,
        "derived": {},
        "grid": [16, 16, 16],
        "patch_size": [1, 2, 2],
        "latent_shape": [4, 16, 32, 32],
        "encoders": [
            EncoderEntry.build("dino", 768, "int8", 16, id="facebook/dinov2-base").to_dict(),
            EncoderEntry.build("sam2", 1024, "int8", 16, id="facebook/sam2.1-hiera-base-plus").to_dict(),
        ],
        "class_names": ["a", "b"],
        "num_clips": 2,
        "block_size": 2,
        "num_blocks": 1,
        "sources": ["a/x.mp4", "b/y.avi"],
    }
    layout.update(over)
    return layout


def test_compatible_accepts_matching_request_and_encoder_subset():
    attrs = _layout()
    request_ = {"grid": [16, 16, 16], "encoders": ["sam2"], "fingerprint": fingerprint(SPEC)}
    layout = compatible(attrs, request_)
    assert layout == StoreLayout.from_attrs(attrs) and layout.encoder("sam2").dim == 1024
    assert compatible(layout, request_) is layout  # a typed layout is checked as it is


@pytest.mark.parametrize(
    "request_, field",
    [
        ({"grid": [8, 16, 16]}, "grid"),
        ({"latent_shape": [4, 8, 32, 32]}, "latent_shape"),
        ({"fingerprint": "0" * 64}, "fingerprint"),
        ({"encoders": ["dino", "videomae"]}, "encoders"),
        ({"encoders": [{"name": "sam2", "dim": 256}]}, "encoders.sam2.dim"),
    ],
)
def test_compatible_names_the_first_differing_field(request_, field):
    with pytest.raises(CacheMismatch) as info:
        compatible(_layout(), request_)
    assert info.value.field == field
    assert f"'{field}'" in str(info.value)


def test_v1_caches_are_refused_with_the_way_to_re_extract(tmp_path):
    with pytest.raises(CacheError, match="re-extract with `pipeline extract`"):
        compatible(_layout(schema_version=1), {})
    # a v1 store as the previous version wrote it: one fused float16 `targets` array
    group = zarr.open_group(str(tmp_path / "v1.zarr"), mode="w")
    group.create_array("targets", shape=(2, 1, 2, 2, 8), dtype="float16")
    group.attrs.update({"schema_version": 1, "fingerprint": "x", "spec": {}})
    errors = validate_store(tmp_path / "v1.zarr")
    assert len(errors) == 1 and "schema v1" in errors[0] and "--target-format float16" in errors[0]
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "index.json").write_text(json.dumps({"schema_version": 1, "shards": []}))
    errors = validate_shards(tmp_path / "shards")
    assert len(errors) == 1 and "re-extract" in errors[0]


def test_sample_checksum_covers_every_member_and_its_name():
    sample = {"__key__": "000000001", "latent.npy": b"\x01\x02", "dino.npy": b"abc", "cls": b"3"}
    stamped = with_checksum(sample)
    assert verify_checksum(stamped) is None
    import zlib

    crc = 0
    for name in sorted(["latent.npy", "dino.npy", "cls"]):
        crc = zlib.crc32(name.encode() + b"\0" + sample[name], crc)
    assert sample_checksum(sample) == f"{crc:08x}"
    for broken in (
        {**stamped, "dino.npy": b"abd"},  # a flipped byte
        {k: v for k, v in stamped.items() if k != "cls"},  # a lost member
        {**stamped, "sam2.npy": stamped.pop("dino.npy")},  # a renamed member
    ):
        assert "fails the checksum" in verify_checksum(broken)
    assert "no crc32.txt" in verify_checksum(sample)
    np.testing.assert_equal(sample_checksum(sample), sample_checksum(dict(reversed(sample.items()))))


def test_validate_shards_reports_missing_index(tmp_path):
    errors = validate_shards(tmp_path)
    assert errors and "index.json" in errors[0]


def test_yaml_files_of_runs_and_configs_name_what_is_wrong(tmp_path) -> None:
    """One reader (read_yaml_mapping) behind RunDir.read_config and `--config FILE`."""
    from cache_schema import RunDir
    from cache_schema.run import RunError
    from pipeline.config import ConfigError, load_yaml

    with pytest.raises(RunError, match="is not a training run: it has no config.yaml"):
        RunDir(tmp_path).read_config()
    (tmp_path / "config.yaml").write_text("model: tiny\nlr: [1\n")
    with pytest.raises(RunError, match=r"config.yaml is not valid YAML"):
        RunDir(tmp_path).read_config()
    (tmp_path / "config.yaml").write_text("")  # an empty run config is an error, an empty --config is not
    with pytest.raises(RunError, match="must hold a mapping"):
        RunDir(tmp_path).read_config()
    assert load_yaml(tmp_path / "config.yaml") == {}
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"config file .*list.yaml must hold a mapping"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "ok.yaml").write_text("batch-size: 4\n")
    assert load_yaml(tmp_path / "ok.yaml") == {"batch_size": 4}
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
