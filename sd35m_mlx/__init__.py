"""Stable Diffusion 3.5 Medium in MLX."""

from ._blas import load_openblas

load_openblas()  # must run before the first `import mlx.core`

__version__ = "0.1.0.dev0"
__all__ = ["StableDiffusion35", "GenerationCancelled"]


def __getattr__(name: str):
    # Lazy, so `import sd35m_mlx` (and the CLI's --help) stays fast: the pipeline pulls in transformers.
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sd35m_mlx' has no attribute {name!r}")
