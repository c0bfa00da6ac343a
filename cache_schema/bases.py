"""PCA bases in the contract: where a store keeps them, how a shard set carries them.

A store keeps `pca/<encoder>/{mean,components}` (float32 zarr arrays); a shard set keeps one
`pca-<encoder>.npz` per encoder beside its shards, whose sha256 index.json records. Both hash
to the `derived.pca.<encoder>.sha256` the fingerprint covers, so a basis that changed is caught.
"""

from __future__ import annotations

import hashlib
from typing import Any

from . import constants as C
from .errors import CacheError
from .formats import PCABasis
from .layout import ShardLayout
from .validate import read_bytes, store_layout


def store_bases(group: Any) -> dict[str, PCABasis]:
    """The PCA bases of a store (zarr group), by encoder; checked against `derived`."""
    layout = store_layout(group)
    derived = layout.pca_derived
    bases = {}
    for enc in layout.encoders:
        if not enc.pca:
            continue
        name = enc.name
        base = f"{C.PCA_GROUP}/{name}"
        basis = PCABasis(
            group[f"{base}/{C.PCA_MEAN}"][:],
            group[f"{base}/{C.PCA_COMPONENTS}"][:],
            derived[name]["explained_variance_ratio"],
        )
        _check(basis, derived[name], f"store {base}")
        bases[name] = basis
    return bases


def write_shard_bases(out: str, bases: dict[str, PCABasis]) -> dict[str, dict[str, str]]:
    """One pca-<encoder>.npz per basis in the shard folder; their index.json entries."""
    import fsspec

    entries = {}
    for name, basis in bases.items():
        data = basis.to_npz_bytes()
        file_name = C.pca_file(name)
        with fsspec.open(f"{out.rstrip('/')}/{file_name}", "wb") as fh:
            fh.write(data)
        entries[name] = {"name": file_name, "sha256": hashlib.sha256(data).hexdigest()}
    return entries


def shard_bases(shards: str, index: ShardLayout, names: list[str] | None = None) -> dict[str, PCABasis]:
    """The PCA bases a shard set carries (for `names`, default all), checked against the index."""
    files = index.pca_files or {}
    derived = index.pca_derived
    bases = {}
    for name in names or list(files):
        if name not in files:
            continue
        data = read_bytes(f"{str(shards).rstrip('/')}/{files[name]['name']}")
        if hashlib.sha256(data).hexdigest() != files[name]["sha256"]:
            raise CacheError(f"{shards}/{files[name]['name']} is corrupt: sha256 differs from index.json")
        basis = PCABasis.from_npz_bytes(data)
        _check(basis, derived.get(name, {}), f"{shards}/{files[name]['name']}")
        bases[name] = basis
    return bases


def _check(basis: PCABasis, derived: dict[str, Any], where: str) -> None:
    if derived.get("sha256") and basis.sha256() != derived["sha256"]:
        raise CacheError(f"{where}: the PCA basis differs from the one the fingerprint recorded")
