"""Outpainting on A1111's img2img, as our extension field `"outpaint": {"left", "top", "right", "bottom", "fill",
"feather"}`: the library's `outpaint` (editing/outpaint.py) extends the init image by the margins and makes the
mask, `generate(image=canvas, mask_image=mask)` paints the margins in, `Outpaint.composite` lays the original
back over the result: the same calls, and so the same pixels, as the CLI's --outpaint.

The result is the init image plus the margins (width/height are not asked for), checked against the model's
limits before the job is queued.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..defaults import MIN_SIDE, MULTIPLE
from ..editing.outpaint import FILLS, outpaint
from .errors import RequestError
from .spec import Spec


class OutpaintField(BaseModel):
    """Margins in pixels; `fill` and `feather` default as the CLI's --outpaint-fill and --outpaint-feather."""

    model_config = ConfigDict(extra="forbid")

    left: int = Field(0, ge=0)
    top: int = Field(0, ge=0)
    right: int = Field(0, ge=0)
    bottom: int = Field(0, ge=0)
    fill: str = "edge"
    feather: int = Field(32, ge=0)


def apply_outpaint(field: OutpaintField, spec: Spec, top_side: int, strength: float | None,
                   asked: tuple[int | None, int | None] = (None, None)) -> None:  # fmt: skip
    """Set the spec's canvas, mask, size and strength (1.0 unless `strength` is given, as the CLI). `asked`:
    the request's width and height, said to be overridden in info.warnings when they differ."""
    margins = (field.left, field.top, field.right, field.bottom)
    if not any(margins):
        raise RequestError("outpaint needs at least one margin above 0 px (left, top, right, bottom)", "outpaint")
    if field.fill not in FILLS:
        raise RequestError(f"outpaint.fill must be one of {', '.join(FILLS)}, got {field.fill[:40]!r}", "outpaint.fill")
    w, h = spec.image.size
    width, height = w + field.left + field.right, h + field.top + field.bottom
    for name, side in (("width", width), ("height", height)):
        if not MIN_SIDE <= side <= top_side or side % MULTIPLE:
            raise RequestError(
                f"outpaint: the result would be {width}x{height} (the {w}x{h} init image plus the margins); its "
                f"{name} must be a multiple of {MULTIPLE} from {MIN_SIDE} to {top_side} px",
                "outpaint",
            )
    if None not in asked and tuple(asked) != (width, height):
        spec.notes.append(f"width/height {asked[0]}x{asked[1]}: outpainting makes the init image plus margins, "
                          f"{width}x{height}")  # fmt: skip
    job = outpaint(spec.image, margins, fill=field.fill, feather=field.feather)
    spec.image, spec.mask, spec.outpaint = job.image, job.mask, job
    spec.given(width=width, height=height, strength=1.0 if strength is None else strength)
    spec.given(outpaint=",".join(map(str, margins)), outpaint_fill=field.fill, outpaint_feather=field.feather)
