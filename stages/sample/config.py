"""The sampling config: its keys are the `pipeline sample` flags and the YAML keys."""

from __future__ import annotations

from dataclasses import dataclass

from stages.common.registry import (
    DEFAULT_SAMPLER,
    DEFAULT_SAMPLER_CONVENTION,
    GIF_FPS,
    GIF_GRID_MAX,
    SAMPLER_CONVENTIONS,
    SAMPLER_NAMES,
    VAE_KINDS,
)
from stages.common.runtime import check_device


@dataclass
class SampleConfig:
    """What to sample from and how; written resolved to OUT/config.yaml."""

    run: str | None = None  # a train run directory (uses RUN/checkpoints/latest)
    checkpoint: str | None = None  # a step folder (model/ + ema/) or a save_pretrained folder
    num: int = 16
    out: str | None = None  # default: RUN/samples/<checkpoint name> when --run is given
    sampler: str = DEFAULT_SAMPLER
    sampler_convention: str = DEFAULT_SAMPLER_CONVENTION  # repa: REPA's last steps; uniform: uniform grid
    steps: int = 50
    cfg: float = 1.0  # classifier-free guidance scale; 1 = no guidance
    guidance_interval: list[float] | None = None  # [t_lo, t_hi]: guide only there (t=1 noise)
    class_: int | None = None  # CLI: --class; None = balanced spread over classes
    prompt: str | None = None  # a text-to-video run (train --base): every video's prompt
    prompts: str | None = None  # a text file, one prompt per line: video i gets prompt i mod their number
    batch_size: int = 8
    seed: int = 0
    ema: bool = True  # EMA weights when the checkpoint has them
    vae: str | None = None  # None: the run's VAE (its vae_spec); "none": latents only
    vae_kind: str | None = None  # "image" (per-frame AutoencoderKL) or "video"; None: the run's, else image
    latent_scale: float | None = None  # None: the run's value, else SD's (image) or the video VAE's own
    device: str = "auto"
    precision: str = "bf16"  # bf16 autocast on CUDA; CPU always runs fp32
    fps: int = GIF_FPS
    grid_max: int = GIF_GRID_MAX  # videos shown in the GIF grid
    diffusion_norm: float = 1.0  # euler-maruyama only: g(t)^2 = 2 * diffusion_norm * t
    save_latents: bool = False  # also write latents.npz (always written when there is no VAE)
    overwrite: bool = False  # replace samples already in --out (else they are kept and the run refused)

    def validate(self) -> None:
        """Raise ValueError naming the key for values no run can use."""
        checks: list[tuple[bool, str]] = [
            (bool(self.run) or bool(self.checkpoint), "give --run RUN or --checkpoint PATH"),
            (self.num >= 1, "num must be >= 1"),
            (
                self.sampler in SAMPLER_NAMES,
                f"sampler: {self.sampler!r} is not one of {', '.join(SAMPLER_NAMES)}",
            ),
            (
                self.sampler_convention in SAMPLER_CONVENTIONS,
                f"sampler_convention: {self.sampler_convention!r} is not one of {', '.join(SAMPLER_CONVENTIONS)}",
            ),
            (self.steps >= 1, "steps must be >= 1"),
            (self.cfg >= 0, "cfg (guidance scale) must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.class_ is None or self.class_ >= 0, "class must be >= 0"),
            (
                self.prompt is None or self.prompts is None,
                "prompt: pass --prompt TEXT or --prompts FILE, not both",
            ),
            (self.precision in ("bf16", "fp32"), "precision must be bf16 or fp32"),
            (
                self.vae_kind is None or self.vae_kind in VAE_KINDS,
                f"vae_kind must be image or video, got {self.vae_kind!r}",
            ),
            (self.fps >= 1, "fps must be >= 1"),
            (self.grid_max >= 1, "grid_max must be >= 1"),
            (self.diffusion_norm >= 0, "diffusion_norm must be >= 0"),
        ]
        gi = self.guidance_interval
        if gi is not None:
            checks.append(
                (
                    len(gi) == 2 and 0.0 <= gi[0] <= gi[1] <= 1.0,
                    f"guidance_interval must be t_lo,t_hi in [0, 1], got {gi}",
                )
            )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_device(self.device)
