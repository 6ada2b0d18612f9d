"""What clients send: JSON object bodies, and images (base64 text or multipart files) decoded with limits before
any pixel is read."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image

from .errors import RequestError

DEFAULT_MAX_PIXELS = 4096 * 4096  # an upload may be larger than what we generate; it is resized down
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=-]+)*;base64,", re.IGNORECASE)


async def json_object(request) -> dict:
    """A request body that must be a JSON object (routes reading the body themselves), or a one-line 400."""
    try:
        body = await request.json()
    except ValueError:
        raise RequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def decode_base64(text, param: str) -> bytes:
    """Base64 (optionally a data: URL, as A1111 clients send) -> bytes."""
    if not isinstance(text, str) or not text:
        raise RequestError(f"{param} must be a base64-encoded image", param)
    text = _DATA_URL.sub("", text.strip(), count=1)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{param} is not valid base64", param) from None


def open_image(data: bytes, param: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an uploaded image to RGB, refusing more than `max_pixels` from the header alone (decompression
    bombs: a few KB of PNG can claim gigapixels) and anything Pillow cannot read."""
    im = open_upload(data, param, max_pixels)
    return im.convert("RGB") if im.mode != "RGB" else im


def open_upload(data: bytes, param: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`open_image` keeping the file's own mode (a mask's alpha channel)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise RequestError(f"{param} is too large: {w}x{h} pixels (at most {max_pixels} pixels)", param, 413)
            im.load()
            return im
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(f"{param} is too large to decode", param, 413) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's ways of saying "not an image I can read"
        raise RequestError(f"{param} is not an image Pillow can read ({type(e).__name__})", param) from None
