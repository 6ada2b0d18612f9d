"""Every generation argument checked in one place, before any work: the API, the CLI and the server share it.

`validate_generation(limits, **arguments)` takes `StableDiffusion35.generate()`'s keyword arguments
(same names, same defaults) and returns them checked and normalised as a frozen `GenerationSettings`
(Python ints and floats, tuples, the image size resolved), or raises `InvalidValue` (a ValueError) or
`InvalidType` (a TypeError) whose one-line message names the argument and what is valid. Callers catch
`InvalidInput` to tell bad input from a failure of the model (the CLI: exit 2; a server: 422).

`limits` (`ModelLimits`, `pipe.limits`) adds the checks that depend on the model (size multiple and
maximum, block indices, latent channels); None skips them, as the CLI does before the model is loaded.
`names` renames arguments in messages (the CLI says `--cfg` where the API says `guidance_scale`).

This module imports neither mlx nor the pipeline, so the CLI can check before it loads anything.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from . import defaults as D
from .defaults import MAX_PROMPT_CHARS, MAX_SEED, MAX_SEQUENCE_LENGTH, SAMPLERS
from .sampling.noise import RNG_SOURCES
from .sampling.schedulers import SCHEDULERS

if TYPE_CHECKING:  # names for the annotations only: this module imports neither mlx nor PIL
    import mlx.core as mx
    from PIL import Image

    Array = np.ndarray | mx.array  # or nested lists of numbers
    # a file, a PIL image, (H, W, 3) or (B, H, W, 3) RGB; for `image`, also latents (B, H/8, W/8, C) NHWC
    ImageInput = Image.Image | str | os.PathLike | Array
    Prompt = str | Sequence[str]

MAX_STEPS = 1000
MAX_BATCH = 64  # images from one generate() call: prompts x num_images_per_prompt
MAX_GUIDANCE = 100.0  # ComfyUI's cap for cfg; useful values are 1-10, far larger ones only saturate
MAX_LATENT = 1e4  # initial noise is ~N(0, 1); on the tiny fixture 1e37 (float32) or 1e30 (float16) gave NaN pixels


class InvalidInput(Exception):
    """Bad input to a generation (the base of InvalidValue and InvalidType); never a failure of the model."""


class InvalidValue(InvalidInput, ValueError):
    pass


class InvalidType(InvalidInput, TypeError):
    pass


@dataclass(frozen=True)
class ModelLimits:
    """What a loaded model accepts (`StableDiffusion35.limits`)."""

    size_multiple: int  # VAE factor x patch size (16 for SD3)
    max_side: int  # the positional table's size in pixels (pos_embed_max_size x size_multiple)
    num_layers: int  # transformer blocks; skip_guidance_layers index them
    latent_channels: int
    vae_scale_factor: int
    context_width: int | None = None  # prompt_embeds' last dimension (joint_attention_dim)
    pooled_width: int | None = None  # pooled_prompt_embeds' last dimension (pooled_projection_dim)


@dataclass(frozen=True)
class GenerationSettings:
    """generate()'s arguments, typed as `validated()` returns them (tuples for sequences); built from what a
    caller passed they may hold anything, which `validated()` checks. Defaults pinned to generate()'s by a test."""

    prompt: Prompt | None = None
    negative_prompt: Prompt = ""
    prompt_2: Prompt | None = None
    prompt_3: Prompt | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = D.STEPS
    guidance_scale: float = D.GUIDANCE
    seed: int | Sequence[int] | None = None  # a list: one seed per image (diffusers' list of generators)
    latents: Array | None = None  # NHWC initial noise
    num_images_per_prompt: int = 1
    max_sequence_length: int = D.SEQUENCE_LENGTH
    sampler: str = D.SAMPLER
    scheduler: str = D.SCHEDULER
    shift: float | None = None  # None: the model's scheduler config
    rng: str = D.RNG  # "cpu", "nv" or "mlx" (sampling/noise.py)
    prompt_syntax: str = D.PROMPT_SYNTAX  # "plain" or "weighted"
    text_encoding: str = D.TEXT_ENCODING  # "diffusers" or "comfyui" (prompts/comfyui.py)
    skip_guidance_layers: Sequence[int] | None = None
    skip_layer_guidance_scale: float = D.SLG_SCALE
    skip_layer_guidance_start: float = D.SLG_START
    skip_layer_guidance_stop: float = D.SLG_STOP
    image: ImageInput | None = None
    strength: float = D.STRENGTH
    output_type: str = "pil"  # "pil", "np" or "latent"
    callback: Callable[[int, int, mx.array], bool | None] | None = None
    prompt_embeds: Array | None = None
    negative_prompt_embeds: Array | None = None
    pooled_prompt_embeds: Array | None = None
    negative_pooled_prompt_embeds: Array | None = None
    preview: str | None = None  # "rgb" or "taesd"
    preview_every: int = 1
    on_preview: Callable[[int, int, Image.Image], None] | None = None
    decoder: str = "vae"  # or "taesd"
    mask_image: ImageInput | None = None
    padding_mask_crop: int | None = None
    control_image: ImageInput | Sequence[ImageInput] | None = None
    controlnet_conditioning_scale: float | Sequence[float] = 1.0
    control_guidance_start: float | Sequence[float] = 0.0
    control_guidance_end: float | Sequence[float] = 1.0

    def validated(self, limits: ModelLimits | None = None, names: Mapping[str, str] | None = None):
        """A copy with every value checked and normalised; raises InvalidValue / InvalidType."""
        return _Validator(limits, names or {}).run(self)


