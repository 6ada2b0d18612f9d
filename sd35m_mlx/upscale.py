"""Two-pass upscaling: generate, enlarge with Lanczos in pixel space, refine with img2img at the target size.

The SD3.5 Medium model card's "SD3.5 Large + SD3.5 Medium upscaling" workflow: the first pass composes at a
size the model was trained on, the second (the same model, or another SD3-family one) adds the detail of the
larger size while img2img at a low strength (default 0.35) keeps the composition. Same seed in both passes.

Why pixel space and not latent space: the SD3 VAE's 16 latent channels are not a small image. Interpolated
(bilinear, nearest), their fine structure is smeared or blocked, which the decoder renders as blur and
colour noise, and img2img at 0.35 strength keeps 65% of it. Lanczos on the decoded image is a clean
enlargement that the VAE encodes back faithfully; it costs one decode and one encode, both tiled at large
sizes (pipeline/tiling.py), so the bigger image never needs the untiled VAE's memory.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

import mlx.core as mx
from PIL import Image

from .defaults import SIZE, STEPS, scaled_size


def target_size(width: int, height: int, factor: float) -> tuple[int, int]:
    """width x height scaled by `factor`, each rounded to a multiple of 16."""
    if not isinstance(factor, (int, float)) or not factor >= 1:
        raise ValueError(f"factor must be a number >= 1, got {factor!r}")
    return scaled_size(width, height, factor)


def lanczos(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.convert("RGB").resize(size, Image.Resampling.LANCZOS)


@dataclass
class UpscaleResult:
    images: list[Image.Image]  # the second pass's, at the target size
    first_pass: list[Image.Image]
    passes: list[dict] = field(default_factory=list)  # each pass's size, steps, strength (metadata)


def release(pipe) -> None:
    """Drop a pipeline's transformer and text encoders (low_memory reloads them when next needed)."""
    for name in ("transformer", "prompt_encoder"):
        pipe._release(name)
    gc.collect()
    mx.clear_cache()


def upscale_generate(
    pipe,
    prompt: str,
    *,
    factor: float,
    strength: float = 0.35,
    upscale_steps: int | None = None,
    second=None,
    width: int = SIZE,
    height: int = SIZE,
    num_inference_steps: int = STEPS,
    seed: int | None = None,
    **generate_kwargs,
) -> UpscaleResult:
    """Pass 1 `pipe.generate` at width x height; each image Lanczos-enlarged by `factor` (sides rounded to
    multiples of 16); pass 2 img2img at `strength` with `upscale_steps` steps (default: as pass 1) and the
    same seed, by `second` (a StableDiffusion35, or a function that loads one; default `pipe`).

    With a loader and `pipe.low_memory`, the first pipeline's transformer and text encoders are released
    before the second loads. Other keyword arguments (prompt, guidance, sampler, ...) go to both passes.
    """
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if upscale_steps is not None and (not isinstance(upscale_steps, int) or upscale_steps < 1):
        raise ValueError(f"upscale_steps must be an integer >= 1, got {upscale_steps!r}")
    size = target_size(width, height, factor)
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    common = dict(generate_kwargs, seed=seed, output_type="pil")
    first = pipe.generate(prompt, width=width, height=height, num_inference_steps=num_inference_steps, **common)

    if second is None:
        second = pipe
    elif callable(second) and not hasattr(second, "generate"):
        if getattr(pipe, "low_memory", False):
            release(pipe)
        second = second()
    steps = upscale_steps or num_inference_steps
    refined = []
    for image in first:
        up = lanczos(image, size)
        out = second.generate(
            prompt,
            image=up,
            strength=strength,
            width=size[0],
            height=size[1],
            num_inference_steps=steps,
            **{**common, "num_images_per_prompt": 1},
        )
        refined.extend(out)
    passes = [
        dict(width=width, height=height, steps=num_inference_steps),
        dict(width=size[0], height=size[1], steps=steps, strength=strength, upscaler="Lanczos", factor=factor),
    ]
    return UpscaleResult(refined, first, passes)
