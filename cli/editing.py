"""Editing options of the generate command: inpainting (--mask), outpainting (--outpaint) and ControlNets.

Everything is checked and read before the model loads; `Editing` then adds its arguments to each generate()
call and finishes the images (the outpainting composite). The options are stored in the PNG as given (Settings
fields of the same names; the files by path, as --image), so --from-image replays them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import click
from PIL import Image

from .errors import UsageError, one_line

OPTIONS = [
    click.option(
        "--mask",
        metavar="PATH",
        help="Inpainting mask for --image: white is repainted, black kept (grey levels are split at 50%). "
        "A mask of another size is resized (with a warning).",
    ),
    click.option(
        "--padding-mask-crop",
        type=int,
        metavar="PX",
        help="With --mask: repaint only a crop around the mask, padded by PX pixels, at full resolution, "
        "then paste it back into the picture.  [default: off]",
    ),
    click.option(
        "--outpaint",
        metavar="L,T,R,B",
        help="Extend --image by these margins in pixels (left, top, right, bottom) and paint them in; "
        "--strength defaults to 1.0 and the output size is the extended canvas's.",
    ),
    click.option(
        "--outpaint-fill",
        type=click.Choice(("edge", "blur")),
        default="edge",
        help="How the new margins start: the edge pixels stretched outwards, or those blurred.",
    ),
    click.option(
        "--outpaint-feather",
        type=int,
        default=32,
        metavar="PX",
        help="Repaint this many pixels of the picture along the seam and blend them back over a ramp.",
    ),
    click.option(
        "--controlnet",
        "controlnets",
        multiple=True,
        metavar="PATH_OR_REPO",
        help="An SD3 ControlNet (diffusers folder, .safetensors file or Hub id, e.g. "
        "tensorart/SD3.5M-Controlnet-Canny); repeat for several, each with its --control-image.",
    ),
    click.option(
        "--control-image",
        "control_images",
        multiple=True,
        metavar="PATH",
        help="The control image (edge map, depth map, ...) of each --controlnet, in order. Without --image "
        "the output size follows the first one.",
    ),
    click.option(
        "--control-scale",
        "control_scales",
        type=float,
        multiple=True,
        help="ControlNet strength: one value for all, or one per --controlnet.  [default: 1.0]",
    ),
    click.option(
        "--control-start",
        type=float,
        default=0.0,
        help="Fraction of the steps after which the ControlNets start acting.",
    ),
    click.option(
        "--control-end",
        type=float,
        default=1.0,
        help="Fraction of the steps after which the ControlNets stop acting.",
    ),
    click.option(
        "--control-preprocess",
        type=click.Choice(("canny",)),
        help="Turn each --control-image into an edge map first (OpenCV Canny, thresholds 100/200; needs "
        'the control extra: pip install "sd35m-mlx[control]").  [default: use the images as given]',
    ),
]


# the options (parameter names) that are also Settings fields, stored in the PNG and restored by --from-image
EDITING_FIELDS = (
    "mask",
    "padding_mask_crop",
    "outpaint",
    "outpaint_fill",
    "outpaint_feather",
    "controlnets",
    "control_images",
    "control_scales",
    "control_start",
    "control_end",
    "control_preprocess",
    "control_thresholds",
)


def settings_fields(params: dict) -> dict:
    """The editing options as Settings fields (tuples for the repeatable ones)."""
    out = {name: params.get(name) for name in EDITING_FIELDS if params.get(name) is not None}
    for name in ("controlnets", "control_images", "control_scales"):
        out[name] = tuple(out.get(name) or ())
    return out


def inputs(settings) -> dict:
    """What `prepare` reads, from the settings (the command line's, or those --from-image restored)."""
    return {"image": settings.image, **{name: getattr(settings, name) for name in EDITING_FIELDS}}


def editing_options(f):
    for decorator in reversed(OPTIONS):
        f = decorator(f)
    return f


@dataclass
class Editing:
    kwargs: dict = field(default_factory=dict)  # added to every generate() call
    controlnets: tuple[str, ...] = ()
    outpaint: object | None = None  # sd35m_mlx.editing.outpaint.Outpaint
    strength: float | None = None  # replaces the default --strength (outpainting: 1.0)
    notes: list[str] = field(default_factory=list)

    def load(self, pipe, quantize: int | None = None) -> None:
        for source in self.controlnets:
            pipe.load_controlnet(source, quantize=quantize)

    def finish(self, images: list) -> list:
        return self.outpaint.composite(images) if self.outpaint is not None else images


def size_source(params: dict) -> tuple[str, str] | None:
    """(option, path) whose picture sets the output size when --width/--height are missing."""
    if params.get("image"):
        return "--image", params["image"]
    if params.get("control_images"):
        return "--control-image", params["control_images"][0]
    return None


def canvas_size(params: dict, w: int, h: int) -> tuple[int, int]:
    """The size of the picture generate() starts from: --image extended by --outpaint's margins."""
    if params.get("outpaint") and params.get("image"):
        left, top, right, bottom = _margins(params["outpaint"])
        return w + left + right, h + top + bottom
    return w, h


def prepare(params: dict, strength_given: bool) -> Editing:
    """Check and read the editing options (before the model loads)."""
    edit = Editing()
    image, mask, outpaint = params.get("image"), params.get("mask"), params.get("outpaint")
    if (mask or outpaint) and image is None:
        raise UsageError(f"{'--mask' if mask else '--outpaint'} needs --image")
    if mask and outpaint:
        raise UsageError("--mask and --outpaint cannot be combined (--outpaint builds its own mask)")
    if params.get("padding_mask_crop") is not None and not mask:
        raise UsageError("--padding-mask-crop only applies with --mask")
    if mask:
        _inpaint(edit, image, mask, params.get("padding_mask_crop"))
    if outpaint:
        _outpaint(edit, image, outpaint, params["outpaint_fill"], params["outpaint_feather"], strength_given)
    _control(edit, params)
    return edit


def _inpaint(edit: Editing, image: str, mask: str, crop: int | None) -> None:
    import numpy as np

    m = _read(mask, "--mask")
    if crop is not None and crop < 0:
        raise UsageError(f"--padding-mask-crop must be >= 0 pixels, got {crop}")
    size = _read(image, "--image").size
    if m.size != size:
        edit.notes.append(f"Warning: --mask is {m.size[0]}x{m.size[1]}, --image {size[0]}x{size[1]}: mask resized")
        m = m.resize(size, Image.Resampling.LANCZOS)
    if not (np.asarray(m.convert("L")) >= 128).any():
        raise UsageError(f"--mask {mask} is all black: nothing to repaint (white marks the region to repaint)")
    edit.kwargs.update(mask_image=m)
    if crop is not None:
        edit.kwargs.update(padding_mask_crop=crop)


def _outpaint(edit: Editing, image: str, margins: str, fill: str, feather: int, strength_given: bool) -> None:
    from sd35m_mlx.editing.outpaint import outpaint

    if feather < 0:
        raise UsageError(f"--outpaint-feather must be >= 0 pixels, got {feather}")
    job = outpaint(_read(image, "--image"), _margins(margins), fill=fill, feather=feather)
    edit.outpaint = job
    edit.kwargs.update(image=job.image, mask_image=job.mask)
    if not strength_given:
        edit.strength = 1.0


def _control(edit: Editing, params: dict) -> None:
    nets, images = tuple(params.get("controlnets") or ()), tuple(params.get("control_images") or ())
    scales = tuple(params.get("control_scales") or ())
    if not nets and not images:
        if scales or params.get("control_preprocess"):
            raise UsageError("--control-scale and --control-preprocess need --controlnet and --control-image")
        return
    if len(nets) != len(images):
        raise UsageError(f"give one --control-image per --controlnet (got {len(nets)} and {len(images)})")
    if scales and len(scales) not in (1, len(nets)):
        raise UsageError(f"give one --control-scale, or one per --controlnet ({len(nets)}), got {len(scales)}")
    start, end = params.get("control_start", 0.0), params.get("control_end", 1.0)
    if not 0.0 <= start < end <= 1.0:
        raise UsageError(f"--control-start/--control-end must satisfy 0 <= start < end <= 1, got {start}, {end}")
    pictures = [_read(p, "--control-image") for p in images]
    if params.get("control_preprocess"):
        from sd35m_mlx.editing.preprocess import preprocess

        try:
            thresholds = tuple(params.get("control_thresholds") or (100, 200))  # set by a server's PNG (--from-image)
            pictures = [preprocess(p, params["control_preprocess"], thresholds) for p in pictures]
        except ImportError as e:
            raise UsageError(one_line(e)) from None
    edit.controlnets = nets
    edit.kwargs.update(
        control_image=pictures,
        controlnet_conditioning_scale=list(scales) * (len(nets) if len(scales) == 1 else 1) or 1.0,
        control_guidance_start=start,
        control_guidance_end=end,
    )


def _margins(text: str) -> tuple[int, int, int, int]:
    from sd35m_mlx.editing.outpaint import parse_margins

    try:
        return parse_margins(text)
    except ValueError as e:
        raise UsageError(f"--{one_line(e)}") from None


def _read(path: str, option: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"{option} {path}: cannot read it as an image ({one_line(e)})") from None
