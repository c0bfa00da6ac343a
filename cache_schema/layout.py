"""The typed cache contract: an encoder's layout entry, a store's layout and a shard set's layout.

These objects are what the zarr root attributes of a store and a shard set's index.json hold
(DESIGN.md section 3), with explicit conversions (`to_dict`/`from_dict`, `to_attrs`/`from_attrs`,
`to_index`/`from_index`). The on-disk form is unchanged: `from_*` then `to_*` gives back the
same mapping, fields this version does not know included (kept in `extra`). Writers build these
objects; readers use their attributes, array paths, member names and shapes, so each of those is
defined once, here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import constants as C
from .errors import CacheError, CacheMismatch
from .formats import stored_layout

__all__ = ["ClipArray", "EncoderEntry", "ShardFile", "ShardLayout", "StoreLayout", "TextEntry", "as_layout"]


def _missing(where: str, kind: str, absent: list[str]) -> CacheError:
    return CacheError(f"{where}: the {kind} lacks field(s) {', '.join(absent)} (not a schema-v2 cache?)")


def _take(data: Mapping[str, Any], known: Iterable[str]) -> dict[str, Any]:
    """The fields of `data` outside `known`, in their order (kept so a rewrite loses nothing)."""
    known = set(known)
    return {k: v for k, v in data.items() if k not in known}


def _pair(value: Any) -> tuple[int, str] | None:
    return None if value is None else (int(value[0]), str(value[1]))


@dataclass(frozen=True)
class ClipArray:
    """One per-clip array: its store path, its shard member, its shape per clip and its dtype."""

    path: str
    member: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class EncoderEntry:
    """How one encoder's targets are stored (an item of the `encoders` layout field)."""

    name: str
    dim: int  # the encoder's feature dimension
    format: str  # target format (cache_schema.formats)
    time_frames: int  # T_e: the DiT grid's T, or the encoder's own coarser time grid
    stored_dim: int  # dim, or the PCA dims
    values: tuple[int, str]  # last-axis size and numpy dtype of the stored values
    scales: tuple[int, str] | None  # same for the scales; None: the format has none
    pca: bool = False
    raw_tokens: str | None = None  # C.RAW_FROM_NORMS | C.RAW_IN_VALUES; None: written before norms were kept
    id: str | None = None
    input_size: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    FIELDS = ("name", "id", "dim", "input_size", "format", "time_frames", "stored_dim", "values", "scales",
              "pca", C.RAW_TOKENS)  # fmt: skip
    REQUIRED = ("name", "dim", "format", "time_frames", "values")

    @classmethod
    def build(
        cls,
        name: str,
        dim: int,
        fmt: str,
        time_frames: int,
        pca_dims: int | None = None,
        raw_tokens: str | None = None,
        id: str | None = None,  # noqa: A002 - the field's on-disk name
        input_size: int | None = None,
    ) -> EncoderEntry:
        """The entry of an encoder stored in `fmt` (with `pca_dims` PCA coefficients, if given)."""
        stored_dim = pca_dims or dim
        parts = stored_layout(fmt, stored_dim)
        return cls(name, dim, fmt, time_frames, stored_dim, _pair(parts["values"]), _pair(parts["scales"]),
                   pca_dims is not None, raw_tokens, id, input_size)  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "the cache") -> EncoderEntry:
        if not isinstance(data, Mapping):
            raise CacheError(f"{where}: an `encoders` item is {type(data).__name__}, not a mapping")
        absent = [f for f in cls.REQUIRED if f not in data]
        if absent:
            raise _missing(where, f"layout entry of encoder {data.get('name', '?')!r}", absent)
        try:
            return cls(
                name=str(data["name"]),
                dim=int(data["dim"]),
                format=str(data["format"]),
                time_frames=int(data["time_frames"]),
                stored_dim=int(data.get("stored_dim", data["dim"])),
                values=_pair(data["values"]),
                scales=_pair(data.get("scales")),
                pca=bool(data.get("pca", False)),
                raw_tokens=data.get(C.RAW_TOKENS),
                id=data.get("id"),
                input_size=None if data.get("input_size") is None else int(data["input_size"]),
                extra=_take(data, cls.FIELDS),
            )
        except (TypeError, ValueError, IndexError) as exc:
            raise CacheError(
                f"{where}: the layout entry of encoder {data.get('name')!r} is malformed ({exc})"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.id is not None:
            out["id"] = self.id
        out["dim"] = self.dim
        if self.input_size is not None:
            out["input_size"] = self.input_size
        out.update(format=self.format, time_frames=self.time_frames, stored_dim=self.stored_dim,
                   values=list(self.values), scales=None if self.scales is None else list(self.scales),
                   pca=self.pca)  # fmt: skip
        if self.raw_tokens is not None:
            out[C.RAW_TOKENS] = self.raw_tokens
        return {**out, **self.extra}

    @property
    def stores_norms(self) -> bool:
        """True when each token's norm is kept beside the values (raw tokens = unit token x norm)."""
        return self.raw_tokens == C.RAW_FROM_NORMS

    @property
    def values_path(self) -> str:
        return C.values_path(self.name)

    @property
    def scales_path(self) -> str:
        return C.scales_path(self.name)

    @property
    def norms_path(self) -> str:
        return C.norms_path(self.name)

    @property
    def values_member(self) -> str:
        return C.sample_values(self.name)

    @property
    def scales_member(self) -> str:
        return C.sample_scales(self.name)

    @property
    def norms_member(self) -> str:
        return C.sample_norms(self.name)

    def token_shape(self, grid: tuple[int, ...]) -> tuple[int, int, int]:
        """(T_e, H, W) of one clip: the encoder's time frames on the DiT grid's H x W."""
        return (self.time_frames, int(grid[1]), int(grid[2]))

    def arrays(self, grid: tuple[int, ...]) -> list[ClipArray]:
        """This encoder's per-clip arrays (values, then scales, then token norms, if stored)."""
        lead = self.token_shape(grid)
        out = [ClipArray(self.values_path, self.values_member, (*lead, self.values[0]), self.values[1])]
        if self.scales is not None:
            out.append(
                ClipArray(self.scales_path, self.scales_member, (*lead, self.scales[0]), self.scales[1])
            )
        if self.stores_norms:
            out.append(ClipArray(self.norms_path, self.norms_member, lead, "float16"))
        return out


@dataclass(frozen=True)
class TextEntry:
    """The prompt embeddings a cache carries per clip (the `text` layout field; absent: none)."""

    encoder: str  # the pipeline (folder or hub id) whose text encoder made them
    max_length: int  # L: tokens per prompt, padded / truncated
    dim: int  # D: the text encoder's width
    dtype: str = C.TEXT_DTYPE
    empty: Mapping[str, str] | None = None  # a shard set's {"name": TEXT_EMPTY_FILE, "sha256": ...}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "the cache") -> TextEntry:
        absent = [f for f in ("encoder", "max_length", "dim") if f not in data]
        if absent:
            raise _missing(where, "`text` entry", absent)
        return cls(str(data["encoder"]), int(data["max_length"]), int(data["dim"]),
                   str(data.get("dtype", C.TEXT_DTYPE)), data.get("empty"))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"encoder": self.encoder, "max_length": self.max_length, "dim": self.dim,
                               "dtype": self.dtype}  # fmt: skip
        return out if self.empty is None else {**out, "empty": self.empty}

    def arrays(self) -> list[ClipArray]:
        """The per-clip text arrays (store shapes; a shard member holds only the prompt's rows)."""
        return [
            ClipArray(C.TEXT_EMBEDS, C.SAMPLE_TEXT, (self.max_length, self.dim), self.dtype),
            ClipArray(C.TEXT_MASK, C.SAMPLE_TEXT_MASK, (self.max_length,), "uint8"),
        ]


