"""The loaded components of a pipeline, whatever layout they came from, and the schedule they share."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..models.mmdit import SD3Transformer2DModel
from ..models.prompt_encoder import PromptEncoder
from ..models.vae import AutoencoderKL
from ..sampling.schedule import FlowMatchSchedule
from .safetensors_io import read_config


@dataclass
class PipelineParts:
    transformer: SD3Transformer2DModel
    vae: AutoencoderKL
    prompt_encoder: PromptEncoder  # holds CLIP-L, CLIP-G, T5 (None when skipped) and the tokenizers
    schedule: FlowMatchSchedule


def load_schedule(folder: str | os.PathLike) -> FlowMatchSchedule:
    """The schedule of a diffusers `scheduler/` folder (its scheduler_config.json)."""
    return FlowMatchSchedule.from_dict(read_config(folder, "scheduler_config.json"))
