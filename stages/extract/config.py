"""The extract stage's config, its presets and the checks every run does before loading a model.

Defaults come from `stages.common.registry` (clips, encoders, VAE, patch) and
`cache_schema.formats` (target format), so the CLI's help and the stage never disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cache_schema.formats import DEFAULT_TARGET_FORMAT, TARGET_FORMATS, check_dim
from stages.common import registry as R
from stages.common.video import parse_clip_size

CODEC_NAMES = ("zstd", "blosc", "none")  # zarr compressors (stages/extract/store.py builds them)
TIME_GRIDS = ("native", "dit")
DEFAULT_PCA_FIT_CLIPS = 64
DEFAULT_FIDELITY_CLIPS = 32
# bytes per unit; single letters count like `df -h` (powers of 1024), "GB" is decimal, "GiB" binary
_UNITS = {"": 1, "B": 1}
for _i, _p in enumerate("KMGTP", start=1):
    _UNITS.update({_p: 1024**_i, f"{_p}IB": 1024**_i, f"{_p}B": 1000**_i})
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int | float, key: str = "disk_budget") -> int:
    """'500G' / '1.5T' / '800MiB' / '10GB' / '12345' -> bytes. G, T ... are binary like `df -h`."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise ValueError(f"{key}: {text!r} is not a size such as 500G, 1.5T, 800MiB or 10GB")
        value, unit = float(match.group(1)), match.group(2).upper()
    if unit not in _UNITS:
        raise ValueError(
            f"{key}: unknown unit {unit!r} in {text!r}; use K, M, G, T (x1024), KB..TB or KiB..TiB"
        )
    size = int(value * _UNITS[unit])
    if size < 1:
        raise ValueError(f"{key}: {text!r} must be a positive size")
    return size


