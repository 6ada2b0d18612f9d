"""Trainable LoRA factors on the transformer, through the inference side path (sd35m_mlx/lora/layers.py).

The factors live here as a parameter tree `{module path: {"lora_A": (r, in), "lora_B": (out, r)}}` in
float32 (the optimizer's master copy, as diffusers' `cast_training_params`); `bind` hands them, cast to
each layer's compute dtype, to the layers' side paths, so the loss is differentiable in them and the
frozen base (bfloat16, or QuantizedLinear at 8 / 4 bits) never is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..lora import layers
from ..lora.adapter import Factor

# diffusers' train_dreambooth_lora_sd3.py default (both attention streams) plus SD3.5's image-only attn2
ATTENTION = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
)
PRESETS = {
    "attention": ATTENTION,
    "mlp": ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    "adaln": ("norm1.linear", "norm1_context.linear", "norm_out.linear"),
}
DEFAULT_TARGETS = ("attention",)


def resolve_targets(model: nn.Module, targets: str | Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    """Module paths of `model` named by `targets`: presets (attention, mlp, adaln) or module-name suffixes
    as peft's `target_modules` (`attn.to_q`, `ff.net.2`, `proj_out`), comma-separated or a list."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    names: dict[str, bool] = {}  # name -> must match (a preset's names need not: SD3 Medium has no attn2)
    for t in targets:
        for name in PRESETS.get(t, (t,)):
            names[name] = names.get(name, False) or t not in PRESETS
    linear = [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    paths = []
    for name, required in names.items():
        hits = [p for p in linear if p == name or p.endswith("." + name)]
        if required and not hits:
            raise ValueError(
                f"targets: {name!r} names no Linear layer of the transformer "
                f"(presets: {', '.join(PRESETS)}, or module names like attn.to_q, ff.net.2)"
            )
        paths.extend(hits)
    if not paths:
        raise ValueError(f"targets: {targets!r} adapt no layer (presets: {', '.join(PRESETS)})")
    return sorted(set(paths), key=_natural)


def _natural(path: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.split(".")]


class TrainableLora:
    """LoRA factors on `paths` of `model`, B initialised to zero (the model starts unchanged) and A as
    peft does (kaiming-uniform, a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in)))."""

    def __init__(self, model: nn.Module, paths: Sequence[str], rank: int, alpha: float | None = None, *, seed=0):
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.model, self.rank, self.alpha = model, rank, alpha
        self.layers = {p: layers._module_at(model, p) for p in paths}
        keys = mx.random.split(mx.random.key(seed), max(len(paths), 2))
        self.params = {}
        for i, (path, layer) in enumerate(self.layers.items()):
            out_dim, in_dim = layers.linear_shape(layer)
            bound = 1 / math.sqrt(in_dim)
            a = mx.random.uniform(-bound, bound, (rank, in_dim), key=keys[i])
            self.params[path] = {"lora_A": a, "lora_B": mx.zeros((out_dim, rank))}
        mx.eval(self.params)
        self.attach()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def attach(self) -> None:
        """Give the layers their side paths (replacing any adapters loaded before)."""
        factors = {p: Factor(down=f["lora_A"], up=f["lora_B"], scale=self.scale) for p, f in self.params.items()}
        layers.apply(self.model, {p: [(1.0, f)] for p, f in factors.items()})
        self.bind(self.params)

    def bind(self, params: dict) -> None:
        """Point the side paths of the layers in `params` (all, or some) at its factors (concrete arrays, or
        the tracers of a gradient transform)."""
        for path in params:
            layer = self.layers[path]
            side = layer._lora
            dtype = layers.compute_dtype(layer)
            side.down_t = params[path]["lora_A"].astype(dtype).T
            side.up_t = params[path]["lora_B"].astype(dtype).T
            side.scale = self.scale

    def detach(self) -> None:
        layers.detach_all(self.model)

    @property
    def num_parameters(self) -> int:
        return sum(f["lora_A"].size + f["lora_B"].size for f in self.params.values())

    def state_dict(self, prefix: str = "transformer.") -> dict[str, mx.array]:
        """diffusers / peft keys: `transformer.<path>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)."""
        out = {}
        for path, f in self.params.items():
            out[f"{prefix}{path}.lora_A.weight"] = f["lora_A"]
            out[f"{prefix}{path}.lora_B.weight"] = f["lora_B"]
        return out

    def target_modules(self) -> list[str]:
        """The distinct module-name suffixes trained, for peft's `target_modules`."""
        return sorted({p.split(".", 2)[-1] if p.startswith("transformer_blocks.") else p for p in self.params})


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing per transformer block (`mx.checkpoint`): a block's activations are dropped
    after the forward and recomputed in the backward. The LoRA factors a block uses go in as explicit
    inputs, so their gradients flow through the recomputation."""
    for block in model.transformer_blocks:
        if not isinstance(block, _CheckpointedBlock):
            block.__class__ = _checkpointed_class(type(block))


def uncheckpoint_blocks(model: nn.Module) -> None:
    for block in model.transformer_blocks:
        if isinstance(block, _CheckpointedBlock):
            block.__class__ = block._plain_class


class _CheckpointedBlock:
    def __call__(self, x, ctx, mods):
        lora = [m for _, m in self.named_modules() if layers.is_lora_layer(m)]
        base_call = super().__call__

        def inner(factors, x, ctx, mods):
            for m, (d, u) in zip(lora, factors, strict=True):
                m._lora.down_t, m._lora.up_t = d, u
            x, ctx = base_call(x, ctx, mods)
            return [x] if ctx is None else [x, ctx]

        factors = [(m._lora.down_t, m._lora.up_t) for m in lora]
        out = mx.checkpoint(inner)(factors, x, ctx, mods)
        return out[0], (out[1] if len(out) > 1 else None)


_CLASSES: dict[type, type] = {}


def _checkpointed_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Checkpointed{base.__name__}", (_CheckpointedBlock, base), {"_plain_class": base})
    return _CLASSES[base]
