"""LoRA (and LyCORIS LoKr / LoHa) adapters: every published SD3.5 LoRA file format, several at once,
as side paths beside full-precision or quantized layers, or fused into full-precision weights."""

from .adapter import Adapter, Factor, LoraError
from .pipeline_mixin import LoraMixin

__all__ = ["Adapter", "Factor", "LoraError", "LoraMixin"]
