"""Inpainting with diffusers' StableDiffusion3InpaintPipeline semantics (16-channel transformer: mask blending).

The mask (white = repaint) is resized to the image size (Lanczos for PIL images, nearest for arrays, as diffusers'
mask processor), binarised at 0.5 and taken to latent size by nearest sampling. After every step the unmasked
region is re-imposed: the image latents noised to the next sigma with the run's initial noise, the clean image
latents after the last step (`InpaintBlend`). `padding_mask_crop` generates only a crop around the mask (padded,
widened to the output's aspect ratio) at full size, then pastes it back with the original overlaid outside the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps

from ..sampling.loop import Step, StepExtra

Box = tuple[int, int, int, int]  # left, top, right, bottom (PIL crop box)


class InpaintBlend(StepExtra):
    """After each step: latents = (1 - mask) * image latents noised to sigma_next + mask * latents.

    Every model evaluation sees the known region noised to its own sigma, as ComfyUI's KSamplerX0Inpaint
    feeds it: for a step's first evaluation that is what the previous step's blend left (the mask is 0/1,
    so blending again changes nothing); a sampler's extra evaluations (heun's at sigma_next, midpoints)
    would otherwise see its own estimate of the known region.

    `model_noise` (default: `noise`) is the noise in the known region the model sees: ComfyUI's "ddim" draws
    it afresh from seed + 1 (comfy/samplers.py KSAMPLER.sample, inpaint_options "random", at a125cd84), while
    the latents carried between steps keep the initial noise there, as its sampler's own x does."""

    def __init__(self, image_latents: mx.array, noise: mx.array, mask: mx.array, model_noise: mx.array | None = None):
        self.image_latents = image_latents
        self.noise = noise
        self.model_noise = noise if model_noise is None else model_noise
        self.mask = mask  # (1 or B, h, w, 1), 1 = repaint

    def model_latents(self, step: Step, x: mx.array) -> mx.array:
        s = step.sigma
        return (1 - self.mask) * (s * self.model_noise + (1.0 - s) * self.image_latents) + self.mask * x

    def after_step(self, step: Step, x_in: mx.array, velocity: mx.array, x: mx.array) -> mx.array:
        if step.count == step.total:  # the last step: the clean image latents
            known = self.image_latents
        else:
            s = step.sigma_next
            known = s * self.noise + (1.0 - s) * self.image_latents
        return (1 - self.mask) * known + self.mask * x


@dataclass
class InpaintInputs:
    """What generate() needs: the (cropped) image to encode, the pixel mask at output size, and what the
    paste-back of `padding_mask_crop` needs."""

    image: Image.Image | np.ndarray  # the image to encode, at height x width
    mask: np.ndarray  # (H, W) float32 of 0/1 at height x width
    latent_mask: mx.array  # (1, H/f, W/f, 1): the mask at latent size, for NHWC latents
    height: int
    width: int
    crop: Box | None = None
    original: Image.Image | None = None  # the uncropped image, for the paste-back
    original_mask: Image.Image | None = None

    def paste_back(self, images: list[Image.Image]) -> list[Image.Image]:
        """With padding_mask_crop: each generated crop resized into its box over the original image, the
        original kept outside the mask (diffusers' `apply_overlay`, in 8-bit as diffusers does)."""
        return [apply_overlay(self.original_mask, self.original, im, self.crop) for im in images]


