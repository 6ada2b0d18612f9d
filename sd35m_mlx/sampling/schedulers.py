"""ComfyUI's schedulers by name, computed as ComfyUI computes them for SD3 (its discrete flow table and shift).

ComfyUI builds them in comfy/samplers.py (`calculate_sigmas`, the scheduler functions) and
comfy/k_diffusion/sampling.py (karras, exponential) over comfy/model_sampling.py's
ModelSamplingDiscreteFlow: a float32 table sigma(t) = shift * t / (1 + (shift - 1) * t) at t = 1/1000 ... 1,
with `shift` set by the ModelSamplingSD3 node (3.0 for SD3.5). Read at ComfyUI commit
a125cd84b054a57729b5eecab930ca9408719832. Every step below keeps ComfyUI's dtype (torch float32 or Python
and NumPy float64), so the sigmas equal ComfyUI's bit for bit, except where torch calls a float32 libm
(pow, exp, tan in karras, exponential, kl_optimal): ours is the correctly rounded value, a float32 ulp away.

`normal` is the one exception by design: it is diffusers' FlowMatchEulerDiscreteScheduler schedule
(`schedule.FlowMatchSchedule.sigmas`), the schedule this package has always run, so earlier images replay. ComfyUI's
`normal` is the same formula in float32 rather than float64 (a few float32 ulps apart, tested).

How diffusers' own flow options relate (FlowMatchEulerDiscreteScheduler; tests/test_schedulers.py pins it):

==========================  ====================================================================
diffusers                   ours
==========================  ====================================================================
default                     ``normal``, equal bit for bit
``use_karras_sigmas``       not ``karras``: diffusers ramps from 1 down to its last shifted sigma
                            (the table's sigma_min shifted once more: 0.0089 at shift 3, 20 steps),
                            ComfyUI down to the table's sigma_min (0.0030)
``use_exponential_sigmas``  not ``exponential``, for the same reason
``use_beta_sigmas``         not ``beta``: diffusers spaces sigmas continuously between those ends,
                            ComfyUI picks table entries (diffusers needs scipy here; tested where present)
FlowMatchHeunDiscrete       ``normal``, each inner sigma listed twice (Heun's two stages)
DPMSolverMultistep, UniPC   none; nearest is ``simple``, within 1e-3 and 5e-3 (4 to 40 steps, shifts 1 to 6)
(``use_flow_sigmas``)
==========================  ====================================================================
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULERS = (
    "normal",
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "beta",
    "linear_quadratic",
    "kl_optimal",
    "ddim_uniform",
)

_F32 = np.float32
_MULTIPLIER = 1000  # ModelSamplingDiscreteFlow's timestep = sigma * multiplier


def check_scheduler(name: object) -> str:
    """The scheduler's name, or a ValueError naming the valid ones."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    return name  # type: ignore[return-value]


def check_shift(shift: object) -> float:
    """The flow shift as a float, or a TypeError/ValueError: it must be finite and > 0."""
    if isinstance(shift, bool) or not isinstance(shift, (int, float, np.integer, np.floating)):
        raise TypeError(f"shift must be a number, got {type(shift).__name__}")
    shift = float(shift)
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be finite and > 0, got {shift}")
    return shift


def _shift(shift: float, t):
    """comfy/model_sampling.py time_snr_shift on float32 values (torch casts the Python scalars to float32)."""
    if shift == 1.0:
        return t
    return _F32(shift) * t / (_F32(1) + _F32(shift - 1.0) * t)


