"""Data parallel: which image each rank makes, and bringing the finished images to rank 0."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from PIL import Image

from .group import Ranks


def rounds(count: int, size: int) -> list[range]:
    """Image indices 0..count-1 in rounds of `size`: in each round rank r makes the round's r-th image
    (if there is one), so rank 0 can write files in order, a round at a time."""
    return [range(k, min(k + size, count)) for k in range(0, count, size)]


def my_index(round_: range, rank: int) -> int | None:
    return round_[rank] if rank < len(round_) else None


def gather_images(ranks: Ranks, image: Image.Image | None, size: tuple[int, int], count: int, what: str):
    """The first `count` ranks' RGB images of `size` (width, height), in rank order, on every rank
    (all_gather is the collective there is); a rank with no image this round sends zeros."""
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8) if image is None else np.asarray(image.convert("RGB"))
    if pixels.shape != (h, w, 3):
        raise ValueError(f"expected a {w}x{h} image, got {pixels.shape[1]}x{pixels.shape[0]}")
    gathered = np.asarray(ranks.all_gather(mx.array(pixels), what))
    return [Image.fromarray(gathered[r]) for r in range(count)]