def _text(data: Mapping[str, Any], where: str) -> TextEntry | None:
    value = data.get("text")
    return None if value is None else TextEntry.from_dict(value, where)


def _entries(items: Any, where: str) -> tuple[EncoderEntry, ...]:
    if not isinstance(items, (list, tuple)):
        raise CacheError(f"{where}: the `encoders` field is {type(items).__name__}, not a list")
    return tuple(e if isinstance(e, EncoderEntry) else EncoderEntry.from_dict(e, where) for e in items)


@dataclass(frozen=True, kw_only=True)
class CacheLayout:
    """What a store and a shard set share: the fingerprinted request and the arrays' geometry."""

    fingerprint: str
    spec: Mapping[str, Any]
    derived: Mapping[str, Any]
    grid: tuple[int, int, int]  # the DiT token grid (T, H, W)
    latent_shape: tuple[int, int, int, int]  # (C, T', h, w)
    encoders: tuple[EncoderEntry, ...]
    class_names: list[str] = field(default_factory=list)
    patch_size: tuple[int, int, int] | None = None
    text: TextEntry | None = None  # prompt embeddings per clip (captioned manifests, --base)
    schema_version: int = C.SCHEMA_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    COMMON = ("schema_version", "fingerprint", "spec", "derived", "grid", "patch_size", "latent_shape",
              "encoders", "class_names", "text")  # fmt: skip

    @staticmethod
    def _common(data: Mapping[str, Any], where: str) -> dict[str, Any]:
        patch = data.get("patch_size")
        return dict(
            schema_version=data.get("schema_version"),
            fingerprint=str(data["fingerprint"]),
            spec=data["spec"],
            derived=data["derived"],
            grid=tuple(int(g) for g in data["grid"]),
            latent_shape=tuple(int(s) for s in data["latent_shape"]),
            encoders=_entries(data["encoders"], where),
            class_names=list(data.get("class_names") or []),
            patch_size=None if patch is None else tuple(int(p) for p in patch),
            text=_text(data, where),
        )

    @property
    def encoder_names(self) -> list[str]:
        return [e.name for e in self.encoders]

    def encoder(self, name: str) -> EncoderEntry:
        for entry in self.encoders:
            if entry.name == name:
                return entry
        raise CacheMismatch("encoders", name, sorted(self.encoder_names))

    def encoder_entries(self, names: list[str] | None = None) -> dict[str, EncoderEntry]:
        """name -> entry for the chosen (default: all) encoders, in the order asked for."""
        chosen = list(names or self.encoder_names)
        if len(set(chosen)) != len(chosen):
            raise CacheError(f"encoders: {chosen} names an encoder twice")
        return {n: self.encoder(n) for n in chosen}

    @property
    def pca_derived(self) -> dict[str, dict[str, Any]]:
        """derived.pca: per encoder with a PCA basis, its sha256 and explained variance."""
        return dict((self.derived or {}).get("pca") or {})

    @property
    def fidelity(self) -> dict[str, dict[str, Any]]:
        """derived.fidelity: per encoder, the stored targets' cosine to the exact ones."""
        return dict((self.derived or {}).get("fidelity") or {})

    @property
    def empty_prompt_sha256(self) -> str | None:
        """derived.text.empty_sha256: the content hash of the stored empty prompt (None: no text)."""
        return ((self.derived or {}).get("text") or {}).get("empty_sha256")

    def _text_field(self) -> dict[str, Any]:
        return {} if self.text is None else {"text": self.text.to_dict()}

    @property
    def clip_size(self) -> tuple[int, int] | None:
        """(height, width) px of the clips, from spec.clips.size: an int (square; every store
        written before non-square clips) or [height, width]; None when the spec has none."""
        size = ((self.spec or {}).get("clips") or {}).get("size")
        if size is None:
            return None
        return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))

    @property
    def vae_spec(self) -> dict[str, Any]:
        """spec.vae: the VAE whose latents these are (id, kind, scale, ...)."""
        return dict((self.spec or {}).get("vae") or {})


