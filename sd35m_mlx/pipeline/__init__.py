"""The pipeline: `StableDiffusion35` (stable_diffusion.py) and the parts it wires: the numbered steps of
`generate` (steps.py), when the VAE tiles (tiling.py), calls from any thread (threads.py), ControlNets."""

from ..sampling.loop import GenerationCancelled, StepCallback, StepExtra, denoise
from ..sampling.memory import physical_memory
from .stable_diffusion import DEFAULT_TAESD, StableDiffusion35, parameter_bytes, resolve_dtype

__all__ = [
    "DEFAULT_TAESD",
    "GenerationCancelled",
    "StableDiffusion35",
    "StepCallback",
    "StepExtra",
    "denoise",
    "parameter_bytes",
    "physical_memory",
    "resolve_dtype",
]
