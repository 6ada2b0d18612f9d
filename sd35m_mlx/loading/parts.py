"""The loaded components of a pipeline, whatever layout they came from."""

from __future__ import annotations

from dataclasses import dataclass

from ..models.mmdit import SD3Transformer2DModel
from ..models.vae import AutoencoderKL
from ..sampling.schedule import FlowMatchSchedule
from ..text_encoding import PromptEncoder


@dataclass
class PipelineParts:
    transformer: SD3Transformer2DModel
    vae: AutoencoderKL
    prompt_encoder: PromptEncoder  # holds CLIP-L, CLIP-G, T5 (None when skipped) and the tokenizers
    schedule: FlowMatchSchedule
