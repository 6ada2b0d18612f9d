"""Classifier-free guidance and Skip Layer Guidance with diffusers' semantics."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_map

from .. import defaults as D


@dataclass(frozen=True)
class GuidanceConfig:
    scale: float = D.GUIDANCE
    skip_layers: tuple[int, ...] | None = None
    skip_scale: float = D.SLG_SCALE
    skip_start: float = D.SLG_START
    skip_stop: float = D.SLG_STOP

    @property
    def cfg(self) -> bool:
        return self.scale > 1

    def skip_active(self, i: int, num_steps: int) -> bool:
        """diffusers: SLG runs on steps i with N * start < i < N * stop, and only with CFG."""
        return self.cfg and bool(self.skip_layers) and num_steps * self.skip_start < i < num_steps * self.skip_stop


class GuidedDenoiser:
    """Velocity of the guided model at step i of a fixed schedule.

    Everything independent of the latent is prepared once: the embedded context and, for every
    step, the adaLN modulation vectors. With CFG the batch is [uncond, cond] in one forward.
    """

    def __init__(self, transformer, context, pooled, timesteps, guidance: GuidanceConfig, start: int, dtype):
        self.transformer = transformer
        self.guidance = guidance
        self.num_steps = len(timesteps)
        self.dtype = dtype
        self.context = transformer.context_embedder(context.astype(dtype))
        t = mx.array(timesteps[start:], dtype=mx.float32)  # sigma * 1000 in float32, as diffusers
        self.start = start
        self.modulations = transformer.schedule_modulations(t, pooled.astype(dtype))
        self.pos = None  # the cropped positional table, fixed once the latent size is known
        mx.eval(self.context, self.modulations)

    def _denoise(self, x, context, mods, skip_layers=None, block_residuals=None):
        if self.pos is None:
            p = self.transformer.config.patch_size
            self.pos = self.transformer.pos_embed.cropped_pos_embed(x.shape[1] // p, x.shape[2] // p)
        out = self.transformer.denoise(x, context, mods, skip_layers, pos=self.pos, block_residuals=block_residuals)
        return out.astype(mx.float32)

    def __call__(self, i: int, x: mx.array, block_residuals: list[mx.array] | None = None) -> mx.array:
        """`block_residuals`: ControlNet residuals for the whole model batch ([uncond, cond] with CFG)."""
        g = self.guidance
        mods = self.modulations[i - self.start]
        b = x.shape[0]
        xin = (mx.concatenate([x, x]) if g.cfg else x).astype(self.dtype)
        v = self._denoise(xin, self.context, mods, block_residuals=block_residuals)
        if not g.cfg:
            return v
        v_uncond, v_cond = v[:b], v[b:]
        v = v_uncond + g.scale * (v_cond - v_uncond)
        if g.skip_active(i, self.num_steps):
            # the skip pass is the cond model with layers skipped: it gets the cond half of any ControlNet
            # residuals (diffusers' ControlNet pipeline has no SLG; its transformer adds them after skipped blocks too)
            cond_mods = tree_map(lambda a: a[b:], mods)
            cond_res = [r[b:] for r in block_residuals] if block_residuals else None
            v_skip = self._denoise(x.astype(self.dtype), self.context[b:], cond_mods, g.skip_layers, cond_res)
            v = v + g.skip_scale * (v_cond - v_skip)
        return v
