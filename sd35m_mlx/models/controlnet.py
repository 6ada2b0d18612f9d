"""SD3 ControlNet (diffusers `SD3ControlNetModel`): MMDiT blocks over latents + control latents, one zero-initialised
Linear per block whose outputs the transformer adds to its own blocks' image stream."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from .attention import Attention
from .embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from .mmdit_block import AdaLayerNorm, FeedForward, JointTransformerBlock, layer_norm, modulate


@dataclass(frozen=True)
class ControlNetConfig:
    """diffusers `SD3ControlNetModel` config.json; defaults are diffusers' (InstantX SD3 Medium ControlNets)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int | None = 4096  # None: no context stream (Stability's SD3.5 Large ControlNets)
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int | None = 96
    extra_conditioning_channels: int = 0
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    pos_embed_type: str | None = "sincos"
    use_pos_embed: bool = True  # False: the transformer's patch embedding is used (SD3.5 Large ControlNets)
    force_zeros_for_pooled_projection: bool = True  # zero pooled text, and control latents without the VAE shift

    @classmethod
    def from_dict(cls, d: Mapping) -> ControlNetConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["dual_attention_layers"] = tuple(kwargs.get("dual_attention_layers") or ())
        config = cls(**kwargs)
        if config.joint_attention_dim is not None and config.caption_projection_dim != config.hidden_size:
            raise ValueError(
                f"caption_projection_dim {config.caption_projection_dim} must equal "
                f"num_attention_heads * attention_head_dim = {config.hidden_size}"
            )
        if config.use_pos_embed and (config.pos_embed_type != "sincos" or not config.pos_embed_max_size):
            raise ValueError(
                "only a stored positional table is supported (pos_embed_type 'sincos' with pos_embed_max_size), "
                f"got pos_embed_type={config.pos_embed_type!r}, pos_embed_max_size={config.pos_embed_max_size!r}"
            )
        return config

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class PatchProjection(nn.Module):
    """Conv patchify without a positional table (diffusers PatchEmbed with pos_embed_type=None)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.proj(x)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


class SingleTransformerBlock(nn.Module):
    """Image-only block (diffusers SD3SingleTransformerBlock): adaLN-zero, self-attention, MLP."""

    context_pre_only = False

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNorm(dim, 6)
        self.attn = Attention(dim, num_heads, head_dim)
        self.ff = FeedForward(dim)

    def modulations(self, silu_c: mx.array) -> list[mx.array]:
        return self.norm1(silu_c)

    def __call__(self, x: mx.array, mods: list[mx.array]) -> mx.array:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa * self.attn(modulate(layer_norm(x), shift_msa, scale_msa))
        return x + gate_mlp * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))


class SD3ControlNetModel(nn.Module):
    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        if config.use_pos_embed:
            self.pos_embed = PatchEmbed(config.in_channels, dim, config.patch_size, config.pos_embed_max_size)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, config.pooled_projection_dim)
        if config.joint_attention_dim is not None:
            self.context_embedder = nn.Linear(config.joint_attention_dim, config.caption_projection_dim)
            self.transformer_blocks = [
                JointTransformerBlock(
                    dim, heads, head_dim, config.qk_norm, i in config.dual_attention_layers, context_pre_only=False
                )
                for i in range(config.num_layers)
            ]
        else:
            self.transformer_blocks = [SingleTransformerBlock(dim, heads, head_dim) for _ in range(config.num_layers)]
        self.controlnet_blocks = [nn.Linear(dim, dim) for _ in range(config.num_layers)]
        in_cond = config.in_channels + config.extra_conditioning_channels
        self.pos_embed_input = PatchProjection(in_cond, dim, config.patch_size)

    @property
    def joint(self) -> bool:
        return self.config.joint_attention_dim is not None

    def modulations(self, timestep: mx.array, pooled_projections: mx.array) -> list:
        silu_c = nn.silu(self.time_text_embed(timestep, pooled_projections))
        return [block.modulations(silu_c) for block in self.transformer_blocks]

    def schedule_modulations(self, timesteps: mx.array, pooled_projections: mx.array) -> list[list]:
        """adaLN vectors for every (step, batch element), one matmul per layer (as the transformer's)."""
        n, b = timesteps.shape[0], pooled_projections.shape[0]
        mods = self.modulations(mx.repeat(timesteps.astype(mx.float32), b), mx.tile(pooled_projections, (n, 1)))
        return [tree_map(lambda a, i=i: a[i * b : (i + 1) * b], mods) for i in range(n)]

    def residuals(
        self,
        hidden_states: mx.array,
        controlnet_cond: mx.array,
        context: mx.array | None,
        modulations: list,
        conditioning_scale: float = 1.0,
        patch_embed: PatchEmbed | None = None,
        pos: mx.array | None = None,
    ) -> list[mx.array]:
        """Per-block residuals (B, tokens, D) for NHWC latents and control latents, with `context` already
        embedded. `patch_embed`: the transformer's, for ControlNets without their own (use_pos_embed=False)."""
        embed = self.pos_embed if self.config.use_pos_embed else patch_embed
        if embed is None:
            raise ValueError("this ControlNet uses the transformer's patch embedding: pass patch_embed")
        x = embed(hidden_states, pos) + self.pos_embed_input(controlnet_cond)
        out = []
        for block, mods, proj in zip(self.transformer_blocks, modulations, self.controlnet_blocks, strict=True):
            if self.joint:
                x, context = block(x, context, mods)
            else:
                x = block(x, mods)
            out.append(proj(x) * conditioning_scale)
        return out

    def __call__(
        self,
        hidden_states: mx.array,
        controlnet_cond: mx.array,
        conditioning_scale: float = 1.0,
        encoder_hidden_states: mx.array | None = None,
        pooled_projections: mx.array | None = None,
        timestep: mx.array | float = 0.0,
        patch_embed: PatchEmbed | None = None,
    ) -> list[mx.array]:
        """diffusers' forward: NHWC latents and control latents -> the list of block residuals."""
        b = hidden_states.shape[0]
        if self.joint and encoder_hidden_states is None:
            raise ValueError("encoder_hidden_states is required: this ControlNet has a context_embedder")
        timestep = mx.broadcast_to(mx.array(timestep, dtype=mx.float32), (b,))
        context = self.context_embedder(encoder_hidden_states) if self.joint else None
        mods = self.modulations(timestep, pooled_projections)
        return self.residuals(
            hidden_states, controlnet_cond, context, mods, conditioning_scale, patch_embed=patch_embed
        )
