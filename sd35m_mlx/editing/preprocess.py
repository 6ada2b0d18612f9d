"""Control image preparation through OpenCV (the optional `control` extra: opencv-python-headless)."""

from __future__ import annotations

import numpy as np
from PIL import Image

PREPROCESSORS = ("canny",)
INSTALL_HINT = 'pip install "sd35m-mlx[control]"  (or: pip install opencv-python-headless)'


def canny(image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges (OpenCV, hysteresis thresholds low/high on the grey image) as a white-on-black RGB image."""
    try:
        import cv2
    except ImportError:
        raise ImportError(f"Canny edge detection needs OpenCV: {INSTALL_HINT}") from None
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = Image.open(image)
    grey = np.asarray(image.convert("L")) if isinstance(image, Image.Image) else _grey(image)
    edges = cv2.Canny(grey, low, high)
    return Image.fromarray(edges).convert("RGB")


def preprocess(image, kind: str | None, thresholds: tuple[int, int] = (100, 200)) -> Image.Image:
    """`image` through the preprocessor `kind` (None: as it is); `thresholds`: canny's low and high."""
    if kind is None:
        return image
    if kind == "canny":
        return canny(image, *thresholds)
    raise ValueError(f"unknown control preprocessor {kind!r}; choose one of {', '.join(PREPROCESSORS)}")


def _grey(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    return np.asarray(Image.fromarray(a).convert("L"))
