"""The kernels one guided MMDiT step needs, each timed alone on the current MLX backend.

The inventory is the math of the step (REFERENCE.md, "MMDiT forward") as MLX primitives, one per
operation and unfused: every Linear at its real shape (`mx.addmm`, as nn.Linear runs it),
`mx.fast.scaled_dot_product_attention` on contiguous (B, heads, L, 64) inputs, `mx.fast.layer_norm`,
`mx.fast.rms_norm`, tanh-GELU (`nn.gelu_approx`), and the elementwise modulation
`x * (1 + scale) + shift`, gated residual `x + gate * y`, positional add and CFG combination.
Not in it: what a sampler precomputes once per generation (context embedder, timestep and pooled
embeddings, adaLN modulations, the positional crop), and data movement the math does not need
(concatenating the two streams, transposes, slices, the final unpatchify copy). So

    real step / sum of kernels

is above 1 by exactly the glue and scheduling our code adds, and below 1 only through fusion.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .measure import time_kernel

KINDS = ("linear", "attention", "norm", "elementwise")
_OP_KIND = {
    "linear": "linear",
    "patchify": "linear",
    "sdpa": "attention",
    "layer_norm": "norm",
    "rms_norm": "norm",
    "gelu_tanh": "elementwise",
    "modulate": "elementwise",
    "gate_residual": "elementwise",
    "add": "elementwise",
    "cfg": "elementwise",
}
_EPS = 1e-6


@dataclass(frozen=True)
class Kernel:
    op: str
    shape: tuple[int, ...]

    @property
    def kind(self) -> str:
        return _OP_KIND[self.op]

    @property
    def label(self) -> str:
        return f"{self.op}{list(self.shape)}"


@dataclass(frozen=True)
class StepShape:
    """Sizes of one transformer forward: batch (2 with CFG), image and context tokens, widths."""

    batch: int
    latent_h: int
    latent_w: int
    context: int
    dim: int
    heads: int
    head_dim: int
    in_channels: int
    out_channels: int
    patch: int

    @classmethod
    def of(cls, config, batch: int, latent_h: int, latent_w: int, context: int) -> StepShape:
        return cls(
            batch,
            latent_h,
            latent_w,
            context,
            config.hidden_size,
            config.num_attention_heads,
            config.attention_head_dim,
            config.in_channels,
            config.out_channels,
            config.patch_size,
        )

    @property
    def tokens(self) -> int:
        return (self.latent_h // self.patch) * (self.latent_w // self.patch)


def block_kernels(s: StepShape, dual: bool, pre_only: bool) -> Counter:
    """Kernel counts of one joint block: image stream, context stream, joint attention (+ attn2)."""
    b, n, m, d, h, hd, mlp = s.batch, s.tokens, s.context, s.dim, s.heads, s.head_dim, 4 * s.dim
    k: Counter = Counter()
    # image stream: LN -> modulate (x2 with attn2) -> q, k, v, rms(q, k) -> attention -> out -> gate
    k[Kernel("layer_norm", (b, n, d))] += 2
    k[Kernel("modulate", (b, n, d))] += 2 + dual
    k[Kernel("linear", (b, n, d, d))] += 4 + 4 * dual
    k[Kernel("rms_norm", (b, n, h, hd))] += 2 + 2 * dual
    k[Kernel("gate_residual", (b, n, d))] += 2 + dual
    k[Kernel("sdpa", (b, h, n + m, hd))] += 1
    if dual:
        k[Kernel("sdpa", (b, h, n, hd))] += 1
    k[Kernel("linear", (b, n, d, mlp))] += 1
    k[Kernel("gelu_tanh", (b, n, mlp))] += 1
    k[Kernel("linear", (b, n, mlp, d))] += 1
    # context stream; the last (context-pre-only) block only feeds keys and values
    full = not pre_only
    k[Kernel("layer_norm", (b, m, d))] += 1 + full
    k[Kernel("modulate", (b, m, d))] += 1 + full
    k[Kernel("linear", (b, m, d, d))] += 3 + full
    k[Kernel("rms_norm", (b, m, h, hd))] += 2
    if full:
        k[Kernel("gate_residual", (b, m, d))] += 2
        k[Kernel("linear", (b, m, d, mlp))] += 1
        k[Kernel("gelu_tanh", (b, m, mlp))] += 1
        k[Kernel("linear", (b, m, mlp, d))] += 1
    return k


def head_tail_kernels(s: StepShape) -> Counter:
    """Patchify + positional add, final LN + modulation + projection, CFG combination."""
    b, n, d, p = s.batch, s.tokens, s.dim, s.patch
    k: Counter = Counter()
    k[Kernel("patchify", (b, s.latent_h, s.latent_w, s.in_channels, d, p))] += 1
    k[Kernel("add", (b, n, d))] += 1
    k[Kernel("layer_norm", (b, n, d))] += 1
    k[Kernel("modulate", (b, n, d))] += 1
    k[Kernel("linear", (b, n, d, p * p * s.out_channels))] += 1
    if b > 1:
        k[Kernel("cfg", (b // 2, s.latent_h, s.latent_w, s.out_channels))] += 1
    return k


def step_kernels(s: StepShape, block_kinds: Iterable[tuple[bool, bool]]) -> Counter:
    total = head_tail_kernels(s)
    for dual, pre_only in block_kinds:
        total += block_kernels(s, dual, pre_only)
    return total


def _rand(shape: tuple[int, ...], dtype: mx.Dtype, scale: float = 1.0) -> mx.array:
    return (mx.random.normal(shape) * scale).astype(dtype)


def prepare(kernel: Kernel, dtype: mx.Dtype) -> Callable[[], mx.array]:
    """A closure computing `kernel` on random, already evaluated inputs."""
    op, sh = kernel.op, kernel.shape
    if op == "linear":
        b, t, i, o = sh
        x, w, bias = _rand((b, t, i), dtype), _rand((o, i), dtype, i**-0.5), _rand((o,), dtype, 0.1)
        args, fn = (x, w, bias), lambda: mx.addmm(bias, x, w.T)
    elif op == "patchify":
        b, hh, ww, c, d, p = sh
        x, w, bias = _rand((b, hh, ww, c), dtype), _rand((d, p, p, c), dtype, (p * p * c) ** -0.5), _rand((d,), dtype)
        args, fn = (x, w, bias), lambda: mx.conv2d(x, w, stride=p) + bias
    elif op == "sdpa":
        q, k, v = (_rand(sh, dtype) for _ in range(3))
        scale = sh[-1] ** -0.5
        args, fn = (q, k, v), lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    elif op == "layer_norm":
        x = _rand(sh, dtype)
        args, fn = (x,), lambda: mx.fast.layer_norm(x, None, None, _EPS)
    elif op == "rms_norm":
        x, w = _rand(sh, dtype), _rand(sh[-1:], dtype)
        args, fn = (x, w), lambda: mx.fast.rms_norm(x, w, _EPS)
    elif op == "gelu_tanh":
        x = _rand(sh, dtype)
        args, fn = (x,), lambda: nn.gelu_approx(x)
    elif op == "modulate":
        b, t, d = sh
        x, shift, scale = _rand(sh, dtype), _rand((b, 1, d), dtype, 0.1), _rand((b, 1, d), dtype, 0.1)
        args, fn = (x, shift, scale), lambda: x * (1 + scale) + shift
    elif op == "gate_residual":
        b, t, d = sh
        x, y, g = _rand(sh, dtype), _rand(sh, dtype), _rand((b, 1, d), dtype, 0.1)
        args, fn = (x, y, g), lambda: x + g * y
    elif op == "add":
        b, t, d = sh
        x, pos = _rand(sh, dtype), _rand((1, t, d), dtype)
        args, fn = (x, pos), lambda: x + pos
    elif op == "cfg":
        u, c = _rand(sh, dtype), _rand(sh, dtype)
        args, fn = (u, c), lambda: u + 4.5 * (c - u)
    else:
        raise ValueError(f"unknown kernel op {op!r}")
    mx.eval(args)
    return fn


def time_kernels(kernels: Iterable[Kernel], dtype: mx.Dtype, min_runs: int = 1) -> dict[Kernel, float]:
    """Seconds of each distinct kernel, alone (inputs are freed before the next one)."""
    return {k: time_kernel(prepare(k, dtype), min_runs=min_runs) for k in kernels}


def summarize(counts: Counter, seconds: dict[Kernel, float]) -> dict:
    """Sum of kernel times, by kind and in total, for kernel counts."""
    by_kind = dict.fromkeys(KINDS, 0.0)
    for k, c in counts.items():
        by_kind[k.kind] += c * seconds[k]
    return {"by_kind_s": by_kind, "sum_s": sum(by_kind.values())}


def kernel_table(counts: Counter, seconds: dict[Kernel, float]) -> list[dict]:
    rows = [
        {"kernel": k.label, "kind": k.kind, "count": c, "each_ms": seconds[k] * 1e3, "total_s": c * seconds[k]}
        for k, c in counts.items()
    ]
    return sorted(rows, key=lambda r: -r["total_s"])
