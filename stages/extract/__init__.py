"""Stage one: videos -> VAE latents + fused frozen-encoder targets -> zarr."""
