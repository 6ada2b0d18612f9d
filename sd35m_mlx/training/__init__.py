"""LoRA training for SD3.5 Medium: diffusers' SD3 flow-matching recipe on MLX, LoRA side paths only trained."""

from .lora_params import DEFAULT_TARGETS, TrainableLora, resolve_targets
from .recipe import Recipe, flow_matching_loss, sample_sigmas

__all__ = ["DEFAULT_TARGETS", "Recipe", "TrainableLora", "flow_matching_loss", "resolve_targets", "sample_sigmas"]
