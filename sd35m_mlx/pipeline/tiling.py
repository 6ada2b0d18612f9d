"""When the pipeline decodes and encodes in tiles (`pipe.enable_vae_tiling`), and the tile size.

The tiling itself is models/vae_tiling.py. Untiled decoding needs memory in proportion to the pixels;
tiled, the peak is one tile's decode whatever the size, at twice the time (two passes) and a small
difference from the untiled image (figures: benchmarks/README.md, "Big images").
"""

from __future__ import annotations

import sys

import mlx.core as mx

from ..models import vae_tiling
from ..sampling.memory import physical_memory

DEFAULT_TILE_SIZE = 512  # px: 64 latent px, the smallest tile the pipeline uses
OVERLAP = 0.25  # of the tile, each side shared with a neighbour
# untiled decode work per output pixel by dtype size, measured at 1024 px (benchmarks/README.md)
_DECODE_BYTES_PER_PIXEL = {2: 3900, 4: 6700}


class VAETiling:
    """The pipeline's tiling setting: None decides per image (tiles in low_memory mode or when the
    untiled decode would not fit in memory), False never tiles, an int tiles with that tile size in px."""

    def __init__(self):
        self.setting: int | bool | None = None

    def enable(self, tile_size: int | None = None) -> None:
        if tile_size is None:
            tile_size = DEFAULT_TILE_SIZE
        if not isinstance(tile_size, int) or tile_size < 64 or tile_size % 8:
            raise ValueError(f"tile_size must be a multiple of 8 px, at least 64 (default 512), got {tile_size!r}")
        self.setting = tile_size

    def disable(self) -> None:
        self.setting = False

    def tile_size(self, height: int, width: int, dtype: mx.Dtype, low_memory: bool) -> int | None:
        """Tile size in px for an image of height x width, or None to run untiled."""
        if self.setting is False:
            return None
        if isinstance(self.setting, int):
            tile = self.setting
        else:
            tile = DEFAULT_TILE_SIZE
            work = height * width * _DECODE_BYTES_PER_PIXEL.get(dtype.size, 6700)
            if not low_memory and work <= _memory_available():
                return None
        if height <= tile and width <= tile:
            return None
        if self.setting is None:
            reason = "low_memory" if low_memory else "the untiled decode would not fit in memory"
            print(
                f"sd35m-mlx: VAE in {tile} px tiles ({reason}); pipe.disable_vae_tiling() turns this off",
                file=sys.stderr,
            )
        return tile

    def decode(self, vae, z: mx.array, low_memory: bool) -> mx.array:
        f = vae.config.downscale
        tile = self.tile_size(z.shape[1] * f, z.shape[2] * f, z.dtype, low_memory)
        if tile is None:
            return vae.decode(z)
        return vae_tiling.decode_tiled(vae, z, tile // f, int(tile // f * OVERLAP))

    def encode(self, vae, images: mx.array, low_memory: bool) -> mx.array:
        f = vae.config.downscale
        tile = self.tile_size(images.shape[1], images.shape[2], images.dtype, low_memory)
        if tile is None:
            return vae.encode(images)
        return vae_tiling.encode_tiled(vae, images, tile // f, int(tile // f * OVERLAP))


def _memory_available() -> int:
    """Bytes an untiled decode may take: half of physical memory, less what MLX holds already."""
    return physical_memory() // 2 - mx.get_active_memory()
