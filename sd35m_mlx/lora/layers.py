"""LoRA as a side path beside a layer, never baked into a quantized weight.

A LoRA'd layer keeps its identity, module path and parameters (so saving, converting and quantization
reports see the base layer unchanged): only its class gains the side path
`y = base(x) + (x @ D) @ U (+ x @ dense) (+ bias)`, where D / U concatenate every active adapter's
factors (weights and alpha / rank folded into U), so N adapters cost two thin matmuls, not 2N.
Factors are cast to the layer's compute dtype: a float32 factor never promotes bfloat16 activations.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn

from .adapter import Factor

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear, nn.Conv2d)


@dataclass
class SidePath:
    base_class: type
    down_t: mx.array | None = None  # (in, R); for a Conv2d the down convolution, (R, kh, kw, in)
    up_t: mx.array | None = None  # (R, out)
    scale: float = 1.0  # multiplies (x @ down_t) @ up_t (1.0 when it is folded into up_t)
    dense_t: mx.array | None = None  # (in, out)
    bias: mx.array | None = None  # (out,)
    row_scale: mx.array | None = None  # (out,) DoRA: the base output (without bias) gains row_scale * it
    original_weight: mx.array | None = None  # the base weight while a fused delta replaces it

    @property
    def active(self) -> bool:
        return any(a is not None for a in (self.down_t, self.dense_t, self.bias, self.row_scale))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.down_t, self.up_t, self.dense_t, self.bias) if a is not None)


class _LoraLayer:
    """Mixed in before the layer's own class (see `attach`)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = super().__call__(x)
        side: SidePath = self._lora
        if side.row_scale is not None:
            y = y + side.row_scale * (y - self.bias if "bias" in self else y)
        if side.down_t is not None:
            lora = (self._lora_down(x, side.down_t)) @ side.up_t
            y = y + (lora if side.scale == 1.0 else side.scale * lora)
        if side.dense_t is not None:
            y = y + self._lora_down(x, side.dense_t)
        if side.bias is not None:
            y = y + side.bias
        return y

    def _lora_down(self, x: mx.array, w: mx.array) -> mx.array:
        if isinstance(self, nn.Conv2d):  # kohya / peft: the down factor is a conv like the base one
            return mx.conv2d(x, w, self.stride, self.padding, self.dilation, getattr(self, "groups", 1))
        return x @ w


_CLASSES: dict[type, type] = {}


def _lora_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Lora{base.__name__}", (_LoraLayer, base), {})
    return _CLASSES[base]


def is_lora_layer(module: nn.Module) -> bool:
    return isinstance(module, _LoraLayer)


def linear_shape(module: nn.Module) -> tuple[int, ...] | None:
    """(out, in) of a Linear or QuantizedLinear (packed weights report the unpacked width), (out, kh, kw, in)
    of a Conv2d; else None."""
    if isinstance(module, nn.Conv2d) and getattr(module, "groups", 1) == 1:
        return tuple(module.weight.shape)
    if isinstance(module, nn.QuantizedLinear):
        return (module.weight.shape[0], module.scales.shape[-1] * module.group_size)
    if isinstance(module, nn.Linear):
        return tuple(module.weight.shape)
    return None


def compute_dtype(module: nn.Module) -> mx.Dtype:
    return module.scales.dtype if isinstance(module, nn.QuantizedLinear) else module.weight.dtype


def layer_table(model: nn.Module) -> dict[str, tuple[int, int] | None]:
    """Module path -> shape (`linear_shape`) of every layer a LoRA can adapt; None for other leaf layers with
    a weight (embeddings, norms), which it cannot."""
    table = {}
    for path, m in model.named_modules():
        shape = linear_shape(m)
        if shape is not None:
            table[path] = shape
        elif "weight" in m and not m.children():
            table[path] = None
    return table


def detach_all(model: nn.Module) -> None:
    """Remove every side path and restore every fused weight (exactly: the original array comes back)."""
    for _, m in model.named_modules():
        if is_lora_layer(m):
            side: SidePath = m._lora
            if side.original_weight is not None:
                m.weight = side.original_weight
            m.__class__ = side.base_class
            del m._lora


def _module_at(model: nn.Module, path: str) -> nn.Module:
    m = model
    for part in path.split("."):
        m = m[int(part)] if isinstance(m, list) else m[part]
    return m


def dense_weight(layer: nn.Module) -> mx.array:
    """The layer's weight in float32 (dequantized for a QuantizedLinear)."""
    if isinstance(layer, nn.QuantizedLinear):
        mode = getattr(layer, "mode", "affine")
        w = mx.dequantize(layer.weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits, mode=mode)
        return w.astype(mx.float32)
    return layer.weight.astype(mx.float32)


