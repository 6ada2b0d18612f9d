"""One image on two ranks: rank 0 runs the unconditional half of the CFG batch, rank 1 the conditional
half (and Skip Layer Guidance's extra pass), and they swap their velocities every step.

Each step moves one velocity per rank (the transformer's output in the model dtype: 1 MiB at
1024x1024 in bfloat16; two in SLG steps). Both ranks then combine the halves with the same
arithmetic as `GuidedDenoiser` and take the same sampler step, so their latents stay identical.
"""

from __future__ import annotations

import functools

import mlx.core as mx
from mlx.utils import tree_map

from ..sampling.guidance import GuidedDenoiser
from .group import Ranks

UNCOND_RANK, COND_RANK = 0, 1


class CfgSplitDenoiser(GuidedDenoiser):
    """`GuidedDenoiser` with the [uncond, cond] batch split over two ranks.

    The context embedding and the schedule's modulations are computed for the whole batch, as one
    process does, and then cut to this rank's half, so every input of the per-step forward matches.
    """

    def __init__(self, transformer, context, pooled, timesteps, guidance, start, dtype, *, ranks: Ranks):
        if ranks.size != 2:
            raise ValueError(f"split='cfg' needs exactly 2 ranks, got {ranks.size}")
        if not guidance.cfg:
            raise ValueError(f"split='cfg' needs guidance_scale > 1 (two halves to split), got {guidance.scale}")
        self.ranks = ranks
        b = context.shape[0] // 2
        self._half = slice(0, b) if ranks.rank == UNCOND_RANK else slice(b, 2 * b)
        super().__init__(transformer, context, pooled, timesteps, guidance, start, dtype)
        self.context = self.context[self._half]
        mx.eval(self.context)

    def _modulations(self, timesteps) -> list:
        """This rank's half of the whole batch's modulations (the schedule's, and any other sigma's)."""
        return [tree_map(lambda a: a[self._half], m) for m in super()._modulations(timesteps)]

    def _forward(self, x, mods, skip_layers=None) -> mx.array:
        """The transformer's output in the model dtype (GuidedDenoiser._denoise before its float32 cast)."""
        if self.pos is None:
            p = self.transformer.config.patch_size
            self.pos = self.transformer.pos_embed.cropped_pos_embed(x.shape[1] // p, x.shape[2] // p)
        return self.transformer.denoise(x, self.context, mods, skip_layers, pos=self.pos)

    def __call__(self, i: int, x: mx.array, sigma: float | None = None) -> mx.array:
        g = self.guidance
        mods = self._mods(i, sigma)
        xin = x.astype(self.dtype)
        mine = [self._forward(xin, mods)]
        skip = g.skip_active(i, self.num_steps)
        if skip:  # the skip pass needs only the cond half's inputs: it runs where they are
            mine.append(self._forward(xin, mods, g.skip_layers) if self.ranks.rank == COND_RANK else mine[0])
        both = self.ranks.all_gather(mx.stack(mine), f"exchanging velocities at step {i - self.start + 1}")
        both = both.astype(mx.float32)
        v_uncond, v_cond = both[UNCOND_RANK, 0], both[COND_RANK, 0]
        v = v_uncond + g.scale * (v_cond - v_uncond)
        if skip:
            v = v + g.skip_scale * (v_cond - both[COND_RANK, 1])
        return v


def split_cfg(pipe, ranks: Ranks) -> None:
    """Make `pipe.generate` split each image's CFG batch over the two `ranks` (all ranks call generate
    with the same arguments; each gets the same image). Undo with `pipe.velocity_factory = GuidedDenoiser`."""
    pipe.velocity_factory = functools.partial(CfgSplitDenoiser, ranks=ranks)
