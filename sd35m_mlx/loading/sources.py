"""Turn whatever the user names (folder, file, hub id) into loaded pipeline parts."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from . import hub, single_file, tiny_random
from .mlx_format import is_converted_folder, load_converted
from .parts import PipelineParts, load_schedule
from .safetensors_io import WeightsError
from .text_encoders import load_text_encoders
from .transformer import load_transformer
from .vae import load_vae


def load_diffusers_folder(folder: Path, dtype: mx.Dtype, *, load_t5: bool = True) -> PipelineParts:
    return PipelineParts(
        transformer=load_transformer(folder / "transformer", dtype),
        vae=load_vae(folder / "vae", dtype),
        prompt_encoder=load_text_encoders(folder, dtype, load_t5=load_t5),
        schedule=load_schedule(folder / "scheduler"),
    )


def load_pipeline_parts(
    source: str | os.PathLike, dtype: mx.Dtype, *, load_t5: bool = True, revision: str | None = None
) -> PipelineParts:
    """Local diffusers-layout folder, converted MLX folder, single-file checkpoint, hub repo id, or
    `tiny-random` (a random-weight toy built in memory, for trying things offline)."""
    if tiny_random.is_tiny_random(source) and not Path(str(source)).exists():
        return tiny_random.build_parts(dtype, load_t5=load_t5)
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir() and is_converted_folder(path):  # written by `sd35m-mlx convert`
        return load_converted(path, dtype, load_t5=load_t5)
    if path.is_dir() and (path / "model_index.json").exists():
        return load_diffusers_folder(path, dtype, load_t5=load_t5)
    if single_file.is_single_file_source(path):
        return single_file.load_single_file(path, dtype, load_t5=load_t5)
    if path.exists():
        raise WeightsError(f"{path}: not a diffusers-layout model folder (no model_index.json)")
    if hub.is_hub_id(source):  # a local path of the same name has won above
        return load_pipeline_parts(hub.download(source, revision=revision, load_t5=load_t5), dtype, load_t5=load_t5)
    raise FileNotFoundError(f"{source}: no such model folder or file")
