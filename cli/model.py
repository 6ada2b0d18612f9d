"""Finding and loading the model: the CLI's only door into the pipeline (tests replace `load_pipeline`)."""

from __future__ import annotations

import os
from pathlib import Path

import sd35m_mlx  # noqa: F401  (loads OpenBLAS before mlx.core is imported below)

from .errors import UsageError


def resolve_model(model: str) -> Path:
    """The local folder for --model.

    For now only local diffusers-layout folders; Hugging Face Hub ids (the default
    `stabilityai/stable-diffusion-3.5-medium`) get a clear message until hub download lands, which
    will replace this one function.
    """
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        return path
    if path.exists():
        raise UsageError(f"--model {model}: not a folder (single-file checkpoints are not supported yet)")
    looks_like_hub_id = (
        not path.is_absolute() and not model.startswith((".", "~")) and model.count("/") == 1 and all(model.split("/"))
    )
    if looks_like_hub_id:
        raise UsageError(
            f"--model {model}: downloading from the Hugging Face Hub is not available yet; "
            "pass a local diffusers-layout folder (e.g. a `huggingface-cli download` of it)"
        )
    raise UsageError(f"--model {model}: no such folder")


def default_dtype() -> str:
    """bfloat16 on a GPU (Metal, CUDA); float32 on CPU, where MLX's bf16 matmul is many times slower."""
    import mlx.core as mx

    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


def load_pipeline(folder: Path, dtype: str, load_t5: bool):
    from sd35m_mlx import StableDiffusion35

    return StableDiffusion35.from_pretrained(folder, dtype=dtype, load_t5=load_t5)
