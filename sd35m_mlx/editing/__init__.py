"""Editing: inpainting, outpainting and ControlNet conditioning, as per-step pieces of the denoising loop."""