class _FlowTable:
    """ModelSamplingDiscreteFlow(shift): the float32 sigma table and its ends."""

    def __init__(self, shift: float, num_train_timesteps: int):
        self.shift = shift
        t = np.arange(1, num_train_timesteps + 1, dtype=_F32) / _F32(num_train_timesteps) * _F32(_MULTIPLIER)
        self.sigmas = self.sigma(t)
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def sigma(self, timestep):
        return _shift(self.shift, timestep / _F32(_MULTIPLIER))


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32 as its CPU kernel computes it: from both ends towards the middle, each value
    one fused multiply-add (the compiler fuses ``start + step * i``; emulated in float64, a double rounding)."""
    if steps == 1:
        return np.array([start], _F32)
    start, end = _F32(start), _F32(end)
    step = np.float64((end - start) / _F32(steps - 1))
    idx = np.arange(steps)
    head = step * idx + np.float64(start)
    tail = np.float64(end) - step * (steps - idx - 1)
    return np.where(idx < steps // 2, head, tail).astype(_F32)


def _round_f32(x) -> np.ndarray:
    return np.asarray(x, np.float64).astype(_F32)


def _sigmas(values) -> np.ndarray:
    return np.append(np.asarray(values, _F32), _F32(0))


def _simple(table: _FlowTable, steps: int) -> np.ndarray:
    stride = len(table.sigmas) / steps
    return _sigmas([table.sigmas[-(1 + int(x * stride))] for x in range(steps)])


def _sgm_uniform(table: _FlowTable, steps: int) -> np.ndarray:
    start, end = table.sigma_max * _F32(_MULTIPLIER), table.sigma_min * _F32(_MULTIPLIER)
    return _sigmas(table.sigma(_linspace_f32(start, end, steps + 1)[:-1]))


def _karras(table: _FlowTable, steps: int, rho: float = 7.0) -> np.ndarray:
    ramp = _linspace_f32(0.0, 1.0, steps)
    min_inv_rho, max_inv_rho = float(table.sigma_min) ** (1 / rho), float(table.sigma_max) ** (1 / rho)
    base = _F32(max_inv_rho) + ramp * _F32(min_inv_rho - max_inv_rho)
    return _sigmas(_round_f32(base.astype(np.float64) ** rho))


def _exponential(table: _FlowTable, steps: int) -> np.ndarray:
    log_sigmas = _linspace_f32(math.log(float(table.sigma_max)), math.log(float(table.sigma_min)), steps)
    return _sigmas(_round_f32(np.exp(log_sigmas.astype(np.float64))))


def _betacf(a: float, b: float, x: float) -> float:
    # Continued fraction of the incomplete beta function (modified Lentz), as in Numerical Recipes' betacf.
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for aa in (even, odd):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def _beta_cdf(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def beta_ppf(p: float, a: float, b: float) -> float:
    """scipy.stats.beta.ppf(p, a, b) for p in [0, 1]: bisection on the CDF down to adjacent float64 values."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    if a == b and p == 0.5:
        return 0.5  # the symmetric median exactly, as scipy gives it (ComfyUI rounds 0.5 * 999 to even: 500)
    lo, hi = 0.0, 1.0
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            return hi if abs(_beta_cdf(hi, a, b) - p) < abs(_beta_cdf(lo, a, b) - p) else lo
        if _beta_cdf(mid, a, b) < p:
            lo = mid
        else:
            hi = mid


def _beta(table: _FlowTable, steps: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    # ComfyUI: timestep indices at the beta distribution's quantiles, repeats dropped (so maybe fewer steps).
    total = len(table.sigmas) - 1
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    indices = np.rint(np.array([beta_ppf(float(q), alpha, beta) for q in quantiles]) * total)
    kept = [int(t) for i, t in enumerate(indices) if i == 0 or t != indices[i - 1]]
    return _sigmas(table.sigmas[kept])


def _linear_quadratic(table: _FlowTable, steps: int, threshold_noise: float = 0.025) -> np.ndarray:
    # Mochi's schedule, in Python floats as ComfyUI writes it, then float32 times sigma_max.
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        linear_steps = steps // 2
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = step_diff / (linear_steps * quadratic_steps**2)
        linear_coef = threshold_noise / linear_steps - 2 * step_diff / (quadratic_steps**2)
        const = quadratic_coef * (linear_steps**2)
        quadratic = [quadratic_coef * (i**2) + linear_coef * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - x for x in linear + quadratic + [1.0]]
    return np.asarray(schedule, _F32) * table.sigma_max


def _kl_optimal(table: _FlowTable, steps: int) -> np.ndarray:
    # ComfyUI divides by steps - 1 and so returns NaN for one step; its limit there is sigma_max.
    idx = np.arange(steps, dtype=_F32) / _F32(max(steps - 1, 1))
    angle = idx * _F32(math.atan(float(table.sigma_min))) + (_F32(1) - idx) * _F32(math.atan(float(table.sigma_max)))
    return _sigmas(_round_f32(np.tan(angle.astype(np.float64))))


def _ddim_uniform(table: _FlowTable, steps: int) -> np.ndarray:
    # Every (1000 // steps)-th table entry from the second: 1000 % steps decides whether one extra step appears.
    stride = max(len(table.sigmas) // steps, 1)
    return _sigmas(table.sigmas[1::stride][::-1])


_HANDLERS = {
    "simple": _simple,
    "sgm_uniform": _sgm_uniform,
    "karras": _karras,
    "exponential": _exponential,
    "beta": _beta,
    "linear_quadratic": _linear_quadratic,
    "kl_optimal": _kl_optimal,
    "ddim_uniform": _ddim_uniform,
}


def scheduler_sigmas(name: str, steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> np.ndarray:
    """float32 sigmas from about 1 down to a final 0, for ComfyUI's scheduler `name` at `steps` steps.

    Length steps + 1, except where ComfyUI's own scheduler gives another count: `beta` drops repeated
    table entries (many steps), `ddim_uniform` takes every (1000 // steps)-th entry (e.g. 8 steps for 7).
    """
    name = check_scheduler(name)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    shift = check_shift(shift)
    if name == "normal":
        # Imported here: schedule.py needs MLX, and front ends import this module for SCHEDULERS and the checks.
        from .schedule import FlowMatchSchedule

        return FlowMatchSchedule(num_train_timesteps=num_train_timesteps, shift=shift).sigmas(int(steps))
    return _HANDLERS[name](_FlowTable(shift, num_train_timesteps), int(steps)).astype(_F32)
