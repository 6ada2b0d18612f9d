"""Samplers over a flow-matching sigma schedule, with ComfyUI's names and maths (its KSampler on a flow
model: the RF / CONST variants, its default eta and s_noise). See base.py for the step protocol.

| name | module | model calls per step | fresh noise |
| --- | --- | --- | --- |
| euler, ddim, gradient_estimation | first_order | 1 | - |
| euler_ancestral, lcm | first_order | 1 | 1 draw |
| heun, dpm_2 | first_order | 2 (1 on the last step) | - |
| dpm_2_ancestral | first_order | 2 (1 on the last step) | 1 draw |
| dpmpp_2s_ancestral | dpmpp | 2 (1 on the last step) | 1 draw |
| dpmpp_sde | dpmpp | 2 (1 on the last step) | 2 draws |
| dpmpp_2m, res_multistep | dpmpp | 1 | - |
| dpmpp_2m_sde, dpmpp_3m_sde | dpmpp | 1 | 1 draw |
| ipndm, deis | multistep | 1 | - |
| uni_pc, uni_pc_bh2 | unipc | 1 | - |
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ...defaults import SAMPLERS
from .base import Brownian, Model, Noise, Sampler
from .dpmpp import (
    DPMPP2MSampler,
    DPMPP2MSDESampler,
    DPMPP2SAncestralSampler,
    DPMPP3MSDESampler,
    DPMPPSDESampler,
    ResMultistepSampler,
)
from .first_order import (
    DDIMSampler,
    DPM2AncestralSampler,
    DPM2Sampler,
    EulerAncestralSampler,
    EulerSampler,
    GradientEstimationSampler,
    HeunSampler,
    LCMSampler,
)
from .multistep import DEISSampler, IPNDMSampler
from .unipc import UniPCBH2Sampler, UniPCSampler

_SAMPLERS: dict[str, type[Sampler]] = {
    "euler": EulerSampler,
    "euler_ancestral": EulerAncestralSampler,
    "heun": HeunSampler,
    "dpm_2": DPM2Sampler,
    "dpm_2_ancestral": DPM2AncestralSampler,
    "dpmpp_2s_ancestral": DPMPP2SAncestralSampler,
    "dpmpp_sde": DPMPPSDESampler,
    "dpmpp_2m": DPMPP2MSampler,
    "dpmpp_2m_sde": DPMPP2MSDESampler,
    "dpmpp_3m_sde": DPMPP3MSDESampler,
    "lcm": LCMSampler,
    "ipndm": IPNDMSampler,
    "deis": DEISSampler,
    "res_multistep": ResMultistepSampler,
    "gradient_estimation": GradientEstimationSampler,
    "ddim": DDIMSampler,
    "uni_pc": UniPCSampler,
    "uni_pc_bh2": UniPCBH2Sampler,
}
if tuple(_SAMPLERS) != SAMPLERS:  # the MLX-free front ends list defaults.SAMPLERS: one set of names
    raise ImportError(f"sampler registry {tuple(_SAMPLERS)} differs from sd35m_mlx.defaults.SAMPLERS {SAMPLERS}")

__all__ = ["SAMPLERS", "Brownian", "Model", "Noise", "Sampler", "make_sampler", "sampler_class", "sampler_schedule"]


def sampler_class(name: str) -> type[Sampler]:
    try:
        return _SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def make_sampler(
    name: str,
    sigmas: Sequence[float] | np.ndarray,
    noise: Noise | None = None,
    *,
    shift: float = 3.0,
    brownian: Brownian | None = None,
) -> Sampler:
    """A fresh sampler for one run over `sigmas` (length N + 1, ending in 0; build them with
    `sampler_schedule`). `noise(shape)` draws the fresh noise of ancestral / SDE / LCM samplers (required
    for those); `brownian`, where given, replaces it for the SDE samplers by ComfyUI's Brownian-tree noise
    (sampling/brownian.py); `shift` is the model's schedule shift (the SDE samplers move a first sigma of 1 by it)."""
    cls = sampler_class(name)
    if cls.needs_noise and noise is None:
        raise ValueError(f"sampler {name!r} draws fresh noise every step: pass noise=")
    return cls(sigmas, noise, shift=shift, brownian=brownian)


def sampler_schedule(name: str, sigmas_for: Callable[[int], np.ndarray], steps: int) -> np.ndarray:
    """The sigmas a run of `steps` steps with sampler `name` uses, as ComfyUI's KSampler.calculate_sigmas:
    `sigmas_for(steps)`, or for dpm_2, dpm_2_ancestral and uni_pc `sigmas_for(steps + 1)` with its
    penultimate sigma dropped (still `steps` steps)."""
    if not sampler_class(name).discard_penultimate_sigma:
        return sigmas_for(steps)
    s = sigmas_for(steps + 1)
    return np.concatenate([s[:-2], s[-1:]])
