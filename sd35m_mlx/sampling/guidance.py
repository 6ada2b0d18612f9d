"""Classifier-free guidance and Skip Layer Guidance with diffusers' semantics."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
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


TIMESTEP_SCALE = 1000  # the model's timestep is sigma * 1000 (diffusers' num_train_timesteps, ComfyUI's multiplier)


def model_timestep(sigma: float) -> float:
    """sigma * 1000 in float32, as diffusers and ComfyUI hand it to the model (for the schedule's float32
    sigmas this equals FlowMatchSchedule.timesteps exactly)."""
    return float(np.float32(sigma) * np.float32(TIMESTEP_SCALE))


class ModulationTable:
    """adaLN modulation vectors by sigma: the schedule's computed at once (one matmul per adaLN layer for all
    steps), any other sigma's (a sampler's midpoints) on first use and kept, or ahead with `add`.

    `compute(timesteps: np.ndarray) -> list` gives one entry per timestep."""

    def __init__(self, compute: Callable[[np.ndarray], list], timesteps: Sequence[float]):
        self._compute = compute
        ts = np.asarray(timesteps, np.float32)
        self.schedule = compute(ts)  # one entry per schedule step, in order
        self._by_timestep = {float(t): m for t, m in zip(ts, self.schedule, strict=True)}
        mx.eval(self.schedule)

    def add(self, sigmas: Sequence[float]) -> None:
        """Compute the entries of `sigmas` not yet known, in one batch."""
        missing = sorted({model_timestep(s) for s in sigmas} - set(self._by_timestep))
        if missing:
            mods = self._compute(np.array(missing, np.float32))
            mx.eval(mods)
            self._by_timestep.update(zip(missing, mods, strict=True))

    def at(self, sigma: float) -> list:
        t = model_timestep(sigma)
        if t not in self._by_timestep:
            self.add([sigma])
        return self._by_timestep[t]


class GuidedDenoiser:
    """Velocity of the guided model at any sigma of a run; step index i decides SLG's window.

    Everything independent of the latent is prepared once: the embedded context and, for every
    schedule step, the adaLN modulation vectors (other sigmas: `ModulationTable`). With CFG the batch
    is [uncond, cond] in one forward.
    """

    def __init__(self, transformer, context, pooled, timesteps, guidance: GuidanceConfig, start: int, dtype):
        self.transformer = transformer
        self.guidance = guidance
        self.num_steps = len(timesteps)
        self.dtype = dtype
        self.context = transformer.context_embedder(context.astype(dtype))
        self.pooled = pooled.astype(dtype)
        self.start = start
        # The table lives in self: handing it the bound method would make a cycle, and the run's arrays would wait
        # for Python's cycle collector instead of going when the run ends. A weak method keeps subclasses' overrides.
        method = weakref.WeakMethod(self._modulations)
        self.table = ModulationTable(lambda ts: method()(ts), timesteps[start:])  # timesteps: sigma * 1000, float32
        self.modulations = self.table.schedule
        self.pos = None  # the cropped positional table, fixed once the latent size is known
        mx.eval(self.context)

    def _modulations(self, timesteps: np.ndarray) -> list:
        if getattr(self.transformer, "time_text_embed", None) is None:
            raise RuntimeError(
                "the transformer's adaLN weights were released (low_memory) before the modulations of every "
                "sigma were computed: call precompute(sampler.model_sigmas(start)) first"
            )
        return self.transformer.schedule_modulations(mx.array(timesteps), self.pooled)

    def precompute(self, sigmas: Sequence[float]) -> None:
        """The modulations of every sigma a run will evaluate (a sampler's `model_sigmas`), before low_memory
        releases the weights that compute them."""
        self.table.add(sigmas)

    def _mods(self, i: int, sigma: float | None):
        return self.modulations[i - self.start] if sigma is None else self.table.at(sigma)

    def _denoise(self, x, context, mods, skip_layers=None, block_residuals=None):
        if self.pos is None:
            p = self.transformer.config.patch_size
            self.pos = self.transformer.pos_embed.cropped_pos_embed(x.shape[1] // p, x.shape[2] // p)
        out = self.transformer.denoise(x, context, mods, skip_layers, pos=self.pos, block_residuals=block_residuals)
        return out.astype(mx.float32)

    def __call__(
        self, i: int, x: mx.array, sigma: float | None = None, block_residuals: list[mx.array] | None = None
    ) -> mx.array:
        """Velocity at step i, evaluated at `sigma` (default: the schedule's sigma of step i).
        `block_residuals`: ControlNet residuals for the whole model batch ([uncond, cond] with CFG)."""
        g = self.guidance
        mods = self._mods(i, sigma)
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
