"""Finding and loading the model: the CLI's only door into the pipeline (tests replace `load_pipeline`)."""

from __future__ import annotations

import os
from pathlib import Path

import click

import sd35m_mlx  # noqa: F401  (loads OpenBLAS before mlx.core is imported below)

from .errors import RunError, UsageError


def resolve_model(model: str, *, revision: str | None = None, load_t5: bool = True) -> Path | str:
    """The local folder for --model: the folder itself, or a Hugging Face Hub id's snapshot in the HF
    cache, downloaded (only the files needed; no T5 when it is skipped) if the cache lacks them;
    `tiny-random` (a toy built in memory, for trying commands offline) as it is."""
    from sd35m_mlx.loading import hub  # imports huggingface_hub: not for --help
    from sd35m_mlx.loading.tiny_random import is_tiny_random

    if not model.strip():
        raise UsageError("--model is empty: name a model folder, a .safetensors file or a Hub id (owner/name)")
    path = Path(os.path.expanduser(model))
    if is_tiny_random(model) and not path.exists():
        if revision is not None:
            raise UsageError("--revision applies to a Hugging Face Hub --model, not to tiny-random")
        return model
    if path.exists() and revision is not None:
        raise UsageError(f"--revision applies to a Hugging Face Hub --model, not to the local {model}")
    if path.is_dir() or path.suffix == ".safetensors" and path.is_file():  # folder or single-file checkpoint
        return path
    if path.exists():
        raise UsageError(f"--model {model}: not a model folder or .safetensors checkpoint")
    if not hub.is_hub_id(model):
        raise UsageError(f"--model {model}: no such folder (nor a Hugging Face Hub id: owner/name)")
    try:
        return hub.download(model, revision=revision, load_t5=load_t5)
    except hub.ModelSourceError as e:
        raise RunError(str(e)) from None


def default_dtype() -> str:
    """bfloat16 on a GPU (Metal, CUDA); float32 on CPU, where MLX's bf16 matmul is many times slower."""
    import mlx.core as mx

    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


def load_pipeline(folder: Path, dtype: str, load_t5: bool, **options):
    """options: quantize, t5_quantize, low_memory (StableDiffusion35.from_pretrained's arguments)."""
    from sd35m_mlx import StableDiffusion35
    from sd35m_mlx.loading.tiny_random import is_tiny_random

    if is_tiny_random(folder):
        click.echo("Note: tiny-random has random weights (for trying commands offline): its images are noise", err=True)
    return StableDiffusion35.from_pretrained(folder, dtype=dtype, load_t5=load_t5, **options)
