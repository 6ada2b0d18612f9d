"""One MMDiT(-X) joint block: adaLN-zero modulation, joint attention, optional attn2, MLPs."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .attention import Attention

_EPS = 1e-6


def layer_norm(x: mx.array) -> mx.array:
    """LayerNorm without affine parameters (eps 1e-6), as every MMDiT norm is."""
    return mx.fast.layer_norm(x, None, None, _EPS)


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    return x * (1 + scale) + shift


class AdaLayerNorm(nn.Module):
    """SiLU(c) -> Linear(D, n*D), returned as n vectors of shape (B, 1, D).

    The caller passes SiLU(c) (shared by every block) so it is computed once per step.
    """

    def __init__(self, dim: int, num_chunks: int):
        super().__init__()
        self.num_chunks = num_chunks
        self.linear = nn.Linear(dim, num_chunks * dim)

    def __call__(self, silu_c: mx.array) -> list[mx.array]:
        out = self.linear(silu_c)
        b = out.shape[0]
        out = out.reshape(b, self.num_chunks, 1, -1)
        return [out[:, i] for i in range(self.num_chunks)]


class FeedForward(nn.Module):
    """Linear(D, 4D), tanh-GELU, Linear(4D, D); keys net.0.proj and net.2 as in diffusers."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = [_GELUProj(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.net[2](self.net[0](x))


class _GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu_approx(self.proj(x))


class JointTransformerBlock(nn.Module):
    """Image stream x and context stream ctx attend jointly; MMDiT-X blocks add image-only attn2.

    Image modulation chunks: shift/scale/gate for attention and MLP (+ shift/scale/gate of attn2).
    The last block is context-pre-only: its context modulation is (scale, shift), the context
    stream only feeds attention keys/values and its output is dropped.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        qk_norm: str | None,
        dual_attention: bool,
        context_pre_only: bool,
    ):
        super().__init__()
        self.dual_attention = dual_attention
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNorm(dim, 9 if dual_attention else 6)
        self.norm1_context = AdaLayerNorm(dim, 2 if context_pre_only else 6)
        self.attn = Attention(dim, num_heads, head_dim, qk_norm, joint=True, context_pre_only=context_pre_only)
        if dual_attention:
            self.attn2 = Attention(dim, num_heads, head_dim, qk_norm)
        self.ff = FeedForward(dim)
        if not context_pre_only:
            self.ff_context = FeedForward(dim)

    def modulations(self, silu_c: mx.array) -> tuple[list[mx.array], list[mx.array]]:
        """Everything of this block that depends only on the conditioning vector."""
        return self.norm1(silu_c), self.norm1_context(silu_c)

    def __call__(
        self, x: mx.array, ctx: mx.array, mods: tuple[list[mx.array], list[mx.array]]
    ) -> tuple[mx.array, mx.array | None]:
        x_mod, c_mod = mods
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = x_mod[:6]

        nx = layer_norm(x)
        nctx = layer_norm(ctx)
        if self.context_pre_only:
            c_scale, c_shift = c_mod
            attn_x, attn_ctx = self.attn(modulate(nx, shift_msa, scale_msa), modulate(nctx, c_shift, c_scale))
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mod
            attn_x, attn_ctx = self.attn(modulate(nx, shift_msa, scale_msa), modulate(nctx, c_shift_msa, c_scale_msa))

        x = x + gate_msa * attn_x
        if self.dual_attention:
            shift_msa2, scale_msa2, gate_msa2 = x_mod[6:]
            x = x + gate_msa2 * self.attn2(modulate(nx, shift_msa2, scale_msa2))
        x = x + gate_mlp * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))

        if self.context_pre_only:
            return x, None
        ctx = ctx + c_gate_msa * attn_ctx
        ctx = ctx + c_gate_mlp * self.ff_context(modulate(layer_norm(ctx), c_shift_mlp, c_scale_mlp))
        return x, ctx
