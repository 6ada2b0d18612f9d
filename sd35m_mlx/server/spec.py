"""What one request asks for (`Spec`), checked before it is queued, and how it becomes generate() calls.

Both API dialects translate their fields into a `Spec`; everything a client can get wrong is caught
here as a `RequestError` naming the field, so a job that reaches the worker only fails for our faults.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from ..defaults import MAX_PROMPT_CHARS, MAX_SEED, MIN_SIDE, MULTIPLE
from ..record import JSON_KEY, PARAMETERS_KEY, Settings, plan_seeds, png_info, save_options, stored_text
from .errors import RequestError


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_side: int = 2048
    max_steps: int = 200
    max_images: int = 16  # images per request (OpenAI's `n`, A1111's batch_size x n_iter)


@dataclass
class Spec:
    """One request: the settings of its images as their PNGs record them (the seed, the model and how it was
    loaded are filled in per image by `settings_for`), a seed per image, and the decoded input images."""

    settings: Settings
    seeds: list[int] = field(default_factory=lambda: plan_seeds((), 1))
    image: Image.Image | None = None  # img2img input, already decoded and checked (settings.strength is set with it)
    mask: Image.Image | None = None  # inpainting: "L", white = repaint, the image's size (server/masks.py)
    padding_mask_crop: int | None = None  # inpainting: repaint a crop around the mask (px of padding)
    notes: list[str] = field(default_factory=list)  # what we ran differently from what was asked
    lora_files: list[tuple[str, float]] = field(default_factory=list)  # the prompt's <lora:> tags' files (loras.py)
    upscale_loras: list[tuple[str, str, float]] | None = None  # the hires prompt's (name, file, weight); None: as above
    checkpoint: str | None = None  # a served model's title to run on (server/models.py); None: the resident one
    restore: bool = True  # switch back to the previous model afterwards (A1111's override_settings_restore_afterwards)
    control: Any = None  # the ControlNet units (server/controlnets.py ControlPlan); None: no ControlNet
    outpaint: Any = None  # editing/outpaint.py's Outpaint: image and mask are its canvas, results are composited

    def given(self, **changes) -> None:
        """Set the settings a client gave (None: not given, the default stays)."""
        self.settings = replace(self.settings, **{k: v for k, v in changes.items() if v is not None})


def seeds_for(first: int | None, n: int, limits: Limits, param: str = "n") -> list[int]:
    """n seeds from `first` (+1 each, as the CLI and A1111 do); random when `first` is None."""
    if not 1 <= n <= limits.max_images:
        raise RequestError(f"{param} must be between 1 and {limits.max_images} images, got {n}", param)
    if first is not None and not 0 <= first <= MAX_SEED:
        raise RequestError(f"seed must be between 0 and {MAX_SEED} (or omitted for a random one), got {first}", "seed")
    return plan_seeds(() if first is None else (first,), n)


def parse_size(size: str, param: str = "size") -> tuple[int, int]:
    """'WxH' -> (width, height)."""
    try:
        w, h = (int(v) for v in str(size).lower().split("x"))
    except ValueError:
        raise RequestError(f"{param} must be WIDTHxHEIGHT in pixels (e.g. 1024x1024), got {size!r}", param) from None
    return w, h


def check(spec: Spec, limits: Limits, model_max_side: int) -> None:
    """Raise RequestError for anything the model cannot run or the server will not take."""
    s = spec.settings
    if len(s.prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"prompt is too long: {len(s.prompt)} characters (at most {MAX_PROMPT_CHARS})", "prompt")
    if len(s.negative_prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"negative_prompt is too long (at most {MAX_PROMPT_CHARS} characters)", "negative_prompt")
    top = min(limits.max_side, model_max_side)
    for name, v in (("width", s.width), ("height", s.height)):
        if not MIN_SIDE <= v <= top:
            raise RequestError(f"{name} must be between {MIN_SIDE} and {top} px, got {v}", name)
        if v % MULTIPLE:
            near = min(max(round(v / MULTIPLE) * MULTIPLE, MIN_SIDE), top)
            raise RequestError(f"{name} must be a multiple of {MULTIPLE}, got {v} (try {near})", name)
    if s.upscale is not None and max(s.upscale_size) > top:  # the hires fix's second pass (server/hires.py)
        w, h = s.upscale_size
        raise RequestError(f"the hires size {w}x{h} is beyond {top} px; lower hr_scale or hr_resize", "hr_scale")
    if s.upscale_steps is not None and s.upscale_steps > limits.max_steps:
        raise RequestError(f"hr_second_pass_steps must be at most {limits.max_steps}", "hr_second_pass_steps")
    if not 1 <= s.steps <= limits.max_steps:
        raise RequestError(f"steps must be between 1 and {limits.max_steps}, got {s.steps}", "steps")
    if not (math.isfinite(s.cfg) and 0 <= s.cfg <= 100):
        raise RequestError(f"guidance scale must be a number between 0 and 100, got {s.cfg}", "guidance_scale")
    if spec.image is not None and not (s.strength is not None and math.isfinite(s.strength) and 0 < s.strength <= 1):
        raise RequestError(f"strength must be in (0, 1], got {s.strength}", "strength")
    if not 1 <= len(spec.seeds) <= limits.max_images:
        raise RequestError(
            f"the number of images must be between 1 and {limits.max_images}, got {len(spec.seeds)}", "n"
        )
    for seed in spec.seeds:
        if not 0 <= seed <= MAX_SEED:
            raise RequestError(f"seed must be between 0 and {MAX_SEED}, got {seed}", "seed")


@dataclass(frozen=True)
class ModelInfo:
    """What the server knows of its one model: its public name and how it was loaded (for PNG metadata)."""

    name: str
    num_layers: int
    max_side: int
    dtype: str = "float32"
    t5: bool = True
    quantize: int | None = None
    t5_quantize: str | None = None

    @classmethod
    def of(cls, pipe, name: str, **load_options) -> ModelInfo:
        cfg = pipe.transformer_config
        t5 = getattr(getattr(pipe, "prompt_encoder", None), "text_encoder_3", None) is not None
        dtype = str(getattr(pipe, "dtype", "float32")).replace("mlx.core.", "")
        return cls(
            name,
            cfg.num_layers,
            cfg.pos_embed_max_size * pipe.vae_scale_factor * cfg.patch_size,
            dtype,
            t5,
            **load_options,
        )


def settings_for(spec: Spec, seed: int, model: ModelInfo) -> Settings:
    """The settings of one image (what the PNG stores; `sd35m-mlx --from-image` re-runs it)."""
    loaded = dict(dtype=model.dtype, t5=model.t5, quantize=model.quantize, t5_quantize=model.t5_quantize)
    return replace(spec.settings, seed=seed, model=model.name, **loaded).fit_slg(
        model.num_layers
    )  # SLG's default layers where the model has them


def generate_kwargs(spec: Spec, seed: int, model: ModelInfo) -> dict:
    """Keyword arguments for `pipe.generate` (prompt included): the same call a script would make."""
    kwargs = settings_for(spec, seed, model).generate_kwargs()
    if spec.image is not None:
        kwargs.update(image=spec.image, strength=spec.settings.strength)
    if spec.mask is not None:
        kwargs.update(mask_image=spec.mask, padding_mask_crop=spec.padding_mask_crop)
    if spec.control is not None:
        kwargs.update(spec.control.generate_kwargs())
    return {"prompt": spec.settings.encoder_prompt, **kwargs}


def finish(spec: Spec, images: list) -> list:
    """The images as the request gets them: outpainting lays the original back over the result (as the CLI)."""
    return spec.outpaint.composite(images) if spec.outpaint is not None else images


def png_bytes(image: Image.Image, spec: Spec, seed: int, model: ModelInfo, version: str) -> bytes:
    """The image as PNG with the CLI's metadata chunks (A1111 `parameters` and our JSON)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(settings_for(spec, seed, model), version))
    return buf.getvalue()


def reencode(png: bytes, fmt: str, quality: int) -> bytes:
    """A PNG of png_bytes as `fmt` ("PNG", "JPEG", "WEBP") at `quality`, its settings carried over (in EXIF,
    as the CLI writes JPEG and WebP)."""
    if fmt == "PNG":
        return png
    with Image.open(io.BytesIO(png)) as im:
        text = stored_text(im)
        buf = io.BytesIO()
        options = save_options(fmt, text.get(PARAMETERS_KEY, ""), text.get(JSON_KEY, "{}"), quality)
        im.convert("RGB").save(buf, **options)
    return buf.getvalue()
