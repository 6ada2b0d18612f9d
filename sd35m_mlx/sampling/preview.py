"""Live previews: the model's current estimate of the clean image, handed to a callback every N steps.

The estimate is x0 = x_t - sigma_t * v (`StepResult.denoised`), first image of the batch, rendered by
"rgb" (a fixed 16 -> 3 linear map at latent resolution: far under 1% of a step) or "taesd" (the
tiny TAESD3 decoder at full resolution). Previews come on every `every`-th step of the run (counted
from its first step, so img2img counts from where it starts) and always on its last step, so the
final preview shows the latents the image is decoded from.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np
from PIL import Image

from ..images import decode_latents
from .loop import StepExtra, StepResult

PREVIEW_METHODS = ("rgb", "taesd")
PreviewCallback = Callable[[int, int, Image.Image], None]

# ComfyUI comfy/latent_formats.py, class SD3: `latent_rgb_factors` (16 x 3) and `latent_rgb_factors_bias`.
# ComfyUI's Latent2RGBPreviewer (latent_preview.py) applies them to the sampler's denoised x0, which
# lives in the model's latent space (`process_in`: (z - 0.0609) * 1.5305), the same space as our
# sampler's latents, and maps the result from [-1, 1] to [0, 1].
SD3_LATENT_RGB_FACTORS = (
    (-0.0922, -0.0175, 0.0749),
    (0.0311, 0.0633, 0.0954),
    (0.1994, 0.0927, 0.0458),
    (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496),
    (-0.0006, 0.1104, 0.0309),
    (0.0978, 0.0306, 0.0427),
    (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669),
    (-0.0488, 0.0130, -0.0268),
    (0.0922, 0.0988, 0.0951),
    (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895),
    (-0.0069, -0.0030, -0.0810),
    (-0.0596, -0.0465, -0.0293),
    (-0.1448, -0.1463, -0.1189),
)
SD3_LATENT_RGB_BIAS = (0.2394, 0.2135, 0.1925)


def latent_rgb(x0: mx.array) -> mx.array:
    """Model-space latents (..., H, W, 16) -> RGB (..., H, W, 3) in [0, 1], at latent resolution."""
    factors = mx.array(SD3_LATENT_RGB_FACTORS, dtype=mx.float32)
    bias = mx.array(SD3_LATENT_RGB_BIAS, dtype=mx.float32)
    rgb = x0.astype(mx.float32) @ factors + bias
    return mx.clip((rgb + 1) / 2, 0.0, 1.0)


def taesd_rgb(taesd, dtype: mx.Dtype) -> Callable[[mx.array], mx.array]:
    """Model-space latents -> RGB in [0, 1] at full resolution through a TAESD decoder."""
    return lambda x0: decode_latents(taesd, x0, dtype)


def to_pil(rgb: mx.array) -> Image.Image:
    """(H, W, 3) in [0, 1] -> an 8-bit PIL image."""
    return Image.fromarray((np.array(rgb) * 255).round().astype(np.uint8))


def is_preview_step(count: int, total: int, every: int) -> bool:
    """Every `every`-th step of the run (1-based), and the run's last step."""
    return count % every == 0 or count == total


class Preview(StepExtra):
    """Calls `on_preview(step, total, image)` with the rendered x0 estimate of the first image."""

    def __init__(self, render: Callable[[mx.array], mx.array], every: int, on_preview: PreviewCallback):
        self.render = render
        self.every = every
        self.on_preview = on_preview

    def observe(self, result: StepResult) -> None:
        s = result.step
        if not is_preview_step(s.count, s.total, self.every):
            return
        rgb = self.render(result.denoised[:1])[0]
        mx.eval(rgb)
        self.on_preview(s.count, s.total, to_pil(rgb))