@dataclass(frozen=True, kw_only=True)
class StoreLayout(CacheLayout):
    """A zarr store's root attributes."""

    num_clips: int
    block_size: int
    num_blocks: int
    sources: list[str]  # video paths, indexed by the video_index array
    integrity: Mapping[str, Any] | None = None  # {"array", "hash", "columns"}; None: no checksums

    STORE = ("num_clips", "block_size", "num_blocks", "sources", C.INTEGRITY_ATTR)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], where: str = "the store") -> StoreLayout:
        absent = [f for f in C.STORE_ATTRS if f not in attrs]
        if absent:
            raise _missing(where, "store's root attributes", absent)
        return cls(
            **cls._common(attrs, where),
            num_clips=int(attrs["num_clips"]),
            block_size=int(attrs["block_size"]),
            num_blocks=int(attrs["num_blocks"]),
            sources=list(attrs["sources"]),
            integrity=attrs.get(C.INTEGRITY_ATTR),
            extra=_take(attrs, (*cls.COMMON, *cls.STORE)),
        )

    def to_attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "fingerprint": self.fingerprint,
            "spec": self.spec,
            "derived": self.derived,
            "grid": list(self.grid),
            "patch_size": None if self.patch_size is None else list(self.patch_size),
            "latent_shape": list(self.latent_shape),
            "encoders": [e.to_dict() for e in self.encoders],
            "class_names": self.class_names,
            "num_clips": self.num_clips,
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
            "sources": self.sources,
            **self._text_field(),
            **self.extra,
        }
        if self.integrity is not None:
            out[C.INTEGRITY_ATTR] = self.integrity
        return out

    def clip_arrays(self) -> list[ClipArray]:
        """Every per-clip array with its shape per clip (latents, each encoder's arrays), without
        the small metadata columns (labels, video_index, start_frame, flip, valid)."""
        latents = ClipArray(C.LATENTS, C.SAMPLE_LATENT, self.latent_shape, "float16")
        text = [] if self.text is None else self.text.arrays()
        return [latents, *(a for e in self.encoders for a in e.arrays(self.grid)), *text]

    @property
    def crc_columns(self) -> list[str]:
        """The `clip_crc` columns: recorded in `integrity`, else the order a writer would use."""
        if self.integrity is not None:
            return list(self.integrity["columns"])
        return per_clip_arrays(self.encoders, self.text)

    @property
    def crc_array(self) -> str | None:
        """The array of the rows' checksums; None: a store written before checksums existed."""
        return None if self.integrity is None else str(self.integrity["array"])