ARGUMENTS = tuple(f.name for f in fields(GenerationSettings))


def validate_generation(limits: ModelLimits | None = None, *, names: Mapping[str, str] | None = None, **arguments):
    """`GenerationSettings(**arguments).validated(limits, names)`; an unknown argument is an InvalidType."""
    if unknown := sorted(set(arguments) - set(ARGUMENTS)):
        raise InvalidType(f"unknown generation argument {unknown[0]!r}")
    return GenerationSettings(**arguments).validated(limits, names)


# -- one rule per kind of value; `name` is what the message calls the argument ------------------------


def is_integer(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else f"{text[:40]}... ({type(v).__name__} of {len(text):,} characters)"


def integer(v, name: str, lo: int, hi: int | None = None) -> int:
    """An int (not a bool, not a float) in [lo, hi]."""
    if not is_integer(v):
        raise InvalidType(f"{name} must be an integer, got {_show(v)} ({type(v).__name__})")
    v = int(v)
    if v < lo:
        raise InvalidValue(f"{name} must be at least {lo}, got {v}")
    if hi is not None and v > hi:
        raise InvalidValue(f"{name} must be between {lo} and {hi}, got {v}")
    return v


def real(v, name: str, lo: float, hi: float, *, open_low: bool = False) -> float:
    """A finite number (not a bool) in [lo, hi], or (lo, hi] with open_low."""
    if not is_real(v):
        raise InvalidType(f"{name} must be a number, got {_show(v)} ({type(v).__name__})")
    v = float(v)
    low = "(" if open_low else "["
    if not math.isfinite(v) or v < lo or (open_low and v == lo) or v > hi:
        raise InvalidValue(f"{name} must be in {low}{lo:g}, {hi:g}], got {v}")
    return v


def text(v, name: str, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """A str of at most max_chars characters that UTF-8 can carry (no lone surrogates)."""
    if not isinstance(v, str):
        raise InvalidType(f"{name} must be a string, got {_show(v)} ({type(v).__name__})")
    if len(v) > max_chars:
        raise InvalidValue(f"{name} is {len(v):,} characters long; at most {max_chars:,} are accepted")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidValue(f"{name} holds a character that is not valid Unicode at position {e.start}") from None
    return v


def choice(v, name: str, options: Sequence) -> Any:
    """One of `options`, of the same type (True is not 1; an array is not compared)."""
    if not any(type(v) is type(o) and v == o for o in options):
        raise InvalidValue(f"unknown {name} {_show(v)}; choose one of {', '.join(str(o) for o in options)}")
    return v


def boolean(v, name: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise InvalidType(f"{name} must be true or false, got {_show(v)} ({type(v).__name__})")
    return bool(v)


def prompts(v, name: str, batch: int | None = None, *, optional: bool = True) -> str | tuple[str, ...] | None:
    """None (if optional), a string, or a non-empty list of strings (of length `batch` when given)."""
    if v is None and optional:
        return None
    if isinstance(v, str):
        return text(v, name)
    if not isinstance(v, (list, tuple)) or not v:
        raise InvalidType(f"{name} must be a string or a non-empty list of strings, got {_show(v)}")
    if batch is not None and len(v) != batch:
        raise InvalidValue(f"{name} has {len(v)} entries, but prompt has {batch}")
    return tuple(text(p, f"{name}[{i}]") for i, p in enumerate(v))


def layer_indices(v, name: str, num_layers: int | None) -> tuple[int, ...] | None:
    """Transformer block indices (within the model's blocks when known); an empty list means none."""
    if v is None:
        return None
    if isinstance(v, (str, bytes)) or not isinstance(v, (Sequence, np.ndarray)):
        raise InvalidType(f"{name} must be a list of block indices, got {_show(v)}")
    out = tuple(integer(i, f"{name} entries", 0) for i in v)
    bad = [i for i in out if num_layers is not None and i >= num_layers]
    if bad:
        raise InvalidValue(
            f"{name} must be block indices in 0..{num_layers - 1} for this model ({num_layers} transformer blocks), "
            f"got {list(out)}"
        )
    return out or None


def finite_array(v, name: str, *, max_abs: float | None = None) -> np.ndarray | Any:
    """A real-valued array (numpy, mlx or nested lists) with only finite values; mlx arrays are returned as
    they are, others as numpy arrays."""
    mx = sys.modules.get("mlx.core")  # only an mlx array needs mlx, and then it is already imported
    if mx is not None and isinstance(v, mx.array):
        if not (mx.issubdtype(v.dtype, mx.floating) or mx.issubdtype(v.dtype, mx.integer)):
            raise InvalidType(f"{name} must hold real numbers, got dtype {v.dtype}")
        a = v.astype(mx.float32)
        ok = bool(mx.isfinite(a).all().item())
        peak = float(mx.abs(a).max().item()) if ok and v.size else 0.0
        shape, out = tuple(v.shape), v
    else:
        try:
            out = np.asarray(v)
        except (ValueError, TypeError) as e:  # ragged nested lists and the like
            raise InvalidType(f"{name} must be an array of numbers ({e})") from None
        if out.dtype.kind not in "fiu":
            raise InvalidType(f"{name} must hold real numbers, got dtype {out.dtype}")
        with np.errstate(over="ignore"):
            a = out.astype(np.float32, copy=False)
        ok = bool(np.isfinite(a).all())
        peak = float(np.abs(a).max()) if ok and a.size else 0.0
        shape = out.shape
    if not ok:
        raise InvalidValue(f"{name} must hold only finite numbers; it holds NaN or infinity (shape {shape})")
    if max_abs is not None and peak > max_abs:
        raise InvalidValue(f"{name} values must be within +-{max_abs:g}, got a magnitude of {peak:.3g}")
    return out


# -- generate()'s arguments, in the order generate() uses them ----------------------------------------


class _Validator:
    def __init__(self, limits: ModelLimits | None, names: Mapping[str, str]):
        self.limits = limits
        self.names = names

    def n(self, argument: str) -> str:
        return self.names.get(argument, argument)

    def run(self, s: GenerationSettings) -> GenerationSettings:
        n = self.n
        steps = integer(s.num_inference_steps, n("num_inference_steps"), 1, MAX_STEPS)
        guidance = real(s.guidance_scale, n("guidance_scale"), 0.0, MAX_GUIDANCE)
        images_per_prompt = integer(s.num_images_per_prompt, n("num_images_per_prompt"), 1, MAX_BATCH)
        prompt, batch = self._prompt(s, guidance > 1)
        if batch * images_per_prompt > MAX_BATCH:
            raise InvalidValue(
                f"{n('prompt')} x {n('num_images_per_prompt')} gives {batch * images_per_prompt} images; "
                f"at most {MAX_BATCH} per call"
            )
        strength = s.strength
        if s.image is not None:
            strength = real(s.strength, n("strength"), 0.0, 1.0, open_low=True)
            if steps - min(steps * strength, steps) >= steps:  # img2img's start index, as diffusers rounds it
                raise InvalidValue(f"{n('strength')} {strength} is too small: no step would run (at least 1e-15)")
        height, width = self._size(s, batch * images_per_prompt)
        out = replace(
            s,
            prompt=prompt,
            negative_prompt=prompts(s.negative_prompt, n("negative_prompt"), batch if prompt is not None else None),
            prompt_2=prompts(s.prompt_2, n("prompt_2"), batch if prompt is not None else None),
            prompt_3=prompts(s.prompt_3, n("prompt_3"), batch if prompt is not None else None),
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            seed=self._seed(s.seed, batch * images_per_prompt),
            num_images_per_prompt=images_per_prompt,
            max_sequence_length=integer(s.max_sequence_length, n("max_sequence_length"), 1, MAX_SEQUENCE_LENGTH),
            sampler=choice(s.sampler, n("sampler"), SAMPLERS),
            scheduler=choice(s.scheduler, n("scheduler"), SCHEDULERS),
            shift=None if s.shift is None else real(s.shift, n("shift"), 0.0, 1e6, open_low=True),
            rng=choice(s.rng, n("rng"), RNG_SOURCES),
            prompt_syntax=choice(s.prompt_syntax, n("prompt_syntax"), D.PROMPT_SYNTAXES),
            text_encoding=choice(s.text_encoding, n("text_encoding"), D.TEXT_ENCODINGS),
            skip_guidance_layers=layer_indices(
                s.skip_guidance_layers, n("skip_guidance_layers"), self.limits and self.limits.num_layers
            ),
            skip_layer_guidance_scale=real(
                s.skip_layer_guidance_scale, n("skip_layer_guidance_scale"), 0, MAX_GUIDANCE
            ),
            skip_layer_guidance_start=real(s.skip_layer_guidance_start, n("skip_layer_guidance_start"), 0.0, 1.0),
            skip_layer_guidance_stop=real(s.skip_layer_guidance_stop, n("skip_layer_guidance_stop"), 0.0, 1.0),
            strength=strength,
            output_type=choice(s.output_type, n("output_type"), ("pil", "np", "latent")),
        )
        if out.skip_layer_guidance_start > out.skip_layer_guidance_stop:
            raise InvalidValue(
                f"{n('skip_layer_guidance_start')} ({out.skip_layer_guidance_start}) must not exceed "
                f"{n('skip_layer_guidance_stop')} ({out.skip_layer_guidance_stop})"
            )
        if s.callback is not None and not callable(s.callback):
            raise InvalidType(f"{n('callback')} must be callable, got {_show(s.callback)}")
        out = replace(out, decoder=choice(s.decoder, n("decoder"), ("vae", "taesd")), **self._preview(s))
        out = replace(out, **self._editing(s))
        return replace(out, latents=self._latents(s.latents, batch * images_per_prompt, height, width))

    def _seed(self, seed, images: int) -> int | tuple[int, ...] | None:
        """None (random), one seed for the batch, or a list of one seed per image."""
        name = self.n("seed")
        if seed is None:
            return None
        if not isinstance(seed, (list, tuple, np.ndarray)):
            return integer(seed, name, 0, MAX_SEED)
        if len(seed) != images:
            raise InvalidValue(f"{name} has {len(seed)} entries; a list needs one seed per image ({images})")
        return tuple(integer(v, f"{name} entries", 0, MAX_SEED) for v in seed)

    def _editing(self, s: GenerationSettings) -> dict:
        """The numbers of inpainting and ControlNet (editing/ checks the images and the nets)."""
        n, out = self.n, {}
        if s.padding_mask_crop is not None:
            out["padding_mask_crop"] = integer(s.padding_mask_crop, n("padding_mask_crop"), 0, 1 << 16)
        if s.control_image is not None:
            for name, lo, hi in (
                ("controlnet_conditioning_scale", -MAX_GUIDANCE, MAX_GUIDANCE),
                ("control_guidance_start", 0.0, 1.0),
                ("control_guidance_end", 0.0, 1.0),
            ):
                value = getattr(s, name)
                many = isinstance(value, (list, tuple))
                if many and len(value) > MAX_BATCH:
                    raise InvalidValue(f"{n(name)} has {len(value)} values; at most {MAX_BATCH}")
                checked = [real(v, n(name), lo, hi) for v in (value if many else [value])]
                out[name] = tuple(checked) if many else checked[0]
        return out

    def _preview(self, s: GenerationSettings) -> dict:
        n = self.n
        if s.preview is None:
            if s.on_preview is not None:
                raise InvalidValue(f"{n('on_preview')} needs {n('preview')}='rgb' or {n('preview')}='taesd'")
            return {}
        preview = choice(s.preview, n("preview"), ("rgb", "taesd"))
        if not callable(s.on_preview):
            raise InvalidType(f"{n('preview')}={preview!r} needs {n('on_preview')}, a callable(step, total, PIL.Image)")
        return {"preview": preview, "preview_every": integer(s.preview_every, n("preview_every"), 1, MAX_STEPS)}

    def _prompt(self, s: GenerationSettings, cfg: bool) -> tuple[str | tuple[str, ...] | None, int]:
        """The prompt and the number of prompts (the batch before num_images_per_prompt)."""
        if s.prompt_embeds is None:
            if s.prompt is None:
                raise InvalidValue(f"give a {self.n('prompt')} (or prompt_embeds and pooled_prompt_embeds)")
            prompt = prompts(s.prompt, self.n("prompt"), optional=False)
            return prompt, 1 if isinstance(prompt, str) else len(prompt)
        embeds = {
            "prompt_embeds": (s.prompt_embeds, 3),
            "pooled_prompt_embeds": (s.pooled_prompt_embeds, 2),
        }
        if cfg:
            embeds["negative_prompt_embeds"] = (s.negative_prompt_embeds, 3)
            embeds["negative_pooled_prompt_embeds"] = (s.negative_pooled_prompt_embeds, 2)
        shapes = {}
        for name, (value, ndim) in embeds.items():
            if value is None:
                raise InvalidValue(f"{name} is required with prompt_embeds")
            shape = tuple(finite_array(value, name).shape)
            if len(shape) != ndim:
                raise InvalidValue(f"{name} must have {ndim} dimensions, got shape {shape}")
            shapes[name] = shape
        batch = shapes["prompt_embeds"][0]
        widths = {"prompt_embeds": self.limits and self.limits.context_width}
        widths["pooled_prompt_embeds"] = self.limits and self.limits.pooled_width
        for name, width in widths.items():
            if width and shapes[name][-1] != width:
                raise InvalidValue(f"{name} must be {width} wide for this model, got shape {shapes[name]}")
        for name, shape in shapes.items():
            want = shapes[name.replace("negative_", "")]
            if shape[0] != batch or shape != want:
                raise InvalidValue(f"{name} has shape {shape}; it must match the positive embeddings' {want}")
        return None, batch

    def _size(self, s: GenerationSettings, batch: int) -> tuple[int, int]:
        """height and width: given, else the input image's size rounded down to the size multiple, else 1024."""
        multiple = self.limits.size_multiple if self.limits else 1
        given = {}
        for name, v in (("height", s.height), ("width", s.width)):
            if v is not None:
                given[name] = integer(v, self.n(name), 1)
        if self.latent_image(s.image):  # latents keep their size: height and width follow from them
            if s.mask_image is not None:
                raise InvalidValue(f"{self.n('mask_image')} needs {self.n('image')} as pixels, not latents")
            latents = finite_array(s.image, self.n("image"), max_abs=MAX_LATENT)
            f = self.limits.vae_scale_factor
            count, image_h, image_w = latents.shape[0], latents.shape[1] * f, latents.shape[2] * f
            for name, v, own in (("height", s.height, image_h), ("width", s.width, image_w)):
                if v is not None and v != own:
                    raise InvalidValue(f"{self.n(name)} must be {own} (the latent {self.n('image')}'s), got {v}")
            if batch % count:
                raise InvalidValue(f"cannot spread {count} input images over {batch} images to generate")
            default = {"height": image_h, "width": image_w}
        elif s.image is not None:
            count, image_h, image_w = _image_shape(s.image, self.n("image"))
            if batch % count:
                raise InvalidValue(f"cannot spread {count} input images over {batch} images to generate")
            default = {"height": image_h // multiple * multiple, "width": image_w // multiple * multiple}
            if any(default[name] == 0 for name in default if name not in given):
                raise InvalidValue(
                    f"{self.n('image')} is too small: {image_w}x{image_h} (needs at least {multiple} px a side)"
                )
        else:
            default = {"height": D.SIZE, "width": D.SIZE}
        size = {name: given.get(name, default[name]) for name in ("height", "width")}
        for name, v in size.items():
            if v % multiple:
                lo = max(multiple, v // multiple * multiple)
                raise InvalidValue(f"{self.n(name)} must be a positive multiple of {multiple}, got {v} (try {lo})")
        for name, v in size.items():
            if self.limits and v > self.limits.max_side:
                raise InvalidValue(f"{self.n(name)} must be at most {self.limits.max_side} for this model, got {v}")
        return size["height"], size["width"]

    def latent_image(self, image) -> bool:
        return self.limits is not None and is_latent_image(image, self.limits.latent_channels)

    def _latents(self, latents, batch: int, height: int, width: int):
        if latents is None:
            return None
        name = self.n("latents")
        latents = finite_array(latents, name, max_abs=MAX_LATENT)
        if self.limits:
            f = self.limits.vae_scale_factor
            want = (batch, height // f, width // f, self.limits.latent_channels)
            if tuple(latents.shape) != want:
                raise InvalidValue(
                    f"{name} must have shape {want} (batch, height/{f}, width/{f}, channels; NHWC), "
                    f"got {tuple(latents.shape)}"
                )
        return latents


def is_latent_image(image, latent_channels: int) -> bool:
    """Whether generate()'s `image` is model-space latents, NHWC (B, H/8, W/8, latent_channels), which img2img
    starts from without the VAE, as diffusers' StableDiffusion3Img2ImgPipeline takes a tensor with the VAE's
    latent channels (its prepare_latents). Pixels have 3 channels."""
    shape = getattr(image, "shape", None)
    return shape is not None and len(shape) == 4 and shape[-1] == latent_channels


def _image_shape(image, name: str) -> tuple[int, int, int]:
    """(count, height, width) of input images, checking what they are without decoding (a file's header only)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return 1, image.height, image.width
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return 1, im.height, im.width
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise InvalidValue(f"{name} {os.fspath(image)!r}: cannot read it as an image ({e})") from None
    arr = finite_array(image, name)
    if arr.ndim not in (3, 4) or arr.shape[-1] != 3 or 0 in arr.shape:
        raise InvalidValue(f"{name} array must be (H, W, 3) or (B, H, W, 3) RGB, got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        a = np.asarray(arr, dtype=np.float32)
        if a.min() < 0 or a.max() > 1:
            raise InvalidValue(f"{name} array must hold values in [0, 1] (or uint8), got {a.min():g}..{a.max():g}")
    return (arr.shape[0] if arr.ndim == 4 else 1), int(arr.shape[-3]), int(arr.shape[-2])
