"""VideoDiTPipeline: class-conditional video generation from an align4gen VideoDiT, for diffusers.

`pipeline export` copies this file (and the VideoDiT's own module, transformer/videodit.py) into
the exported folder, so the folder loads with diffusers alone:

    pipe = DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)
    videos = pipe(num_videos=4, num_inference_steps=50, seed=0).videos  # uint8 [N, T, H, W, 3]

It imports torch, numpy and diffusers only. It reproduces `pipeline sample --sampler euler` with
the same seed, steps and guidance: the Euler grid t = linspace(1, 0, N + 1) of flow matching
(t = 1 noise, t = 0 data; x_t = (1 - t) x0 + t eps; the model predicts v = eps - x0), given to
FlowMatchEulerDiscreteScheduler as its sigmas; video i's initial noise drawn from its own CPU
generator seeded with seed * 1_000_003 + i (so the batch size never changes a video); labels a
balanced round-robin over the classes unless `class_labels` is given; classifier-free guidance
v_u + s (v_c - v_u) with both branches in one forward; latents / latent_scale decoded by the VAE
(an image VAE frame by frame, 32 frames at a time; a video VAE whole), mapped to uint8 as
round((clamp(x, -1, 1) + 1) * 127.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

NOISE_STRIDE = 1_000_003  # stages/common/sampling.py: video i's noise seed is seed * NOISE_STRIDE + i
FRAME_BATCH = 32  # frames an image VAE decodes at once (stages/common/models/vae.py)


@dataclass
class VideoDiTPipelineOutput(BaseOutput):
    videos: np.ndarray  # uint8 [N, T, H, W, 3] (or latents [N, C, T, h, w] with output_type="latent")
    labels: np.ndarray  # int64 [N], -1 for an unconditional model


class VideoDiTPipeline(DiffusionPipeline):
    """VideoDiT + VAE + flow-matching Euler scheduler. `latent_scale` is the factor the training
    latents were multiplied by; `vae_kind` is "image" (per frame) or "video"."""

    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer, vae, scheduler, latent_scale: float = 0.18215, vae_kind: str = "image"):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        self.register_to_config(latent_scale=float(latent_scale), vae_kind=str(vae_kind))

    def labels_for(self, num_videos: int, class_labels=None) -> np.ndarray:
        num_classes = int(self.transformer.config.num_classes)
        if class_labels is not None:
            labels = np.broadcast_to(np.asarray(class_labels, dtype=np.int64), (num_videos,)).copy()
            if num_classes <= 0 or labels.min() < 0 or labels.max() >= num_classes:
                raise ValueError(f"class_labels must lie in [0, {num_classes}) for this model")
            return labels
        if num_classes <= 0:
            return np.full(num_videos, -1, dtype=np.int64)
        return np.arange(num_videos, dtype=np.int64) % num_classes

    def initial_noise(self, indices: range, seed: int) -> torch.Tensor:
        c = self.transformer.config
        size = c.sample_size  # latent cells: an int (square) or [height, width]
        shape = (c.in_channels, c.num_frames, *((size, size) if isinstance(size, int) else size))
        gens = [torch.Generator().manual_seed(seed * NOISE_STRIDE + i) for i in indices]
        return torch.stack([torch.randn(shape, generator=g) for g in gens])

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, y, guidance_scale: float) -> torch.Tensor:
        t = torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)
        if y is None or guidance_scale == 1.0:
            return self.transformer(x, t, y).float()
        null = torch.full_like(y, int(self.transformer.config.num_classes))
        v = self.transformer(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float()
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def denoise(
        self, noise: torch.Tensor, y, num_inference_steps: int, guidance_scale: float
    ) -> torch.Tensor:
        grid = np.linspace(1.0, 0.0, num_inference_steps + 1, dtype=np.float64)[:-1]
        self.scheduler.set_timesteps(sigmas=grid.tolist(), device=noise.device)
        x = noise.float()
        for i, timestep in enumerate(self.scheduler.timesteps):
            v = self.velocity(x, self.scheduler.sigmas[i], y, guidance_scale)
            x = self.scheduler.step(v, timestep, x).prev_sample
        return x

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        dtype = next(self.vae.parameters()).dtype
        z = latents.to(self.vae.device, dtype) / self.config.latent_scale
        b, c, t, h, w = z.shape
        if self.config.vae_kind == "image":
            flat = z.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
            outs = [
                self.vae.decode(flat[i : i + FRAME_BATCH]).sample.float()
                for i in range(0, b * t, FRAME_BATCH)
            ]
            x = torch.cat(outs).reshape(b, t, 3, outs[0].shape[-2], outs[0].shape[-1])
        else:
            x = self.vae.decode(z).sample.float().permute(0, 2, 1, 3, 4)
        x = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        return x.permute(0, 1, 3, 4, 2).contiguous().cpu().numpy()

    @torch.no_grad()
    def __call__(
        self,
        num_videos: int = 1,
        num_inference_steps: int = 50,
        seed: int = 0,
        guidance_scale: float = 1.0,
        class_labels=None,
        batch_size: int = 8,
        output_type: str = "np",
    ) -> VideoDiTPipelineOutput:
        """Generate `num_videos` videos; the same arguments as `pipeline sample --num --steps --seed
        --cfg --class --batch-size` give the same videos. output_type "latent" skips the VAE."""
        labels = self.labels_for(num_videos, class_labels)
        device = self.transformer.device
        out = []
        for lo in range(0, num_videos, batch_size):
            idx = range(lo, min(lo + batch_size, num_videos))
            noise = self.initial_noise(idx, seed).to(device)
            y = None if labels[0] < 0 else torch.from_numpy(labels[idx.start : idx.stop]).to(device)
            latents = self.denoise(noise, y, num_inference_steps, guidance_scale).float()
            out.append(latents.cpu().numpy() if output_type == "latent" else self.decode(latents))
        return VideoDiTPipelineOutput(videos=np.concatenate(out), labels=labels)