def per_clip_arrays(encoders: Iterable[EncoderEntry], text: TextEntry | None = None) -> list[str]:
    """The store's per-clip arrays in `clip_crc` column order: latents, each encoder's values
    (+ scales, + token norms), the prompt embeddings and mask (with text), the clip metadata, valid."""
    names = [C.LATENTS]
    for enc in encoders:
        names.extend(a.path for a in enc.arrays((0, 0, 0)))
    names.extend(a.path for a in ([] if text is None else text.arrays()))
    return [*names, *C.META_ARRAYS, C.VALID]


@dataclass(frozen=True)
class ShardFile:
    """One shard's index.json entry."""

    name: str
    samples: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "index.json") -> ShardFile:
        absent = [f for f in ("name", "samples", "bytes", "sha256") if f not in data]
        if absent:
            raise _missing(where, f"shard entry {data.get('name', '?')!r}", absent)
        return cls(str(data["name"]), int(data["samples"]), int(data["bytes"]), str(data["sha256"]))


@dataclass(frozen=True, kw_only=True)
class ShardLayout(CacheLayout):
    """A shard set's index.json."""

    num_samples: int
    shards: tuple[ShardFile, ...]
    order: Mapping[str, Any] | None = None  # {"kind": "permutation", "seed": ...}
    pca_files: Mapping[str, Mapping[str, str]] | None = None  # encoder -> {"name", "sha256"}
    latents_only: Mapping[str, Any] | bool | None = (
        None  # the twin's {dir, num_samples, bytes}; True in the twin
    )
    source_store: str | None = None

    SHARDS = ("num_samples", "shards", "order", "pca_files", "latents_only", "source_store")

    @classmethod
    def from_index(cls, index: Mapping[str, Any], where: str = C.SHARD_INDEX) -> ShardLayout:
        absent = [f for f in C.INDEX_FIELDS if f not in index]
        if absent:
            raise _missing(where, "shard index", absent)
        return cls(
            **cls._common(index, where),
            num_samples=int(index["num_samples"]),
            shards=tuple(ShardFile.from_dict(s, where) for s in index["shards"]),
            order=index.get("order"),
            pca_files=index.get("pca_files"),
            latents_only=index.get("latents_only"),
            source_store=index.get("source_store"),
            extra=_take(index, (*cls.COMMON, *cls.SHARDS)),
        )

    def to_index(self) -> dict[str, Any]:
        """index.json's mapping, in the packer's field order."""
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "fingerprint": self.fingerprint,
            "spec": self.spec,
            "derived": self.derived,
            "encoders": [e.to_dict() for e in self.encoders],
            "grid": list(self.grid),
            "latent_shape": list(self.latent_shape),
            "class_names": self.class_names,
        }
        if self.patch_size is not None:
            out["patch_size"] = list(self.patch_size)
        out.update(self._text_field())
        out["num_samples"] = self.num_samples
        for key in ("order", "pca_files", "latents_only", "source_store"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return {**out, **self.extra, "shards": [s.to_dict() for s in self.shards]}

    @property
    def lean_dir(self) -> str | None:
        """The latents-only twin's folder (relative), or None when this set has none."""
        info = self.latents_only
        return str(info.get("dir", C.LATENTS_ONLY_DIR)) if isinstance(info, Mapping) else None


def encoder_names(attrs: Mapping[str, Any]) -> list[str]:
    """The encoder names of a store's attributes, read without the rest of the contract: a store
    whose creation was interrupted is still cleared by name (`cache_schema.manifest`)."""
    return [str(e["name"]) for e in attrs["encoders"]]


def as_layout(data: CacheLayout | Mapping[str, Any], where: str = "the cache") -> CacheLayout:
    """A typed layout from a typed one (as is), a store's attributes or a shard set's index."""
    if isinstance(data, CacheLayout):
        return data
    if "shards" in data:
        return ShardLayout.from_index(data, where)
    return StoreLayout.from_attrs(data, where)
