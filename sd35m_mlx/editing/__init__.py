"""Editing: inpainting, outpainting and ControlNet conditioning, as per-step pieces of the denoising loop; the latent
resize of A1111's latent upscalers (interpolate.py)."""
