"""Two-pass upscaling: generate, enlarge (in pixel space, or the latents as A1111's "Latent" upscalers), refine with
img2img at the target size.

The SD3.5 Medium model card's "SD3.5 Large + SD3.5 Medium upscaling" workflow: the first pass composes at a
size the model was trained on, the second (the same model, or another SD3-family one) adds the detail of the
larger size while img2img at a low strength (default 0.35) keeps the composition. Same seed in both passes.

Pixel space (Lanczos, the default) rather than latent space: the SD3 VAE's 16 latent channels are not a small
image. Interpolated (bilinear, nearest), their fine structure is smeared or blocked, which the decoder renders
as blur and colour noise, and img2img at 0.35 strength keeps 65% of it. Lanczos on the decoded image is a clean
enlargement that the VAE encodes back faithfully; it costs one decode and one encode, both tiled at large
sizes (pipeline/tiling.py). The "latent*" upscalers do what A1111's hires fix does with its default "Latent"
(modules/processing.py, StableDiffusionProcessingTxt2Img.sample_hr_pass at commit
0027ce1f6e58c5f4279173e468a60aef420babfe): the first pass's latents resized as torch's F.interpolate
(editing/interpolate.py) with the mode of A1111's `latent_upscale_modes` (modules/shared.py), the second pass an img2img
from them, no VAE round trip; they want a higher strength (A1111's UI: 0.7) to clean the interpolation up.

The second pass's steps are A1111's "Hires steps": the steps it runs, not the length of its schedule. A1111's
sample_hr_pass samples with steps=hr_second_pass_steps or the first pass's, and setup_img2img_steps
(modules/sd_samplers_common.py at 0027ce1f) turns S steps at strength d into a schedule of int(S / min(d, 0.999))
steps of which the last S run (t_enc = S - 1). diffusers' img2img instead runs about S * d of an S-step schedule.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from PIL import Image

from .defaults import SIZE, STEPS, UPSCALERS, scaled_size
from .editing.interpolate import interpolate
from .validation import MAX_STEPS


def target_size(width: int, height: int, factor: float) -> tuple[int, int]:
    """width x height scaled by `factor`, each rounded to a multiple of 16."""
    if not isinstance(factor, (int, float)) or not factor >= 1:
        raise ValueError(f"factor must be a number >= 1, got {factor!r}")
    return scaled_size(width, height, factor)


# the pixel-space enlargements: A1111's "Lanczos" and "Nearest" upscalers are these PIL filters (its
# modules/upscaler.py, commit 01a40c62556b8cf3beb418e382760dd21811d3b2); its "None" resizes with Lanczos too
PIXEL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
# the latent ones: (F.interpolate mode, antialias), as A1111's shared.latent_upscale_modes
LATENT_MODES = {
    "latent": ("bilinear", False),
    "latent-antialiased": ("bilinear", True),
    "latent-bicubic": ("bicubic", False),
    "latent-bicubic-antialiased": ("bicubic", True),
    "latent-nearest": ("nearest", False),
    "latent-nearest-exact": ("nearest-exact", False),
}


def enlarge(image: Image.Image, size: tuple[int, int], upscaler: str = "lanczos") -> Image.Image:
    """`image` resized to `size` by one of PIXEL_FILTERS."""
    return image.convert("RGB").resize(size, PIXEL_FILTERS[upscaler])


def enlarge_latents(latents, size: tuple[int, int], upscaler: str = "latent", vae_scale_factor: int = 8) -> mx.array:
    """Model-space latents NHWC resized for an image of `size` (width, height) px by one of LATENT_MODES."""
    mode, antialias = LATENT_MODES[upscaler]
    f = vae_scale_factor
    return mx.array(interpolate(np.asarray(latents), (size[1] // f, size[0] // f), mode, antialias))


def lanczos(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return enlarge(image, size, "lanczos")


@dataclass
class UpscaleResult:
    images: list[Image.Image]  # the second pass's, at the target size
    first_pass: list[Image.Image]
    passes: list[dict] = field(default_factory=list)  # each pass's size, steps, strength (metadata)


def second_pass_schedule(steps: int, strength: float) -> tuple[int, float]:
    """A1111's hires schedule for `steps` steps run at `strength`: (its length N = int(steps / min(strength, 0.999)),
    the img2img strength that starts an N-step schedule at N - steps).

    Not `strength` itself: diffusers' start int(N - N * strength) is float arithmetic, and where steps / strength is
    a whole number N * strength can land a hair above `steps` (51 steps at 0.68: N = 75, 75 * 0.68 =
    51.00000000000001, start 23, 52 steps). (steps - 0.5) / N sits half a step from either neighbour, so the start
    is N - steps for any N. The strength only sets the start (pipeline/steps.py initial_latents).
    """
    n = int(steps / min(strength, 0.999))
    return n, (steps - 0.5) / n


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
    upscaler: str = "lanczos",
    upscale_prompt: str | None = None,
    upscale_negative_prompt: str | None = None,
    upscale_loras=None,
    width: int = SIZE,
    height: int = SIZE,
    num_inference_steps: int = STEPS,
    seed: int | None = None,
    **generate_kwargs,
) -> UpscaleResult:
    """Pass 1 `pipe.generate` at width x height; each image enlarged by `factor` (sides rounded to multiples
    of 16) with `upscaler` (one of UPSCALERS: "lanczos" or "nearest" on the image, a "latent*" one on the
    latents, as A1111); pass 2 img2img at `strength` running `upscale_steps` steps (default: pass 1's), the
    last ones of a schedule of int(upscale_steps / min(strength, 0.999)) steps, as A1111's hires fix
    (second_pass_schedule), with the same seed, by `second` (a StableDiffusion35, or a function that loads one;
    default `pipe`). `passes` records the steps each pass runs, and the second's schedule length.

    The second pass reads `upscale_prompt` / `upscale_negative_prompt` where given (A1111's hr_prompt and
    hr_negative_prompt; None: the first pass's), and with `upscale_loras` ([(file, weight)], `use_loras`)
    runs with exactly those LoRAs active, which stay active after the call. With a loader and
    `pipe.low_memory`, the first pipeline's transformer and text encoders are released before the second
    loads. Other keyword arguments (guidance, sampler, ...) go to both passes.
    """
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if upscale_steps is not None and (not isinstance(upscale_steps, int) or upscale_steps < 1):
        raise ValueError(f"upscale_steps must be an integer >= 1, got {upscale_steps!r}")
    if upscaler not in UPSCALERS:
        raise ValueError(f"upscaler must be one of {', '.join(UPSCALERS)}, got {upscaler!r}")
    size = target_size(width, height, factor)
    steps = upscale_steps or num_inference_steps
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    schedule, start_strength = second_pass_schedule(steps, strength)
    if schedule > MAX_STEPS:  # said before the first pass, not after it
        raise ValueError(
            f"the second pass's schedule, int({steps} steps / strength {strength:g}) = {schedule} steps, is over "
            f"{MAX_STEPS}; raise the strength or lower the steps"
        )
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    common = dict(generate_kwargs, seed=seed, output_type="pil")
    first_kwargs = dict(common, output_type="latent") if upscaler in LATENT_MODES else common
    first = pipe.generate(prompt, width=width, height=height, num_inference_steps=num_inference_steps, **first_kwargs)
    if upscaler in LATENT_MODES:  # the second pass starts from these; the first pass's images are their decode
        starts = [enlarge_latents(first[i : i + 1], size, upscaler, pipe.vae_scale_factor) for i in range(len(first))]
        first = pipe.decode(first)
    else:
        starts = [enlarge(image, size, upscaler) for image in first]

    if second is None:
        second = pipe
    elif callable(second) and not hasattr(second, "generate"):
        if getattr(pipe, "low_memory", False):
            release(pipe)
        second = second()
    if upscale_loras is not None:
        second.use_loras(upscale_loras)
    if upscale_negative_prompt is not None:
        common["negative_prompt"] = upscale_negative_prompt
    refined = []
    for start in starts:
        out = second.generate(
            prompt if upscale_prompt is None else upscale_prompt,
            image=start,
            strength=start_strength,
            width=size[0],
            height=size[1],
            num_inference_steps=schedule,
            **{**common, "num_images_per_prompt": 1},
        )
        refined.extend(out)
    passes = [
        dict(width=width, height=height, steps=num_inference_steps),
        dict(
            width=size[0],
            height=size[1],
            steps=steps,
            schedule=schedule,
            strength=strength,
            upscaler=UPSCALERS[upscaler],
            factor=factor,
        ),
    ]
    return UpscaleResult(refined, first, passes)
