"""A1111's hires fix (`enable_hr` on txt2img) as our two-pass upscale (sd35m_mlx/upscale.py): the first pass at
width x height, enlargement in pixel space, img2img at the bigger size with the same seed; the PNG records
both passes as the CLI's --upscale does.

As A1111 (modules/processing.py, StableDiffusionProcessingTxt2Img, commit
0027ce1f6e58c5f4279173e468a60aef420babfe): an empty `hr_prompt` / `hr_negative_prompt` is the first pass's;
the second pass activates the LoRAs of the hr_prompt's own tags (`parse_extra_network_prompts`, then
`extra_networks.activate(p, hr_extra_network_data)`, which turns off the ones it does not name), so an
hr_prompt without tags runs the second pass without LoRAs. "Lanczos", "Nearest" and "None" (a Lanczos
resize in A1111's images.resize_image) run as A1111 runs them, and so do its six "Latent*" modes (A1111's
default "Latent" included): the first pass's latents interpolated as torch does, the second pass from them
(upscale.py). Upscalers we do not have (ESRGAN and the like) run Lanczos, said in info.warnings.
`hr_second_pass_steps` (0: the first pass's steps) is the steps the second pass runs, the last of a schedule of
steps / denoising_strength, as A1111's sample_hr_pass (upscale.py's second_pass_schedule does the conversion).
"""

from __future__ import annotations

from dataclasses import replace

from ..defaults import MAX_PROMPT_CHARS
from ..defaults import UPSCALERS as LIBRARY_UPSCALERS
from ..prompts.syntax import extract_lora_tags
from ..upscale import second_pass_schedule
from ..validation import MAX_STEPS
from .errors import RequestError
from .loras import lora_error
from .spec import Spec

# A1111's name, lowered -> ours
UPSCALERS = {"none": "lanczos", **{label.lower(): name for name, label in LIBRARY_UPSCALERS.items()}}
LATENT_UPSCALE_MODES = [label for label in LIBRARY_UPSCALERS.values() if label.startswith("Latent")]  # A1111's order

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
    if not 0 < strength <= 1:
        raise RequestError(f"denoising_strength must be in (0, 1] with enable_hr, got {strength}", "denoising_strength")
    run = steps or s.steps  # the steps the second pass runs; its schedule is longer (upscale.second_pass_schedule)
    if isinstance(run, int) and run >= 1 and (schedule := second_pass_schedule(run, strength)[0]) > MAX_STEPS:
        message = (
            f"hr_second_pass_steps {run} at denoising_strength {strength:g} makes a schedule of {schedule} "
            f"steps (steps / strength), over {MAX_STEPS}; raise denoising_strength or lower the steps"
        )
        raise RequestError(message, "hr_second_pass_steps")
    spec.given(upscale=float(factor), upscale_strength=strength, upscale_steps=steps)
    asked = str(extra.get("hr_upscaler") or "Latent")  # A1111's default (shared.latent_upscale_default_mode)
    upscaler = UPSCALERS.get(asked.lower(), "lanczos")
    if asked.lower() not in UPSCALERS:
        spec.notes.append(f"hr_upscaler {asked[:60]!r} is not available; ran Lanczos in pixel space")
    prompts = {}
    for name, first in (("hr_prompt", s.prompt), ("hr_negative_prompt", s.negative_prompt)):
        text = extra.get(name) or ""
        if not isinstance(text, str):
            raise RequestError(f"{name} must be a string, got {type(text).__name__}", name)
        if len(text) > MAX_PROMPT_CHARS:
            raise RequestError(f"{name} is too long: {len(text)} characters (at most {MAX_PROMPT_CHARS})", name)
        prompts[name] = text if text and text != first else None  # empty: the first pass's (A1111)
    spec.settings = replace(spec.settings, upscaler=upscaler, upscale_prompt=prompts["hr_prompt"],
                            upscale_negative_prompt=prompts["hr_negative_prompt"])  # fmt: skip


def _side(extra: dict, name: str) -> int:
    v = extra.get(name) or 0
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise RequestError(f"{name} must be a whole number of pixels, got {v!r}", name)
    return v


def make_images(pipe, spec: Spec, kwargs: dict, **extra) -> list:
    """One image of a job: `pipe.generate`, or with upscale settings the two passes of `upscale_generate`
    (an hr_prompt's LoRAs for the second pass; the request's own are active again afterwards)."""
    s = spec.settings
    if s.upscale is None:
        return pipe.generate(**kwargs, **extra)
    from ..upscale import upscale_generate

    kwargs = dict(kwargs)
    kwargs.pop("num_images_per_prompt", None)
    prompt = kwargs.pop("prompt")
    second_prompt = None if s.upscale_prompt is None else extract_lora_tags(s.upscale_prompt)[0]
    second = None if spec.upscale_loras is None else [(path, w) for _, path, w in spec.upscale_loras]
    switch = second is not None and second != spec.lora_files
    try:
        result = upscale_generate(pipe, prompt, factor=s.upscale, strength=s.upscale_strength,
                                  upscale_steps=s.upscale_steps, upscaler=s.upscaler, upscale_prompt=second_prompt,
                                  upscale_negative_prompt=s.upscale_negative_prompt,
                                  upscale_loras=second if switch else None,
                                  **kwargs, **extra)  # fmt: skip
    except (ValueError, OSError) as e:  # the hires LoRAs' files: said by name, never by the server's path
        if switch and any(path in str(e) for _, path, _ in spec.upscale_loras):
            raise lora_error(e, spec.upscale_loras) from None
        raise
    finally:
        if switch:
            pipe.use_loras(spec.lora_files)
    return result.images
