"""CLIP text transformer (CLIP-L/14 and OpenCLIP-G/14 text towers), as transformers'
`CLIPTextModelWithProjection`: attribute names follow its state-dict keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn


def quick_gelu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(1.702 * x)


# transformers' ACT2FN names for the activations CLIP checkpoints use
ACTIVATIONS = {
    "quick_gelu": quick_gelu,  # OpenAI CLIP-L
    "gelu": nn.gelu,  # OpenCLIP-G: exact (erf) GELU
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
}


@dataclass(frozen=True)
class CLIPTextConfig:
    """transformers `CLIPTextConfig` (a `text_encoder/config.json`); defaults are CLIP-L/14's."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    @classmethod
    def from_dict(cls, d: Mapping) -> CLIPTextConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; known: {', '.join(ACTIVATIONS)}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}"
            )
        return config


class CLIPTextOutput(NamedTuple):
    text_embeds: mx.array  # (B, projection_dim): pooled at the first EOS, final norm, projection
    last_hidden_state: mx.array  # (B, L, hidden): last layer output after the final LayerNorm
    hidden_states: tuple[mx.array, ...]  # embeddings, then every layer's output (no final norm)


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        positions = mx.arange(input_ids.shape[1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = (d // self.num_heads) ** -0.5
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal")
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def pool_positions(self, input_ids: mx.array) -> mx.array:
        """Index of the first EOS token of each sequence (transformers' rule, legacy case included)."""
        if self.config.eos_token_id == 2:
            # Old configs carry eos_token_id 2 (SD3's do); transformers then pools at the first
            # occurrence of the largest id, which is EOS (49407) for the CLIP vocabulary.
            target = input_ids.max(axis=-1, keepdims=True)
        else:
            target = mx.array(self.config.eos_token_id, dtype=input_ids.dtype)
        length = input_ids.shape[-1]
        first = mx.min(mx.where(input_ids == target, mx.arange(length), length), axis=-1)
        return mx.where(first == length, 0, first)  # no EOS at all: position 0, as torch's argmax gives

    def __call__(self, input_ids: mx.array) -> tuple[mx.array, mx.array, tuple[mx.array, ...]]:
        x = self.embeddings(input_ids)
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            hidden_states.append(x)
        last = self.final_layer_norm(x)
        pooled = last[mx.arange(last.shape[0]), self.pool_positions(input_ids)]
        return pooled, last, tuple(hidden_states)


class CLIPTextModel(nn.Module):
    """CLIP text tower with an optional `text_projection` (identity when `projection=False`:
    the Stability single-file clip_l has none)."""

    def __init__(self, config: CLIPTextConfig, projection: bool = True):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if projection:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    @property
    def has_projection(self) -> bool:
        return "text_projection" in self

    @property
    def pooled_dim(self) -> int:
        return self.config.projection_dim if self.has_projection else self.config.hidden_size

    @property
    def dtype(self) -> mx.Dtype:
        return self.text_model.final_layer_norm.weight.dtype

    def __call__(self, input_ids: mx.array) -> CLIPTextOutput:
        """input_ids: (B, L) integer token ids, L <= max_position_embeddings."""
        if input_ids.shape[-1] > self.config.max_position_embeddings:
            raise ValueError(
                f"CLIP takes at most {self.config.max_position_embeddings} tokens, got {input_ids.shape[-1]}"
            )
        pooled, last, hidden_states = self.text_model(input_ids)
        if self.has_projection:
            pooled = self.text_projection(pooled)
        return CLIPTextOutput(pooled, last, hidden_states)
