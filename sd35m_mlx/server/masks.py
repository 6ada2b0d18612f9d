"""Inpainting masks of both API dialects, turned into generate()'s convention: an "L" image, white = repaint.

- OpenAI (`/v1/images/edits`, multipart `mask`): a PNG the size of `image` whose fully transparent pixels
  (alpha 0) mark where the image is edited; every other pixel is kept. A mask without an alpha channel is
  refused (400), as OpenAI refuses it: a black-and-white picture is ambiguous here (OpenAI-style clients
  mean transparency, diffusers/A1111-style ones mean white), and guessing would repaint the wrong region.
- A1111 (`/sdapi/v1/img2img`, base64 `mask`): white = repaint (a mask with transparency: its alpha, as A1111's
  `create_binary_mask`), binarised at 128, inverted with `inpainting_mask_invert`, then blurred by
  `mask_blur` px (Gaussian; or `mask_blur_x` / `mask_blur_y`). generate() binarises the latent mask again
  at 0.5; the blur softens the paste-back edge of `inpaint_full_res` (our `padding_mask_crop`).

A mask of another size than its image is a 400 in both dialects; one with nothing to repaint too.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .errors import RequestError
from .uploads import DEFAULT_MAX_PIXELS, open_upload

MAX_BLUR = 256  # px; far above any useful feathering, bounds the work of one request


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _same_size(mask: Image.Image, size: tuple[int, int], param: str, image_param: str) -> None:
    if mask.size != size:
        raise RequestError(
            f"{param} is {mask.width}x{mask.height} but {image_param} is {size[0]}x{size[1]}: "
            f"the mask must have the same size as the image",
            param,
        )


def _something_to_paint(mask: Image.Image, param: str, how: str) -> Image.Image:
    if np.asarray(mask).max(initial=0) < 128:  # generate() repaints where the mask is >= 0.5
        raise RequestError(f"{param} marks nothing to repaint ({how})", param)
    return mask


def openai_mask(data: bytes, image_size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """OpenAI's mask (alpha 0 = edit) -> white = repaint."""
    im = open_upload(data, "mask", max_pixels)
    if not has_alpha(im):
        raise RequestError(
            f"mask has no alpha channel (mode {im.mode}): send a PNG whose fully transparent pixels (alpha 0) "
            "mark the region to edit, as OpenAI's API does (for a white = repaint mask use /sdapi/v1/img2img)",
            "mask",
        )
    _same_size(im, image_size, "mask", "image")
    alpha = np.asarray(im.convert("RGBA").getchannel("A"))
    mask = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")
    return _something_to_paint(mask, "mask", "no pixel is fully transparent")


def a1111_mask(
    data: bytes,
    image_size: tuple[int, int],
    invert: bool = False,
    blur: tuple[int, int] = (0, 0),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """A1111's mask (white = repaint, or its alpha where it has transparency) -> binarised, inverted, blurred
    by `blur` = (x, y) px (Gaussian standard deviations, as A1111's mask_blur_x / mask_blur_y)."""
    im = open_upload(data, "mask", max_pixels)
    _same_size(im, image_size, "mask", "init_images[0]")
    if im.mode == "RGBA" and im.getextrema()[-1] != (255, 255):  # A1111's create_binary_mask
        grey = im.getchannel("A")
    else:
        grey = im.convert("L")
    mask = grey.point(lambda v: 255 if v > 128 else 0)
    if invert:
        mask = ImageOps.invert(mask)
    _something_to_paint(mask, "mask", "it is all black" + (" after inpainting_mask_invert" if invert else ""))
    for v in blur:
        if not 0 <= v <= MAX_BLUR:
            raise RequestError(f"mask_blur must be between 0 and {MAX_BLUR} px, got {v}", "mask_blur")
    if max(blur) > 0:  # A1111 blurs x and y separately (cv2); Pillow takes both radii (sigmas) at once
        mask = mask.filter(ImageFilter.GaussianBlur(blur[0] if blur[0] == blur[1] else blur))
    return mask
