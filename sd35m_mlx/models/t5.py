"""T5 v1.1 encoder (SD3's T5-XXL text encoder), as transformers' `T5EncoderModel`: attribute
names follow its state-dict keys (`shared`, `encoder.block.0.layer.0.SelfAttention.q`, ...).

Run it in float32 or bfloat16, never float16: T5's activations exceed float16's range
(the loader refuses float16 for T5 and uses bfloat16 instead).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

# activation names as transformers resolves `feed_forward_proj` ("gated-gelu" means the tanh GELU)
ACTIVATIONS = {"gelu_new": nn.gelu_approx, "gelu": nn.gelu, "relu": nn.relu, "silu": nn.silu}


@dataclass(frozen=True)
class T5Config:
    """transformers `T5Config` (a `text_encoder_3/config.json`); defaults are T5 v1.1 XXL's."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    @classmethod
    def from_dict(cls, d: Mapping) -> T5Config:
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        _ = config.activation  # raises on an unsupported feed_forward_proj
        return config

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        name = self.feed_forward_proj.split("-")[-1]
        name = "gelu_new" if self.feed_forward_proj == "gated-gelu" else name  # transformers' special case
        if name not in ACTIVATIONS or self.feed_forward_proj.count("-") > 1:
            raise ValueError(f"unsupported feed_forward_proj {self.feed_forward_proj!r}")
        return name


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> mx.array:
    """(length, length) bucket ids of key position - query position, bidirectional (encoder).

    Same float32 arithmetic as transformers' `_relative_position_bucket`, so the integer
    truncation lands on the same side at the bucket boundaries (16, 32, 64 tokens away).
    """
    positions = mx.arange(length)
    relative = positions[None, :] - positions[:, None]
    num_buckets //= 2
    buckets = (relative > 0).astype(mx.int32) * num_buckets
    distance = mx.abs(relative)
    max_exact = num_buckets // 2
    scale = mx.array(math.log(max_distance / max_exact), dtype=mx.float32)
    far = mx.log(distance.astype(mx.float32) / max_exact) / scale * (num_buckets - max_exact)
    far = mx.minimum(max_exact + far.astype(mx.int32), num_buckets - 1)
    return buckets + mx.where(distance < max_exact, distance, far)


class T5LayerNorm(nn.Module):
    """RMS norm without mean or bias; the variance is always taken in float32."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        x32 = x.astype(mx.float32)
        variance = mx.mean(mx.square(x32), axis=-1, keepdims=True)
        return self.weight * (x32 * mx.rsqrt(variance + self.eps)).astype(self.weight.dtype)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.num_heads)

    def position_bias(self, length: int) -> mx.array:
        """(1, heads, length, length) additive attention bias (only block 0 holds the table)."""
        buckets = relative_position_buckets(length, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        B, L, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # T5 folds the 1/sqrt(d) into its query weights at training time: logits are not scaled
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=position_bias.astype(q.dtype))
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        return x + self.SelfAttention(self.layer_norm(x), position_bias)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.act = ACTIVATIONS[config.activation]
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5DenseActDense(nn.Module):
    """The original T5's (v1.0) non-gated feed-forward."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.act = ACTIVATIONS[config.activation]
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.wo(self.act(self.wi(x)))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = [T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)]

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        return self.layer[1](self.layer[0](x, position_bias))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.block = [T5Block(config, has_relative_attention_bias=i == 0) for i in range(config.num_layers)]
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    @property
    def dtype(self) -> mx.Dtype:
        return self.shared.weight.dtype

    def __call__(self, input_ids: mx.array) -> mx.array:
        """input_ids (B, L) -> last hidden state (B, L, d_model), after the final norm; no padding mask,
        as SD3 pipelines call it."""
        x = self.shared(input_ids)
        # block 0's relative position bias is shared by every layer
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1])
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