def parse_pca_dims(value: int | str | None, encoders: list[str]) -> dict[str, int]:
    """None -> {}; an int -> that k for every encoder; 'dino=256,videomae=128' -> per encoder."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return {}
    if isinstance(value, bool):
        raise ValueError(f"pca_dims: {value!r} is not a number of dimensions")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        return {name: int(value) for name in encoders}
    dims: dict[str, int] = {}
    for part in str(value).split(","):
        name, sep, k = part.partition("=")
        name = name.strip()
        if not sep or not k.strip().lstrip("-").isdigit():
            raise ValueError(f"pca_dims: {part.strip()!r} is not NAME=K (e.g. dino=256,videomae=256)")
        if name not in encoders:
            raise ValueError(f"pca_dims: {name!r} is not one of the run's encoders {encoders}")
        if name in dims:
            raise ValueError(f"pca_dims: {name!r} is given twice")
        dims[name] = int(k)
    return dims


@dataclass
class ExtractConfig:
    """Everything `pipeline extract` needs; the fingerprinted part is built from it by `build_spec`."""

    data: str = ""
    out: str = ""
    encoders: list[str] = field(default_factory=lambda: list(R.DEFAULT_ENCODERS))
    preset: str | None = None
    # clips (Latte: 16 frames, stride 3, 256x256) and their variety
    frames: int = R.CLIP_DEFAULTS.frames
    stride: int = R.CLIP_DEFAULTS.stride
    clips_per_video: int = R.CLIP_DEFAULTS.clips_per_video
    clip_placement: str = R.CLIP_PLACEMENTS[0]
    hflip: bool = False
    seed: int = 0  # clip placement and the PCA-fit / fidelity samples
    size: int | str = R.CLIP_DEFAULTS.size  # a side (square) or "HEIGHTxWIDTH", e.g. "480x832"
    # VAE: None -> registry.DEFAULT_VAE[vae_kind]; scale None -> SD's for image VAEs, a video VAE's own
    vae: str | None = None
    vae_kind: str = R.VAE_KINDS[0]
    latent_scale: float | None = None
    # a diffusers pipeline (folder or hub id): its text encoder embeds each clip's caption
    base: str | None = None
    text_max_length: int = R.WAN_MAX_TEXT_LENGTH
    # encoders: hub id or local path (None = the registry's hub id); input sizes (None = default;
    # dino: DiT grid side x its patch, REPA's rule, so its patch grid is the DiT grid)
    dino_model: str | None = None
    sam2_model: str | None = None
    videomae_model: str | None = None
    hog_model: str | None = None  # "maskfeat-hog" (built in) or a HogFlow folder (random-hog)
    dino_size: int | None = None
    sam2_size: int | None = None
    videomae_size: int | None = None
    hog_size: int | None = None  # None: the clip's own size
    # DiT token grid = latent grid / patch
    patch_size: int = R.PATCH_SIZE
    # targets: format, time grid, PCA, measured fidelity
    target_format: str = DEFAULT_TARGET_FORMAT
    time_grid: str = TIME_GRIDS[0]
    pca_dims: int | str | None = None
    pca_fit_clips: int = DEFAULT_PCA_FIT_CLIPS
    fidelity_clips: int = DEFAULT_FIDELITY_CLIPS
    # storage
    block_size: int = 16
    codec: str = CODEC_NAMES[0]
    codec_level: int = 3
    disk_budget: str | None = None
    train_rate: float | None = None  # clips/s a trainer reads (dry run); None: registry.train_rate per model
    # compute
    batch_size: int = 4
    num_workers: int = 4
    device: str = "auto"
    dry_run: bool = False
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Refuse, naming the key, every value no run can use (before any model is loaded)."""
        from stages.common.runtime import check_device

        for key in ("frames", "stride", "clips_per_video", "patch_size", "block_size", "batch_size"):
            _positive_int(key, getattr(self, key))
        _positive_int("pca_fit_clips", self.pca_fit_clips)
        _positive_int("text_max_length", self.text_max_length)
        for key in ("num_workers", "fidelity_clips", "seed"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key}: must be an integer >= 0, got {value!r}")
        for axis, n in self.axes():
            if n % self.patch_size:
                raise ValueError(
                    f"size: {axis}{n} is not a multiple of the patch size {self.patch_size} (it must be a "
                    f"multiple of VAE factor x patch, e.g. {8 * self.patch_size} for the SD VAE)"
                )
        self._check_choices()
        check_device(self.device)
        if not self.encoders:
            raise ValueError(f"encoders: empty; name at least one of {','.join(R.ENCODERS)}")
        unknown = [e for e in self.encoders if e not in R.ENCODERS]
        if unknown:
            raise ValueError(f"encoders: unknown encoder {unknown[0]!r}; choose from {','.join(R.ENCODERS)}")
        dupes = sorted({e for e in self.encoders if self.encoders.count(e) > 1})
        if dupes:
            raise ValueError(f"encoders: {','.join(self.encoders)} names {dupes[0]!r} twice")
        for key in ("dino_size", "sam2_size", "videomae_size", "hog_size"):
            if getattr(self, key) is not None:
                _positive_int(key, getattr(self, key))
        for name, k in self.pca_dims_by_encoder().items():
            if k < 1:
                raise ValueError(f"pca_dims: {name}={k} must be >= 1")
            try:
                check_dim(self.target_format, k)
            except ValueError as exc:
                raise ValueError(f"pca_dims: {name}={exc}") from None
        if self.latent_scale is not None and not self.latent_scale > 0:
            raise ValueError(f"latent_scale: must be > 0, got {self.latent_scale!r}")
        if self.train_rate is not None and not self.train_rate > 0:
            raise ValueError(f"train_rate: must be > 0 clips/s, got {self.train_rate!r}")
        if self.disk_budget is not None:
            parse_size(self.disk_budget)

    def _check_choices(self) -> None:
        choices = {
            "target_format": tuple(TARGET_FORMATS),
            "time_grid": TIME_GRIDS,
            "clip_placement": R.CLIP_PLACEMENTS,
            "codec": CODEC_NAMES,
            "vae_kind": R.VAE_KINDS,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.preset is not None and self.preset not in EXTRACT_PRESETS:
            raise ValueError(f"preset: {self.preset!r} is not one of {', '.join(EXTRACT_PRESETS)}")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"hflip: must be true or false, got {self.hflip!r}")

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of the clips in pixels (`size` parsed: a side, or HEIGHTxWIDTH)."""
        return parse_clip_size(self.size)

    def axes(self) -> list[tuple[str, int]]:
        """("", side) for square clips, else ("height ", h), ("width ", w): how a size error
        names the axis that does not fit."""
        h, w = self.hw
        return [("", h)] if h == w else [("height ", h), ("width ", w)]

    def pca_dims_by_encoder(self) -> dict[str, int]:
        """k per encoder that gets PCA (empty: none)."""
        return parse_pca_dims(self.pca_dims, list(self.encoders))

    def budget_bytes(self) -> int | None:
        return None if self.disk_budget is None else parse_size(self.disk_budget)


def _positive_int(key: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key}: must be a positive integer, got {value!r}")


EXTRACT_PRESETS: dict[str, dict] = {
    # tiny random-initialised models of the real classes; CPU-sized clips
    "tiny": {
        "frames": 8,
        "stride": 1,
        "size": 64,
        "block_size": 4,
        "batch_size": 2,
        "num_workers": 0,
        "device": "cpu",
    },
    # full-size random-initialised copies of the default models (throughput/memory measurement
    # without downloads; features are meaningless); the real clip defaults
    "random-full": {},
}


def preset_values(name: str | None) -> dict:
    if name is None:
        return {}
    if name not in EXTRACT_PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose from {', '.join(EXTRACT_PRESETS)}")
    return dict(EXTRACT_PRESETS[name], preset=name)
