"""Stable Diffusion 3.5 Medium in MLX."""

from ._blas import load_openblas

load_openblas()  # must run before the first `import mlx.core`

__version__ = "0.1.0.dev0"