def _dora(items: list[tuple[float, Factor]], layer: nn.Module) -> tuple[list[tuple[float, Factor]], mx.array | None]:
    """peft's DoRA as LoRA plus a row scale: adapter i adds (g_i - 1) * (x @ W.T) + g_i * s_i * (x @ (B A).T),
    g_i = m_i / ||W + s_i B_i A_i|| (row norms), s_i = weight * alpha / rank. Returns the items with g_i folded
    into `up` and the summed row scale sum(g_i - 1) of the base output (None without DoRA)."""
    out, row, weight = [], None, None
    for w, f in items:
        s = w * f.scale
        if f.magnitude is None or s == 0:
            out.append((w, f))
            continue
        if weight is None:
            weight = dense_weight(layer)
        up = f.up.astype(mx.float32)
        norm = mx.linalg.norm(weight + s * (up @ f.down.astype(mx.float32)), axis=1)
        g = f.magnitude.astype(mx.float32) / norm
        out.append((w, replace(f, up=up * g[:, None], magnitude=None)))
        row = g - 1 if row is None else row + (g - 1)
    return out, row


def _compose(items: list[tuple[float, Factor]], dtype: mx.Dtype, row: mx.array | None = None) -> SidePath:
    side = SidePath(base_class=object)
    if row is not None:
        side.row_scale = row.astype(dtype)
    low = [(w * f.scale, f) for w, f in items if f.down is not None and w * f.scale != 0]
    conv = bool(low) and low[0][1].down.ndim == 4

    def t(a):  # a Linear's factors are used transposed, a Conv2d's down convolution as it is
        return a if conv else a.T

    if len(low) == 1 and low[0][1].down.dtype == dtype and low[0][1].up.dtype == dtype:
        # one adapter in the compute dtype: transposed views of its own factors, no copy
        side.scale, f = low[0]
        side.down_t, side.up_t = t(f.down), f.up.T
    elif low:
        side.down_t = t(mx.concatenate([f.down.astype(mx.float32) for _, f in low])).astype(dtype)
        side.up_t = mx.concatenate([s * f.up.astype(mx.float32) for s, f in low], axis=1).T.astype(dtype)
    dense = [(w * f.scale, f) for w, f in items if f.delta is not None and w * f.scale != 0]
    if dense:
        delta = sum(s * f.delta.astype(mx.float32) for s, f in dense)
        side.dense_t = (delta if delta.ndim == 4 else delta.T).astype(dtype)
    biased = [(w * f.scale, f) for w, f in items if f.bias is not None and w * f.scale != 0]
    if biased:
        side.bias = sum(s * f.bias.astype(mx.float32) for s, f in biased).astype(dtype)
    return side


@dataclass
class ApplyReport:
    layers: int = 0  # layers with an active side path or fused delta
    fused: int = 0  # full-precision layers whose weight now holds the delta
    quantized_side_paths: int = 0  # quantized layers asked to fuse that kept the side path instead


def apply(
    model: nn.Module, targets: dict[str, list[tuple[float, Factor]]], fuse_scale: float | None = None
) -> ApplyReport:
    """Give `model` exactly these adapters: path -> [(adapter weight, factor), ...]. Clears what was there.

    `fuse_scale`: fold scale * delta into full-precision weights (the original weight is kept so
    `detach_all` restores it bit for bit); quantized layers keep the side path, at that scale.
    """
    detach_all(model)
    report = ApplyReport()
    for path, items in targets.items():
        layer = _module_at(model, path)
        if not isinstance(layer, LINEAR_TYPES):
            raise TypeError(f"{path} is a {type(layer).__name__}, not a Linear layer")
        dtype = compute_dtype(layer)
        quantized = isinstance(layer, nn.QuantizedLinear)
        if fuse_scale is not None:
            items = [(w * fuse_scale, f) for w, f in items]
        items, row = _dora(items, layer)
        if fuse_scale is not None and not quantized:
            side = _compose([(w, f) for w, f in items if f.bias is not None], dtype)
            side.down_t = side.up_t = side.dense_t = None  # the weight takes these; only a LoRA bias stays
            deltas = [w * f.dense() for w, f in items if w * f.scale != 0]
            if row is not None:
                deltas.append(row[:, None] * dense_weight(layer))
            if deltas:
                side.original_weight = layer.weight
                layer.weight = (layer.weight.astype(mx.float32) + sum(deltas)).astype(layer.weight.dtype)
                report.fused += 1
        else:
            side = _compose(items, dtype, row)
            report.quantized_side_paths += fuse_scale is not None and quantized
        if not side.active and side.original_weight is None:
            continue  # weight 0 everywhere: the layer stays exactly the base layer
        side.base_class = type(layer)
        layer.__class__ = _lora_class(type(layer))
        object.__setattr__(layer, "_lora", side)
        report.layers += 1
    return report


def side_path_bytes(models: Iterable[nn.Module]) -> int:
    return sum(m._lora.nbytes for model in models for _, m in model.named_modules() if is_lora_layer(m))
