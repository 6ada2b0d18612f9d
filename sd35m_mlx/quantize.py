"""Group-wise affine weight quantization of the MMDiT and T5 linear layers, streamed layer by layer.

Which layers get which precision is measured, not guessed (`benchmarks/bench_quantization.py`; the
relative errors per layer group are in benchmarks/README.md, "Figures behind library choices"):

- Embedders (time, pooled text, context_embedder) and proj_out stay in the compute dtype: under 1% of
  the linear weights, yet each alone at 8 bits costs more output error than all attention layers
  together: proj_out writes the velocity, the embedders feed every adaLN.
- adaLN linears (norm1, norm1_context, norm_out), a third of the weights, are never quantized below
  8 bits: at 4 bits they alone add as much error as every other quantized layer together.
- T5: no small group dominates (the gated FFN is most sensitive, but it is most of the weights), so
  every Linear is quantized; the token and relative-position embeddings are not Linear layers.

Rule for widths: `mx.quantize` groups each weight row in runs of `group_size` input features, so a
Linear whose input width is not a multiple of `group_size` stays in the compute dtype. All of SD3.5
Medium's (256, 1536, 2048, 4096, 6144, 10240) are multiples of 64; the tiny test models use 32.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .models.mmdit import SD3Transformer2DModel
from .models.t5 import T5EncoderModel

BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize's affine mode supports; the CLI offers 4 and 8
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64


@dataclass(frozen=True)
class LayerPolicy:
    """Module paths (fnmatch patterns) that are not quantized, or not below 8 bits."""

    keep: tuple[str, ...] = ()
    at_least_8_bits: tuple[str, ...] = ()


TRANSFORMER_POLICY = LayerPolicy(
    keep=("time_text_embed.*", "context_embedder", "proj_out"),
    at_least_8_bits=(
        "transformer_blocks.*.norm1.linear",
        "transformer_blocks.*.norm1_context.linear",
        "norm_out.linear",
    ),
)
T5_POLICY = LayerPolicy()
EVERY_LINEAR = LayerPolicy()


@dataclass(frozen=True)
class Quantization:
    """One layer's settings, as in the `"quantization"` entry of an mlx-lm style config.json."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"quantization bits must be one of {', '.join(map(str, BITS))}, got {self.bits!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"quantization group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size!r}"
            )

    def to_config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits}

    @classmethod
    def from_config(cls, d: dict) -> Quantization:
        return cls(bits=int(d["bits"]), group_size=int(d["group_size"]))


def default_policy(model: nn.Module) -> LayerPolicy:
    if isinstance(model, SD3Transformer2DModel):
        return TRANSFORMER_POLICY
    if isinstance(model, T5EncoderModel):
        return T5_POLICY
    return EVERY_LINEAR


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(path, p) for p in patterns)


def quantization_plan(
    model: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE, policy: LayerPolicy | None = None
) -> dict[str, int]:
    """Path -> bits of every Linear `quantize_model` quantizes (policy default: the model's own)."""
    policy = default_policy(model) if policy is None else policy
    return {
        path: max(bits, 8) if _matches(path, policy.at_least_8_bits) else bits
        for path, m in model.named_modules()
        if type(m) is nn.Linear and m.weight.shape[-1] % group_size == 0 and not _matches(path, policy.keep)
    }


def module_at(model: nn.Module, path: str) -> nn.Module:
    m = model
    for part in path.split("."):
        m = m[int(part)] if isinstance(m, list) else m[part]
    return m


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    owner = module_at(model, parent) if parent else model
    if isinstance(owner, list):
        owner[int(name)] = new
    else:
        setattr(owner, name, new)


def quantization_config(model: nn.Module) -> dict | None:
    """The model's `"quantization"` config entry (mlx-lm form), None if nothing is quantized:
    the most common settings, plus `path: {"group_size", "bits"}` for layers that differ."""
    layers = {p: (m.bits, m.group_size) for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    if not layers:
        return None
    (bits, group_size), _ = Counter(layers.values()).most_common(1)[0]
    config = Quantization(bits, group_size).to_config()
    for path, (b, g) in sorted(layers.items()):
        if (b, g) != (bits, group_size):
            config[path] = Quantization(b, g).to_config()
    return config


def quantization_of(model: nn.Module) -> Quantization | None:
    """The model's main quantization settings (those most of its quantized layers use), or None."""
    config = quantization_config(model)
    return None if config is None else Quantization.from_config(config)


def quantize_model(
    model: nn.Module,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    policy: LayerPolicy | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """Quantize `model`'s Linear layers in place as `quantization_plan` says; returns the model.

    Streams: each layer is quantized and evaluated before the next one is touched, and its
    full-precision weight is dropped at once. On a freshly loaded model (lazy `mx.load` arrays) peak
    memory is the quantized result plus one layer in full precision, never a copy of the model.
    A model already quantized with the same settings is returned as is.
    """
    spec = Quantization(bits, group_size)
    existing = quantization_of(model)
    if existing is not None:
        if existing != spec:
            raise ValueError(
                f"{type(model).__name__} is already quantized ({existing.bits} bits, group size "
                f"{existing.group_size}); quantize again from the original weights"
            )
        return model
    plan = quantization_plan(model, bits, group_size, policy)
    # Materialise the weights that stay in full precision first, one at a time and largest first: left
    # lazy, a float32 source's casts would all be in flight together at the first forward (measured
    # peak/final up to 1.45x; 1.07x this way, benchmarks/bench_memory.py).
    quantized = tuple(f"{path}." for path in plan)
    kept = [v for k, v in tree_flatten(model.parameters()) if not k.startswith(quantized)]
    for v in sorted(kept, key=lambda a: a.nbytes, reverse=True):
        mx.eval(v)
    for i, (path, layer_bits) in enumerate(plan.items()):
        q = nn.QuantizedLinear.from_linear(module_at(model, path), group_size, layer_bits)
        mx.eval(q.parameters())
        set_module(model, path, q)  # the last reference to the Linear (and its weight) goes here
        if progress is not None:
            progress(i + 1, len(plan))
    return model


def quantize_parts(
    parts,
    *,
    transformer_bits: int | None = None,
    t5_bits: int | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
):
    """Quantize a freshly loaded `PipelineParts` in place (None leaves a component as it is); returns it.

    Run it straight after `load_pipeline_parts`, before anything evaluates the weights, so the
    full-precision transformer and T5 are never in memory (see `quantize_model`).
    """
    if transformer_bits is not None:
        quantize_model(parts.transformer, transformer_bits, group_size)
    t5 = parts.prompt_encoder.text_encoder_3 if parts.prompt_encoder is not None else None
    if t5_bits is not None and t5 is not None:
        quantize_model(t5, t5_bits, group_size)
    return parts
