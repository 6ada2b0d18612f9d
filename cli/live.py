"""--preview (a PNG rewritten while the image forms) and --draft (decode with TAESD3)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import click
from PIL import Image

from sd35m_mlx.defaults import TAESD3_REPO

from .errors import UsageError
from .output import check_writable, write_preview

OPTIONS = [
    click.option(
        "--preview",
        metavar="FILE.png",
        help="Rewrite FILE.png with the image as it forms (atomically: viewers and Quick Look refresh it). "
        "[default: off]",
    ),
    click.option("--preview-every", type=int, default=1, help="Preview every N steps (and the last step)."),
    click.option(
        "--preview-method",
        type=click.Choice(("rgb", "taesd")),
        default="rgb",
        help="rgb: a linear map of the latents (free, blurry, upscaled from 1/8 size); taesd: the tiny "
        "TAESD3 decoder (sharper, costs a little per preview).",
    ),
    click.option(
        "--draft",
        is_flag=True,
        help="Decode the final image with the tiny TAESD3 decoder instead of the VAE: faster and far less "
        "memory, slightly less detail.",
    ),
    click.option(
        "--taesd",
        metavar="PATH_OR_REPO",
        default=TAESD3_REPO,
        help="TAESD3 weights for --draft and --preview-method taesd: a Hub id, folder or .safetensors file.",
    ),
]


def check(params: dict, given: Callable[[str], bool]) -> Path | None:
    """The preview file's absolute path (its folder writable), after the option checks; None if off.
    `given(name)`: whether the option was on the command line."""
    if params["preview_every"] < 1:
        raise UsageError(f"--preview-every must be at least 1, got {params['preview_every']}")
    if params["preview"] is None:
        for name in ("preview_every", "preview_method"):
            if given(name):
                raise UsageError(f"--{name.replace('_', '-')} only applies with --preview FILE.png")
        return None
    path = Path(os.path.abspath(os.path.expanduser(params["preview"])))
    if path.suffix.lower() != ".png":
        raise UsageError(f"--preview must be a .png file, got {path.name}")
    check_writable(path.parent)
    return path


def loader_options(params: dict) -> dict:
    """from_pretrained's taesd= when TAESD3 is needed (nothing is loaded otherwise)."""
    needed = params["draft"] or (params["preview"] is not None and params["preview_method"] == "taesd")
    return {"taesd": params["taesd"]} if needed else {}


def generate_kwargs(params: dict, path: Path | None, width: int, height: int) -> dict:
    kwargs = {"decoder": "taesd"} if params["draft"] else {}
    if path is None:
        return kwargs

    def on_preview(step: int, total: int, image: Image.Image) -> None:
        if image.size != (width, height):  # rgb previews come at latent resolution
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        write_preview(image, path)

    return kwargs | dict(preview=params["preview_method"], preview_every=params["preview_every"], on_preview=on_preview)
