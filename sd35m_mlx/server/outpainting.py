"""Outpainting on A1111's img2img, as our extension field `"outpaint": {"left", "top", "right", "bottom", "fill",
"feather"}`: the library's `outpaint` (editing/outpaint.py) extends the init image by the margins and makes the
mask, `generate(image=canvas, mask_image=mask)` paints the margins in, `Outpaint.composite` lays the original
back over the result: the same calls, and so the same pixels, as the CLI's --outpaint.

The result is the init image plus the margins (width/height are not asked for), checked against the model's
limits before the job is queued. A1111's own outpainting scripts (`script_name` "Poor man's outpainting" or
"Outpainting mk2", whose `script_args` hold the pixels and directions) run as this field, in one pass.
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


# script title (lower case) -> positions of (pixels, direction) in its script_args (A1111's
# scripts/poor_mans_outpainting.py run(p, pixels, mask_blur, inpainting_fill, direction);
# scripts/outpainting_mk_2.py run(p, _, pixels, mask_blur, direction, noise_q, color_variation))
SCRIPTS = {"poor man's outpainting": (0, 3), "outpainting mk2": (1, 3)}
SIDES = {"left": "left", "right": "right", "up": "top", "down": "bottom"}


def from_script(name, args) -> OutpaintField | None:
    """An A1111 outpainting script's arguments as our field (None: `name` is not one of them)."""
    where = SCRIPTS.get(name.lower()) if isinstance(name, str) else None
    if where is None:
        return None
    try:
        pixels, direction = args[where[0]], args[where[1]]
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
            raise TypeError
        return OutpaintField(**{SIDES[d]: pixels for d in direction})
    except (TypeError, IndexError, KeyError, ValueError):
        raise RequestError(f"script_args for {name!r}: expected the script's arguments with pixels (a whole number) "
                           "and a direction list of left, right, up, down", "script_args") from None  # fmt: skip


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
