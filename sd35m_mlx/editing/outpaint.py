"""Outpainting: extend the canvas and build the inpainting mask for the new area.

The new margins start as the image's edge pixels stretched outwards ("edge"), or those blurred ("blur": a
Gaussian blur of radius a quarter of the widest margin, original pixels kept), which gives the model colours
to continue rather than a flat fill. The mask is white over the margins and `feather` pixels into the picture,
so the seam itself is repainted; `composite` then lays the original back over the result with an alpha that
ramps from 0 at the old border to 1 `feather` pixels inside, hiding the seam.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

FILLS = ("edge", "blur")


@dataclass
class Outpaint:
    image: Image.Image  # the extended canvas, RGB
    mask: Image.Image  # L: 255 = paint
    original: Image.Image
    box: tuple[int, int, int, int]  # where the original lies on the canvas (left, top, right, bottom)
    feather: int

    def composite(self, images: list[Image.Image]) -> list[Image.Image]:
        """Each result (any size: resized to the canvas) with the original laid back over it, feathered."""
        alpha = Image.fromarray((self._alpha() * 255).round().astype(np.uint8), "L")
        out = []
        for im in images:
            im = im.convert("RGB")
            if im.size != self.image.size:
                im = im.resize(self.image.size, Image.Resampling.LANCZOS)
            base = im.copy()
            base.paste(self.original, self.box[:2])
            out.append(Image.composite(base, im, alpha))
        return out

    def _alpha(self) -> np.ndarray:
        """1 over the original `feather` px in from each extended side, ramping linearly to 0 at that side."""
        w, h = self.image.size
        x1, y1, x2, y2 = self.box
        ys, xs = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
        dist = np.full((h, w), np.inf)
        for extended, d in ((x1 > 0, xs - x1), (y1 > 0, ys - y1), (x2 < w, x2 - xs), (y2 < h, y2 - ys)):
            if extended:
                dist = np.minimum(dist, d)
        ramp = np.clip(dist / self.feather, 0.0, 1.0) if self.feather > 0 else np.ones((h, w))
        inside = (xs > x1) & (xs < x2) & (ys > y1) & (ys < y2)
        return np.where(inside, ramp, 0.0).astype(np.float32)


def parse_margins(text: str) -> tuple[int, int, int, int]:
    """'LEFT,TOP,RIGHT,BOTTOM' in pixels, each >= 0, not all 0."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        margins = tuple(int(p) for p in parts)
    except ValueError:
        margins = ()
    if len(margins) != 4 or min(margins) < 0 or not any(margins):
        raise ValueError(f"outpaint margins must be LEFT,TOP,RIGHT,BOTTOM in pixels (>= 0, not all 0), got {text!r}")
    return margins  # type: ignore[return-value]


def outpaint(image, margins, fill: str = "edge", feather: int = 32) -> Outpaint:
    """The extended canvas and its mask; pass them to generate(image=..., mask_image=..., strength=1.0) and the
    result to `Outpaint.composite`."""
    if isinstance(margins, str):
        margins = parse_margins(margins)
    left, top, right, bottom = (int(m) for m in margins)
    if min(left, top, right, bottom) < 0 or not any((left, top, right, bottom)):
        raise ValueError(f"outpaint margins must be >= 0 and not all 0, got {margins}")
    if fill not in FILLS:
        raise ValueError(f"outpaint fill must be one of {', '.join(FILLS)}, got {fill!r}")
    if feather < 0:
        raise ValueError(f"feather must be >= 0 pixels, got {feather}")
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = Image.open(image)
    original = image.convert("RGB") if isinstance(image, Image.Image) else _from_array(image)
    w, h = original.size
    a = np.pad(np.asarray(original), ((top, bottom), (left, right), (0, 0)), mode="edge")
    canvas = Image.fromarray(a)
    if fill == "blur":
        radius = max(left, top, right, bottom) / 4
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius))
        canvas.paste(original, (left, top))
    box = (left, top, left + w, top + h)
    feather = min(feather, w // 2, h // 2)
    m = np.full((a.shape[0], a.shape[1]), 255, np.uint8)
    inner = [box[0] + (feather if left else 0), box[1] + (feather if top else 0)]
    inner += [box[2] - (feather if right else 0), box[3] - (feather if bottom else 0)]
    m[inner[1] : inner[3], inner[0] : inner[2]] = 0
    return Outpaint(canvas, Image.fromarray(m, "L"), original, box, feather)


def _from_array(a) -> Image.Image:
    a = np.asarray(a)
    a = a[0] if a.ndim == 4 else a
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(a).convert("RGB")
