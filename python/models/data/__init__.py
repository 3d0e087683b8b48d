"""Data: in-memory arrays (arrays.py), the data-set sources (sources.py), pre-computed latent folders (latents.py), the SD-VAE (vae.py)."""
