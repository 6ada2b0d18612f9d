"""ComfyUI's schedulers on SD3's flow table, against a torch reference written from ComfyUI's source, and
against diffusers' FlowMatchEulerDiscreteScheduler where it has the same option."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from sd35m_mlx.sampling.schedule import FlowMatchSchedule
from sd35m_mlx.sampling.schedulers import SCHEDULERS, beta_ppf, check_shift, scheduler_sigmas

STEPS = [1, 2, 4, 7, 20, 40]
SHIFTS = [1.0, 3.0, 3.1, 6.0]  # 3.1 is not a float32: torch rounds the shift to float32

# --- the reference: ComfyUI at commit a125cd84b054a57729b5eecab930ca9408719832, in torch as ComfyUI runs it.
# comfy/model_sampling.py time_snr_shift and ModelSamplingDiscreteFlow (as the ModelSamplingSD3 node sets it up:
# 1000 timesteps, multiplier 1000), comfy/samplers.py's scheduler functions and calculate_sigmas,
# comfy/k_diffusion/sampling.py get_sigmas_karras / get_sigmas_exponential. The beta quantiles come from mpmath
# (ComfyUI calls scipy.stats.beta.ppf; scipy is not installed here).


class _ComfyFlow:
    def __init__(self, shift):
        self.shift, self.multiplier = shift, 1000
        self.sigmas = self.sigma((torch.arange(1, 1001, 1) / 1000) * self.multiplier)
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        t = timestep / self.multiplier
        return t if self.shift == 1.0 else self.shift * t / (1 + (self.shift - 1) * t)


def _comfy_normal(ms, steps, sgm=False):
    start, end = ms.timestep(ms.sigma_max), ms.timestep(ms.sigma_min)
    timesteps = torch.linspace(start, end, steps + 1)[:-1] if sgm else torch.linspace(start, end, steps)
    return torch.FloatTensor([float(ms.sigma(ts)) for ts in timesteps] + [0.0])


def _comfy_simple(ms, steps):
    stride = len(ms.sigmas) / steps
    return torch.FloatTensor([float(ms.sigmas[-(1 + int(x * stride))]) for x in range(steps)] + [0.0])


def _comfy_ddim_uniform(ms, steps):
    sigs, x, stride = [0.0], 1, max(len(ms.sigmas) // steps, 1)
    while x < len(ms.sigmas):
        sigs.append(float(ms.sigmas[x]))
        x += stride
    return torch.FloatTensor(sigs[::-1])


def _mp_beta_ppf(p, a, b):
    if p >= 1:
        return 1.0
    mpmath.mp.dps = 40
    return float(mpmath.findroot(lambda x: mpmath.betainc(a, b, 0, x, regularized=True) - p, (0, 1), solver="anderson"))


def _comfy_beta(ms, steps, alpha=0.6, beta=0.6):
    total = len(ms.sigmas) - 1
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(np.array([_mp_beta_ppf(t, alpha, beta) for t in ts]) * total)
    sigs, last = [], -1
    for t in ts:
        if t != last:
            sigs.append(float(ms.sigmas[int(t)]))
        last = t
    return torch.FloatTensor(sigs + [0.0])


def _comfy_linear_quadratic(ms, steps, threshold_noise=0.025):
    if steps == 1:
        return torch.FloatTensor([1.0, 0.0]) * ms.sigma_max
    linear_steps = steps // 2
    linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    diff = linear_steps - threshold_noise * steps
    quadratic_steps = steps - linear_steps
    qc = diff / (linear_steps * quadratic_steps**2)
    lc = threshold_noise / linear_steps - 2 * diff / (quadratic_steps**2)
    const = qc * (linear_steps**2)
    quadratic = [qc * (i**2) + lc * i + const for i in range(linear_steps, steps)]
    return torch.FloatTensor([1.0 - x for x in linear + quadratic + [1.0]]) * ms.sigma_max


def _comfy_karras(n, sigma_min, sigma_max, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _comfy_exponential(n, sigma_min, sigma_max):
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp()
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _comfy_kl_optimal(n, sigma_min, sigma_max):
    adj_idxs = torch.arange(n, dtype=torch.float).div_(n - 1)
    sigmas = adj_idxs.new_zeros(n + 1)
    sigmas[:-1] = (adj_idxs * math.atan(sigma_min) + (1 - adj_idxs) * math.atan(sigma_max)).tan_()
    return sigmas


def comfy_calculate_sigmas(name: str, steps: int, shift: float) -> np.ndarray:
    ms = _ComfyFlow(shift)
    with_ms = {
        "normal": _comfy_normal,
        "sgm_uniform": lambda m, s: _comfy_normal(m, s, sgm=True),
        "simple": _comfy_simple,
        "ddim_uniform": _comfy_ddim_uniform,
        "beta": _comfy_beta,
        "linear_quadratic": _comfy_linear_quadratic,
    }
    if name in with_ms:
        return with_ms[name](ms, steps).numpy()
    fn = {"karras": _comfy_karras, "exponential": _comfy_exponential, "kl_optimal": _comfy_kl_optimal}[name]
    return fn(n=steps, sigma_min=float(ms.sigma_min), sigma_max=float(ms.sigma_max)).numpy()


def _ulps(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64)).max())


# Where ComfyUI's float32 values come from torch's float32 pow/exp/tan, ours are the correctly rounded values:
# at most one float32 ulp apart (measured, shifts 1, 2.5, 3, 3.1, 6 and up to 100 steps); the rest is exact.
MAX_ULPS = {"karras": 1, "exponential": 1, "kl_optimal": 1, "normal": 3}


@pytest.mark.parametrize("name", [n for n in SCHEDULERS if n != "normal"])
def test_scheduler_equals_comfyui(name):
    for steps in STEPS:
        if name == "kl_optimal" and steps == 1:
            continue  # ComfyUI divides by steps - 1 (NaN); see test_kl_optimal_one_step
        for shift in SHIFTS:
            ours, theirs = scheduler_sigmas(name, steps, shift=shift), comfy_calculate_sigmas(name, steps, shift)
            assert ours.dtype == np.float32 and ours.shape == theirs.shape, (steps, shift)
            assert _ulps(ours, theirs) <= MAX_ULPS.get(name, 0), (steps, shift, ours, theirs)


@pytest.mark.parametrize("shift", SHIFTS)
def test_normal_is_diffusers_flow_match_and_comfyui_to_float32_rounding(shift):
    for steps in STEPS:
        ours = scheduler_sigmas("normal", steps, shift=shift)
        np.testing.assert_array_equal(ours, FlowMatchSchedule(shift=shift).sigmas(steps))
        diffusers = FlowMatchEulerDiscreteScheduler(shift=shift)
        diffusers.set_timesteps(steps)
        np.testing.assert_array_equal(ours, diffusers.sigmas.numpy())
        # ComfyUI computes the same formula in float32 where diffusers uses float64
        assert _ulps(ours, comfy_calculate_sigmas("normal", steps, shift)) <= MAX_ULPS["normal"]


def test_schedules_start_near_one_and_end_in_zero():
    for name in SCHEDULERS:
        for steps in (1, 3, 20):
            sigmas = scheduler_sigmas(name, steps)
            assert sigmas[-1] == 0 and np.all(np.diff(sigmas) < 0), (name, steps)
            assert (len(sigmas) == steps + 1) or name in ("beta", "ddim_uniform"), (name, steps)


def test_ddim_uniform_and_beta_lengths_follow_comfyui():
    assert len(scheduler_sigmas("ddim_uniform", 7)) == 9  # 1000 // 7 = 142: entries 1, 143, ..., 995
    assert len(scheduler_sigmas("beta", 400)) < 401  # neighbouring quantiles round to one table entry


def test_kl_optimal_one_step():
    # ComfyUI returns [nan, 0] for one step (0 / 0); we return its limit, sigma_max.
    np.testing.assert_array_equal(scheduler_sigmas("kl_optimal", 1), np.array([1.0, 0.0], np.float32))


def test_shift_changes_every_table_scheduler():
    for name in SCHEDULERS:
        if name != "linear_quadratic":  # Mochi's schedule ignores the table apart from sigma_max = 1
            assert not np.array_equal(scheduler_sigmas(name, 10, 1.0), scheduler_sigmas(name, 10, 3.0)), name


@pytest.mark.parametrize(("p", "a", "b"), [(0.5, 0.6, 0.6), (0.975, 0.6, 0.6), (1e-3, 0.6, 0.6), (0.3, 2.0, 5.0)])
def test_beta_ppf_equals_mpmath(p, a, b):
    assert beta_ppf(p, a, b) == pytest.approx(_mp_beta_ppf(p, a, b), rel=1e-13, abs=1e-15)


# --- diffusers' own flow options: none equals ComfyUI's scheduler of the same name (docstring table)


def _diffusers(steps, **option):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, **option)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.numpy()


@pytest.mark.parametrize(
    ("option", "name"), [("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exponential")]
)
def test_diffusers_flow_options_ramp_to_another_sigma_min(option, name):
    ours, theirs = scheduler_sigmas(name, 20), _diffusers(20, **{option: True})
    assert ours[0] == theirs[0] == 1.0
    # diffusers ramps down to its last shifted sigma (the table's sigma_min shifted once more), ComfyUI to sigma_min
    np.testing.assert_allclose(theirs[-2], FlowMatchSchedule(shift=3.0).sigmas(20)[-2], rtol=1e-6)
    np.testing.assert_allclose([theirs[-2], ours[-2]], [0.0089, 0.0030], rtol=0.02)


def test_diffusers_beta_option_differs_from_comfyui_beta():
    pytest.importorskip("scipy")  # diffusers' use_beta_sigmas calls scipy.stats.beta.ppf
    assert not np.allclose(_diffusers(20, use_beta_sigmas=True), scheduler_sigmas("beta", 20), atol=1e-3)


@pytest.mark.parametrize("shift", SHIFTS)
def test_diffusers_flow_heun_is_normal_with_inner_sigmas_twice(shift):
    for steps in (4, 20):
        heun = FlowMatchHeunDiscreteScheduler(shift=shift)
        heun.set_timesteps(steps)
        s = heun.sigmas.numpy()
        np.testing.assert_array_equal(s[1:-1:2], s[2::2])
        once = np.concatenate([s[:1], s[1:-1:2], s[-1:]])
        np.testing.assert_array_equal(once, scheduler_sigmas("normal", steps, shift))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers' set_timesteps
@pytest.mark.parametrize(("scheduler", "atol"), [(DPMSolverMultistepScheduler, 1e-3), (UniPCMultistepScheduler, 5e-3)])
def test_diffusers_flow_sigmas_of_multistep_solvers_are_near_simple(scheduler, atol):
    for steps in (4, 20, 40):
        for shift in SHIFTS:
            solver = scheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
            solver.set_timesteps(steps)
            theirs, ours = solver.sigmas.numpy(), scheduler_sigmas("simple", steps, shift)
            assert not np.array_equal(theirs, ours)
            np.testing.assert_allclose(theirs, ours, rtol=0, atol=atol)


# --- validation


def test_unknown_scheduler_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown scheduler 'Karras'; valid: normal, simple, sgm_uniform"):
        scheduler_sigmas("Karras", 10)


@pytest.mark.parametrize("shift", [0, -1.0, float("nan"), float("inf")])
def test_bad_shift_is_a_value_error(shift):
    with pytest.raises(ValueError, match="shift must be finite and > 0"):
        scheduler_sigmas("simple", 10, shift=shift)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_steps_is_a_value_error(steps):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        scheduler_sigmas("simple", steps)


def test_shift_must_be_a_number():
    with pytest.raises(TypeError, match="shift must be a number"):
        check_shift("3")
