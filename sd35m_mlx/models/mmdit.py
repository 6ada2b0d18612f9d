"""SD3 / SD3.5 MMDiT(-X) transformer, config-driven, NHWC in and out."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from .mmdit_block import AdaLayerNorm, JointTransformerBlock, layer_norm, modulate


@dataclass(frozen=True)
class MMDiTConfig:
    """diffusers `transformer/config.json`; defaults are SD3.5 Medium's."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 24
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 384
    dual_attention_layers: tuple[int, ...] = tuple(range(13))
    qk_norm: str | None = "rms_norm"

    @classmethod
    def from_dict(cls, d: Mapping) -> MMDiTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "dual_attention_layers" in kwargs:
            kwargs["dual_attention_layers"] = tuple(kwargs["dual_attention_layers"] or ())
        else:
            kwargs["dual_attention_layers"] = ()  # diffusers' default: plain SD3
        kwargs.setdefault("qk_norm", None)
        if kwargs.get("out_channels") is None:
            kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
        config = cls(**kwargs)
        if config.caption_projection_dim != config.hidden_size:
            raise ValueError(
                f"caption_projection_dim {config.caption_projection_dim} must equal "
                f"num_attention_heads * attention_head_dim = {config.hidden_size}"
            )
        return config

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class SD3Transformer2DModel(nn.Module):
    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.pos_embed = PatchEmbed(config.in_channels, dim, config.patch_size, config.pos_embed_max_size)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, config.pooled_projection_dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = [
            JointTransformerBlock(
                dim,
                config.num_attention_heads,
                config.attention_head_dim,
                config.qk_norm,
                dual_attention=i in config.dual_attention_layers,
                context_pre_only=i == config.num_layers - 1,
            )
            for i in range(config.num_layers)
        ]
        self.norm_out = AdaLayerNorm(dim, 2)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * config.out_channels)

    # The pieces below depend only on (timestep, pooled text), not on the latent: a sampler may
    # compute them once for the whole schedule and pass them to `denoise`.
    def conditioning(self, timestep: mx.array, pooled_projections: mx.array) -> mx.array:
        """SiLU(time + pooled-text embedding), the input of every adaLN, (B, D)."""
        return nn.silu(self.time_text_embed(timestep, pooled_projections))

    def modulations(self, silu_c: mx.array) -> list:
        """Per-block adaLN vectors plus the final layer's (scale, shift)."""
        return [block.modulations(silu_c) for block in self.transformer_blocks] + [self.norm_out(silu_c)]

    def schedule_modulations(self, timesteps: mx.array, pooled_projections: mx.array) -> list[list]:
        """adaLN vectors for every (step, batch element) at once: `modulations` per step.

        One matmul per adaLN layer for the whole schedule instead of one per step; the result
        (~80 MB for 40 steps at batch 2 in bfloat16) replaces ~0.5B adaLN weights in the loop.
        """
        n, b = timesteps.shape[0], pooled_projections.shape[0]
        t = mx.repeat(timesteps.astype(mx.float32), b)
        pooled = mx.tile(pooled_projections, (n, 1))
        mods = self.modulations(self.conditioning(t, pooled))
        return [tree_map(lambda a, i=i: a[i * b : (i + 1) * b], mods) for i in range(n)]

    def release_modulation_weights(self) -> int:
        """Drop the adaLN and conditioning-embedder weights (~0.77B parameters in SD3.5 Medium) once
        `schedule_modulations` has run: `denoise` does not use them. Returns the bytes released.
        The model can no longer compute new modulations; reload it for the next schedule."""
        owners = [(self, "time_text_embed"), (self, "norm_out")]
        owners += [(b, name) for b in self.transformer_blocks for name in ("norm1", "norm1_context")]
        released = 0
        for owner, name in owners:
            module = owner.pop(name, None)
            if module is not None:
                released += sum(v.nbytes for _, v in tree_flatten(module.parameters()))
        return released

    def denoise(
        self,
        hidden_states: mx.array,
        context: mx.array,
        modulations: list,
        skip_layers: Iterable[int] | None = None,
        pos: mx.array | None = None,
        block_residuals: list[mx.array] | None = None,
    ) -> mx.array:
        """The latent-dependent part of the forward, with `context` already embedded.

        `block_residuals` (ControlNet outputs, (B, tokens, D) each) are added to the image stream after every
        block that is not context-pre-only, skipped or not, residual int(i / (n_blocks / n_residuals)) after
        block i (diffusers' `block_controlnet_hidden_states`)."""
        height, width = hidden_states.shape[1:3]
        x = self.pos_embed(hidden_states, pos)
        skip = set(skip_layers or ())
        n = len(self.transformer_blocks)
        for i, block in enumerate(self.transformer_blocks):
            if i not in skip:
                x, new_context = block(x, context, modulations[i])
                if new_context is not None:
                    context = new_context
            if block_residuals and not block.context_pre_only:
                x = x + block_residuals[int(i / (n / len(block_residuals)))]
        return self.output(x, modulations[-1], height, width)

    def output(self, x: mx.array, modulation, height: int, width: int) -> mx.array:
        """The final adaLN-modulated norm and projection, tokens (B, N, D) -> NHWC velocity (B, H/8, W/8, C)."""
        scale, shift = modulation
        x = self.proj_out(modulate(layer_norm(x), shift, scale))
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], height // p, width // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(x.shape[0], height, width, c)

    def embed_conditions(self, encoder_hidden_states, pooled_projections, timestep, batch: int) -> tuple:
        """(embedded context, `modulations`) for a batch: what the blocks take besides the latent tokens."""
        timestep = mx.broadcast_to(mx.array(timestep, dtype=mx.float32), (batch,))
        silu_c = self.conditioning(timestep, pooled_projections)
        return self.context_embedder(encoder_hidden_states), self.modulations(silu_c)

    def __call__(
        self,
        hidden_states: mx.array,
        encoder_hidden_states: mx.array,
        pooled_projections: mx.array,
        timestep: mx.array | float,
        skip_layers: Iterable[int] | None = None,
        block_residuals: list[mx.array] | None = None,
    ) -> mx.array:
        """Velocity for NHWC latents (B, H/8, W/8, C); `timestep` is sigma * 1000, scalar or (B,)."""
        b, height, width, _ = hidden_states.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} must be divisible by the patch size {p}")
        context, modulations = self.embed_conditions(encoder_hidden_states, pooled_projections, timestep, b)
        return self.denoise(hidden_states, context, modulations, skip_layers, block_residuals=block_residuals)
