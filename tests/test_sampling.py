"""Flow-matching schedule and samplers against diffusers and an independent k-diffusion transcription."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline

from sd35m_mlx.sampling.samplers import SAMPLERS, make_sampler
from sd35m_mlx.sampling.schedule import FlowMatchSchedule, img2img_start_index, scale_noise

STEPS = (1, 2, 8, 28, 40, 50)
SHIFTS = (1.0, 3.0)


def _diffusers_scheduler(shift, n):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(n)
    return scheduler


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("n", STEPS)
def test_schedule_matches_diffusers_bit_for_bit(n, shift):
    ref = _diffusers_scheduler(shift, n)
    schedule = FlowMatchSchedule(shift=shift)
    sigmas, timesteps = schedule.sigmas(n), schedule.timesteps(n)
    assert sigmas.dtype == np.float32 and sigmas.shape == (n + 1,) and sigmas[-1] == 0
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())


def test_sd35_medium_eight_step_sigmas():
    expected = [1.0, 0.94754, 0.88279, 0.80084, 0.69379, 0.54805, 0.33797, 0.00893, 0.0]  # REFERENCE.md
    np.testing.assert_allclose(FlowMatchSchedule().sigmas(8), expected, atol=5e-6)


def test_schedule_config_from_dict():
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    assert FlowMatchSchedule.from_dict(config) == FlowMatchSchedule(1000, 3.0)
    assert FlowMatchSchedule.from_dict({}).shift == 1.0  # diffusers' own default
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        FlowMatchSchedule.from_dict({"shift": 3.0, "use_dynamic_shifting": True})
    with pytest.raises(ValueError, match=">= 1"):
        FlowMatchSchedule().sigmas(0)


def test_euler_matches_diffusers_step_over_a_whole_schedule():
    n = 12
    ref = _diffusers_scheduler(3.0, n)
    sampler = make_sampler("euler", FlowMatchSchedule().sigmas(n))
    g = torch.Generator().manual_seed(0)
    x_ref = torch.randn(2, 16, 6, 5, generator=g)
    x = mx.array(x_ref.numpy())
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(x_ref.shape, generator=g)
        x_ref = ref.step(v, t, x_ref).prev_sample
        x = sampler.step(i, x, mx.array(v.numpy()))
    # Same float32 operations in the same order: equal up to at most a rounding or two.
    np.testing.assert_allclose(np.array(x), x_ref.numpy(), rtol=0, atol=1e-6)


def _velocity(x, sigma):
    """A fake model: smooth, nonlinear in x and dependent on sigma, so every term of DPM++ matters."""
    return np.tanh(x) * (1.0 + sigma) - 0.5 * sigma * x + 0.1


def _kdiffusion_dpmpp_2m(x, sigmas):
    """Straight float64 transcription of k-diffusion / sd3_impls sample_dpmpp_2m with D = x - sigma * v."""
    sigmas = sigmas.astype(np.float64)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = x - sigmas[i] * _velocity(x, sigmas[i])
        t = -np.log(sigmas[i])
        t_next = -np.log(sigmas[i + 1]) if sigmas[i + 1] > 0 else np.inf
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (np.exp(-t_next) / np.exp(-t)) * x - np.expm1(-h) * denoised
        else:
            h_last = t - (-np.log(sigmas[i - 1]))
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (np.exp(-t_next) / np.exp(-t)) * x - np.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


@pytest.mark.parametrize("n, start", [(1, 0), (2, 0), (5, 0), (28, 0), (28, 11)])
def test_dpmpp_2m_matches_kdiffusion(n, start):
    sigmas = FlowMatchSchedule(shift=3.0).sigmas(n)
    x0 = np.random.default_rng(0).standard_normal((2, 6, 5, 16)).astype(np.float32)
    # img2img starts part-way: the reference then runs on the sliced schedule.
    expected = _kdiffusion_dpmpp_2m(x0.astype(np.float64), sigmas[start:])
    sampler = make_sampler("dpmpp_2m", sigmas)
    x = mx.array(x0)
    for i in range(start, n):
        x = sampler.step(i, x, mx.array(_velocity(np.array(x), float(sigmas[i])).astype(np.float32)))
    # float32 against float64 over up to 28 steps: rounding stays ~1e-6 of the O(1) values.
    np.testing.assert_allclose(np.array(x), expected, rtol=0, atol=2e-5)


def test_dpmpp_2m_last_step_returns_the_denoised_estimate():
    sampler = make_sampler("dpmpp_2m", np.array([1.0, 0.5, 0.0], np.float32))
    x, v = mx.array([1.0, 2.0]), mx.array([0.5, -1.0])
    sampler.step(0, x, v)
    np.testing.assert_allclose(np.array(sampler.step(1, x, v)), np.array(x - 0.5 * v), atol=1e-7)


def test_unknown_sampler_lists_valid_names():
    assert SAMPLERS[:3] == ("euler", "euler_ancestral", "heun") and "uni_pc" in SAMPLERS
    with pytest.raises(ValueError, match="euler, euler_ancestral, heun, .*, uni_pc"):
        make_sampler("euler_a", FlowMatchSchedule().sigmas(4))


@pytest.mark.parametrize("n", (1, 7, 10, 28, 40, 50))
@pytest.mark.parametrize("strength", (0.05, 0.3, 0.6, 0.75, 1.0))
def test_img2img_start_and_noising_match_diffusers(n, strength):
    scheduler = _diffusers_scheduler(3.0, n)
    pipe = SimpleNamespace(scheduler=scheduler)  # get_timesteps only touches the scheduler
    timesteps, steps_left = StableDiffusion3Img2ImgPipeline.get_timesteps(pipe, n, strength, "cpu")
    start = img2img_start_index(n, strength)
    assert start == n - steps_left
    np.testing.assert_array_equal(FlowMatchSchedule().timesteps(n)[start:], timesteps.numpy())

    g = torch.Generator().manual_seed(1)
    z, noise = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 16, 4, 6, generator=g)
    ref = scheduler.scale_noise(z, timesteps[:1].repeat(2), noise)  # uses the begin index set above
    sigma = float(FlowMatchSchedule().sigmas(n)[start])
    ours = scale_noise(mx.array(z.numpy()), mx.array(noise.numpy()), sigma)
    np.testing.assert_allclose(np.array(ours), ref.numpy(), rtol=0, atol=1e-6)


def test_img2img_start_uses_diffusers_float_arithmetic():
    assert img2img_start_index(28, 0.6) == 11  # int(28 - 16.8), not 28 - int(16.8) = 12
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            img2img_start_index(28, bad)
