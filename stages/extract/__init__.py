"""Stage one: videos -> VAE latents + per-encoder frozen-encoder targets -> zarr."""
