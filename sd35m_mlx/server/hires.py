"""A1111's hires fix (`enable_hr` on txt2img) as our two-pass upscale (sd35m_mlx/upscale.py): the first pass at
width x height, Lanczos enlargement, img2img at the bigger size with the same seed; the PNG records both
passes as the CLI's --upscale does. What we run differently (another upscaler, a second-pass prompt) is
said in info.warnings.
"""

from __future__ import annotations

from .errors import RequestError
from .spec import Spec

HR_STRENGTH = 0.7  # A1111's "Hires fix" denoising strength default (its UI)
# the payload fields acted on here (a1111_fields.py keeps naming the others, hr_checkpoint_name, hr_sampler_name...,
# and all of them on img2img, which has no hires fix in A1111 either)
HIRES_FIELDS = frozenset({"enable_hr", "hr_scale", "hr_resize_x", "hr_resize_y", "hr_second_pass_steps", "hr_upscaler",
                          "hr_prompt", "hr_negative_prompt"})  # fmt: skip


def apply_hires(extra: dict, spec: Spec, denoising_strength: float | None) -> None:
    """Set spec's upscale settings from a txt2img payload's hires fields (`extra`), when enable_hr is on."""
    if not extra.get("enable_hr"):
        return
    s = spec.settings
    x, y = _side(extra, "hr_resize_x"), _side(extra, "hr_resize_y")
    if x or y:  # A1111 resizes to x by y; we keep the aspect and scale by the first side given
        factor = x / s.width if x else y / s.height
        if x and y and abs(x / s.width - y / s.height) > 1e-6:
            spec.notes.append(f"hr_resize {x}x{y} changes the aspect; scaled by {factor:g} keeping it")
    else:
        factor = extra.get("hr_scale", 2.0)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool):
            raise RequestError(f"hr_scale must be a number, got {factor!r}", "hr_scale")
    if not factor >= 1:
        message = f"hr_scale must be >= 1 (the hires size at least the first pass's), got {factor:g}"
        raise RequestError(message, "hr_scale")
    steps = extra.get("hr_second_pass_steps") or None  # 0: as the first pass (A1111)
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise RequestError(f"hr_second_pass_steps must be an integer >= 0, got {steps!r}", "hr_second_pass_steps")
    strength = HR_STRENGTH if denoising_strength is None else denoising_strength
    spec.given(upscale=float(factor), upscale_strength=strength, upscale_steps=steps)
    upscaler = extra.get("hr_upscaler") or "Lanczos"
    if str(upscaler).lower() != "lanczos":
        spec.notes.append(f"hr_upscaler {str(upscaler)[:60]!r} is not available; ran Lanczos")
    for name, first in (("hr_prompt", s.prompt), ("hr_negative_prompt", s.negative_prompt)):
        if extra.get(name) and extra[name] != first:
            spec.notes.append(f"{name} is not supported; the second pass used the first pass's")


def _side(extra: dict, name: str) -> int:
    v = extra.get(name) or 0
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise RequestError(f"{name} must be a whole number of pixels, got {v!r}", name)
    return v


def make_images(pipe, spec: Spec, kwargs: dict, **extra) -> list:
    """One image of a job: `pipe.generate`, or with upscale settings the two passes of `upscale_generate`."""
    s = spec.settings
    if s.upscale is None:
        return pipe.generate(**kwargs, **extra)
    from ..upscale import upscale_generate

    kwargs = dict(kwargs)
    kwargs.pop("num_images_per_prompt", None)
    prompt = kwargs.pop("prompt")
    result = upscale_generate(pipe, prompt, factor=s.upscale, strength=s.upscale_strength,
                              upscale_steps=s.upscale_steps, **kwargs, **extra)  # fmt: skip
    return result.images
