"""ComfyUI's "ddim" inpaints as euler does, except that the model sees the known region noised with a fresh
torch.randn seeded seed + 1 (comfy/samplers.py KSAMPLER.sample, inpaint_options {"random": True}, and
KSamplerX0Inpaint at a125cd84b054a57729b5eecab930ca9408719832). The reference below is that code's loop on a
flow model (CONST noise_scaling), driven by tests/test_samplers.py's analytic denoiser plus a spatial mean, so
the repainted region sees the known one."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from sd35m_mlx.editing.inpaint import InpaintBlend
from sd35m_mlx.pipeline import steps
from sd35m_mlx.sampling.loop import denoise
from sd35m_mlx.sampling.samplers import make_sampler, sampler_class, sampler_schedule
from sd35m_mlx.sampling.schedule import FlowMatchSchedule
from tests.test_samplers import _denoised_torch, _velocity_np


def _velocity(x: np.ndarray, sigma) -> np.ndarray:
    return _velocity_np(x, sigma) + 0.5 * x.mean(axis=(1, 2), keepdims=True)


def _denoised(x: torch.Tensor, sigma) -> torch.Tensor:
    return _denoised_torch(x, sigma) - sigma * 0.5 * x.mean(dim=(1, 2), keepdim=True)


def comfy_ksampler_inpaint(sigmas, noise, latent, mask, inpaint_noise):
    """KSAMPLER.sample with sample_euler around KSamplerX0Inpaint: x starts at noise_scaling(sigmas[0]); each
    model call sees x * mask + noise_scaling(sigma, inpaint_noise, latent) * (1 - mask) and its denoised
    output is latent_image outside the mask."""
    x = sigmas[0] * noise + (1.0 - sigmas[0]) * latent
    for i in range(len(sigmas) - 1):
        s = sigmas[i]
        xin = x * mask + (s * inpaint_noise + (1.0 - s) * latent) * (1.0 - mask)
        denoised = _denoised(xin, s) * mask + latent * (1.0 - mask)
        x = x + (x - denoised) / s * (sigmas[i + 1] - s)
    return x / (1.0 - sigmas[-1])


def _ours(name, sigmas, noise, latent, mask, model_noise):
    def velocity(i, x, sigma=None):
        return mx.array(_velocity(np.array(x), np.float32(sigma)).astype(np.float32))

    x = sigmas[0] * noise + (1.0 - sigmas[0]) * latent
    blend = InpaintBlend(mx.array(latent), mx.array(noise), mx.array(mask), model_noise)
    return np.array(denoise(mx.array(x), 0, make_sampler(name, sigmas, None), velocity, [blend]))


@pytest.mark.parametrize("steps_", [1, 4, 12])
def test_ddim_inpainting_matches_comfyuis_ksampler(steps_):
    rng = np.random.default_rng(steps_)
    shape = (1, 6, 5, 3)
    noise, latent, fresh = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    mask = (rng.random((1, 6, 5, 1)) > 0.5).astype(np.float32)
    sigmas = sampler_schedule("ddim", FlowMatchSchedule(shift=3.0).sigmas, steps_)
    t = [torch.from_numpy(a) for a in (noise, latent, mask, fresh)]
    want = comfy_ksampler_inpaint(torch.from_numpy(sigmas.astype(np.float32)), *t).numpy()
    ours = _ours("ddim", sigmas, noise, latent, mask, mx.array(fresh))
    np.testing.assert_allclose(ours, want, atol=2e-5)
    if steps_ > 1:  # euler (the model sees the initial noise there) is another picture
        euler = comfy_ksampler_inpaint(torch.from_numpy(sigmas.astype(np.float32)), *t[:3], t[0]).numpy()
        assert np.abs(want - euler).max() > 1e-3
        np.testing.assert_allclose(_ours("euler", sigmas, noise, latent, mask, None), euler, atol=2e-5)


@pytest.mark.parametrize("seed", [0, 7, 2**64 - 1])
def test_inpaint_noise_is_torch_randn_of_seed_plus_one(seed):
    shape = (2, 4, 3, 16)  # NHWC; ComfyUI draws the batch in NCHW, once
    generator = torch.Generator().manual_seed((seed + 1) % 2**64)
    want = torch.randn((2, 16, 4, 3), generator=generator).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.array(steps.inpaint_noise(seed, shape, "cpu")), want)
    per_image = np.array(steps.inpaint_noise([seed, 3], shape, "cpu"))
    np.testing.assert_array_equal(per_image[1], np.array(steps.inpaint_noise(3, (1, *shape[1:]), "cpu"))[0])


def test_only_ddim_asks_for_it():
    assert sampler_class("ddim").random_inpaint_noise and not sampler_class("euler").random_inpaint_noise


def test_generate_inpaints_ddim_with_seed_plus_one(pipe, monkeypatch):
    from tests.test_inpaint import _image, _soft_mask

    kw = dict(image=_image(64, 64), mask_image=_soft_mask(64, 64), height=64, width=64, num_inference_steps=3,
              strength=1.0, seed=11, output_type="np")  # fmt: skip
    ddim = pipe.generate("a bowl", sampler="ddim", **kw)
    euler = pipe.generate("a bowl", sampler="euler", **kw)
    assert np.abs(ddim - euler).max() > 1e-3
    drawn = []

    def same_as_initial(seed, shape, rng):  # the model sees the initial noise: euler's picture
        drawn.append(seed)
        return steps.initial_noise(None, shape, seed, rng)

    monkeypatch.setattr(steps, "inpaint_noise", same_as_initial)
    np.testing.assert_array_equal(pipe.generate("a bowl", sampler="ddim", **kw), euler)
    assert drawn == [11]
    np.testing.assert_array_equal(pipe.generate("a bowl", sampler="ddim", **{**kw, "mask_image": None}),
                                  pipe.generate("a bowl", sampler="euler", **{**kw, "mask_image": None}))  # fmt: skip