def prepare_inpaint(
    image, mask_image, height: int | None, width: int | None, padding_mask_crop: int | None, factor: int = 8
) -> InpaintInputs:
    """Validate and lay out an inpainting request (see the module docstring); `factor`: pixels per latent."""
    if image is None:
        raise ValueError("mask_image needs image (the picture to repaint)")
    image = _open(image)
    mask_image = _open(mask_image)
    if padding_mask_crop is not None:
        if not isinstance(padding_mask_crop, (int, np.integer)) or padding_mask_crop < 0:
            raise ValueError(f"padding_mask_crop must be a number of pixels >= 0, got {padding_mask_crop!r}")
        image = _to_pil_rgb(image)
        mask_image = _to_pil_mask(mask_image)
        if mask_image.size != image.size:
            mask_image = mask_image.resize(image.size, Image.Resampling.LANCZOS)
    w0, h0 = _size(image)
    height = height or h0 // 16 * 16
    width = width or w0 // 16 * 16
    crop = None
    original, original_mask = None, None
    if padding_mask_crop is not None:
        if not np.asarray(mask_image).any():
            raise ValueError("mask_image is all black: nothing to repaint (white marks the region to repaint)")
        crop = crop_region(mask_image, width, height, int(padding_mask_crop))
        original, original_mask = image, mask_image
        image = resize_and_fill(image.crop(crop), width, height)
        mask = binarize(_mask_pixels(resize_and_fill(mask_image.crop(crop), width, height)))
    else:
        mask = binarize(_mask_pixels(mask_image, height, width))
    if not mask.any():
        raise ValueError("mask_image is all black: nothing to repaint (white marks the region to repaint)")
    latent = resize_nearest(mask, height // factor, width // factor)  # as torch's interpolate(mode="nearest")
    if not latent.any():
        raise ValueError(
            f"mask_image marks no {factor}x{factor}-pixel latent cell for repainting: nothing to paint "
            "(white, >= 0.5, marks the region to repaint)"
        )
    return InpaintInputs(image, mask, mx.array(latent[None, :, :, None]), height, width, crop, original, original_mask)


def binarize(mask: np.ndarray) -> np.ndarray:
    """diffusers' mask processor: < 0.5 keeps, >= 0.5 repaints."""
    return (mask >= 0.5).astype(np.float32)


def resize_nearest(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode="nearest") on the last two axes: source index floor(i * in / out)."""
    rows = np.minimum(np.floor(np.arange(h) * (a.shape[-2] / h)).astype(int), a.shape[-2] - 1)
    cols = np.minimum(np.floor(np.arange(w) * (a.shape[-1] / w)).astype(int), a.shape[-1] - 1)
    return a[..., rows, :][..., cols]


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> Box:
    """diffusers' VaeImageProcessor.get_crop_region: the box around the mask's non-zero pixels, padded, then
    widened (centred, shifted back inside the image) to the aspect ratio width / height."""
    m = np.asarray(mask.convert("L"))
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _widen(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), h)
    else:
        x1, x2 = _widen(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), w)
    return x1, y1, x2, y2


def _widen(lo: int, hi: int, diff: int, size: int) -> tuple[int, int]:
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """diffusers' resize_mode="fill": resize keeping the aspect ratio, centre, and fill the margins by
    stretching the edge rows or columns."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, fill), box=(0, src_h, width, src_h)), box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((fill, height), box=(src_w, 0, src_w, height)), box=(fill + src_w, 0))
    return out


def apply_overlay(mask: Image.Image, original: Image.Image, image: Image.Image, crop: Box) -> Image.Image:
    """The generated crop resized (keeping its aspect, centred) into `crop` of a canvas the original's size, then
    the original composited on top with alpha 1 - mask (diffusers' VaeImageProcessor.apply_overlay)."""
    width, height = original.size
    kept = Image.new("RGBa", (width, height))
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    x1, y1, x2, y2 = crop
    base = Image.new("RGBA", (width, height))
    base.paste(_resize_and_crop(image, x2 - x1, y2 - y1), (x1, y1))
    out = base.convert("RGB").convert("RGBA")
    out.alpha_composite(kept.convert("RGBA"))
    return out.convert("RGB")


def _resize_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    out = Image.new("RGB", (width, height))
    out.paste(
        image.resize((src_w, src_h), Image.Resampling.LANCZOS), (width // 2 - src_w // 2, height // 2 - src_h // 2)
    )
    return out


def _open(image):
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        return Image.open(image)
    return image


def _size(image) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.size
    a = np.asarray(image)
    a = a[0] if a.ndim == 4 else a
    return a.shape[1], a.shape[0]


def _to_pil_rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    a = a[0] if a.ndim == 4 else a
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def _to_pil_mask(mask) -> Image.Image:
    if isinstance(mask, Image.Image):
        return mask.convert("L")
    a = _mask_array(mask)
    return Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8), "L")


def _mask_array(mask) -> np.ndarray:
    a = np.asarray(mask)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] in (1, 3):
        a = a.mean(axis=-1) if a.shape[-1] == 3 else a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"mask_image array must be (H, W) or (H, W, 1) with values in [0, 1], got shape {a.shape}")
    return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)


def _mask_pixels(mask, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Grey levels in [0, 1] at height x width: PIL masks resized with Lanczos then made grey (diffusers' order),
    arrays resized nearest."""
    if isinstance(mask, Image.Image):
        if height and width and mask.size != (width, height):
            mask = mask.resize((width, height), Image.Resampling.LANCZOS)
        return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    a = _mask_array(mask)
    return resize_nearest(a, height, width) if height and width and a.shape != (height, width) else a
