"""Joint (image + context) attention of the MMDiT, and the image-only attn2 of MMDiT-X blocks."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def _qk_norm(kind: str | None, head_dim: int) -> nn.Module | None:
    if kind is None:
        return None
    if kind == "rms_norm":
        return nn.RMSNorm(head_dim, eps=1e-6)
    raise ValueError(f"unsupported qk_norm {kind!r} (supported: None, 'rms_norm')")


class Attention(nn.Module):
    """Multi-head attention with diffusers' key names.

    `joint=True` adds the context stream (add_{q,k,v}_proj, norm_added_{q,k}, to_add_out):
    both streams are projected separately and attend over their concatenation.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        qk_norm: str | None = None,
        joint: bool = False,
        context_pre_only: bool = False,
    ):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.norm_q = _qk_norm(qk_norm, head_dim)
        self.norm_k = _qk_norm(qk_norm, head_dim)
        self.to_out = [nn.Linear(inner, dim)]
        self.joint = joint
        self.context_pre_only = context_pre_only
        if joint:
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.norm_added_q = _qk_norm(qk_norm, head_dim)
            self.norm_added_k = _qk_norm(qk_norm, head_dim)
            if not context_pre_only:
                self.to_add_out = nn.Linear(inner, dim)

    def _project(self, x, to_q, to_k, to_v, norm_q, norm_k):
        b, n, _ = x.shape
        q = to_q(x).reshape(b, n, self.num_heads, self.head_dim)
        k = to_k(x).reshape(b, n, self.num_heads, self.head_dim)
        v = to_v(x).reshape(b, n, self.num_heads, self.head_dim)
        if norm_q is not None:
            q, k = norm_q(q), norm_k(k)
        return q, k, v

    def _attend(self, q, k, v):
        b, n = q.shape[:2]
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return out.transpose(0, 2, 1, 3).reshape(b, n, -1)

    def __call__(self, x: mx.array, context: mx.array | None = None):
        q, k, v = self._project(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if not self.joint:
            return self.to_out[0](self._attend(q, k, v))
        cq, ck, cv = self._project(
            context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k
        )
        n = x.shape[1]
        out = self._attend(
            mx.concatenate([q, cq], axis=1), mx.concatenate([k, ck], axis=1), mx.concatenate([v, cv], axis=1)
        )
        x_out = self.to_out[0](out[:, :n])
        if self.context_pre_only:
            return x_out, None
        return x_out, self.to_add_out(out[:, n:])
