"""Seeds, noise sources and schedulers through `generate` against diffusers' StableDiffusion3Pipeline on the
tiny fixture: a seed with rng="cpu" is diffusers' `torch.Generator().manual_seed(seed)` picture, and every
scheduler (x euler) equals diffusers' Euler over the same sigmas."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from parity import assert_close

from sd35m_mlx.sampling.schedulers import SCHEDULERS, scheduler_sigmas

PIXEL_TOL = 2e-3  # as tests/test_pipeline.py: half a uint8 level
H, W = 64, 96
KW = dict(height=H, width=W, num_inference_steps=4, guidance_scale=4.5, negative_prompt="blurry", output_type="np")


@pytest.fixture(scope="module")
def ref(tiny_pipeline):
    return StableDiffusion3Pipeline.from_pretrained(tiny_pipeline, dtype=torch.float32)


def _compare(out, expected):
    assert_close(out, expected, atol=PIXEL_TOL, min_std=0.02, what="pixels")


def test_seed_batch_of_two_is_diffusers_cpu_generator(ours, ref):
    """One seed for a batch: one draw of the whole (2, 16, h, w) batch from one generator, as diffusers."""
    out = ours.generate("a cat", seed=1234, num_images_per_prompt=2, rng="cpu", **KW)
    expected = ref("a cat", generator=torch.Generator().manual_seed(1234), num_images_per_prompt=2, **KW).images
    _compare(out, expected)
    assert np.abs(out[0] - out[1]).max() > 1e-2


def test_list_of_seeds_is_diffusers_list_of_generators(ours, ref):
    seeds = [5, 2**40 + 7]
    out = ours.generate("a cat", seed=seeds, num_images_per_prompt=2, **KW)  # rng="cpu" is the default
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    expected = ref("a cat", generator=generators, num_images_per_prompt=2, **KW).images
    _compare(out, expected)
    alone = ours.generate("a cat", seed=seeds[1], **KW)  # each image drawn alone: the second is seed 2**40+7's
    np.testing.assert_allclose(out[1], alone[0], atol=1e-5)


def test_rng_mlx_is_the_old_noise(ours):
    """rng="mlx" replays the images made before the noise sources: mx.random.normal(NHWC, key=key(seed))."""
    old = mx.random.normal((1, H // 8, W // 8, 16), key=mx.random.key(77)).astype(mx.float32)
    out = ours.generate("a cat", seed=77, rng="mlx", **KW)
    np.testing.assert_array_equal(out, ours.generate("a cat", latents=old, **KW))
    assert np.abs(out - ours.generate("a cat", seed=77, rng="cpu", **KW)).max() > 1e-2


@pytest.mark.parametrize("shift", [3.0, 1.7])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_scheduler_with_euler_matches_diffusers_over_those_sigmas(ours, ref, scheduler, shift):
    """diffusers' FlowMatchEulerDiscreteScheduler takes `sigmas=` and shifts them by its config shift: with
    shift 1 it runs ours as they are (it appends the final 0)."""
    steps = 5
    sigmas = scheduler_sigmas(scheduler, steps, shift)
    assert sigmas[-1] == 0
    kw = {**KW, "num_inference_steps": steps}
    out = ours.generate("a red fox", seed=3, scheduler=scheduler, shift=shift, **kw)
    original = ref.scheduler
    ref.scheduler = FlowMatchEulerDiscreteScheduler.from_config(original.config, shift=1.0)
    try:
        del kw["num_inference_steps"]
        expected = ref("a red fox", generator=torch.Generator().manual_seed(3), sigmas=list(sigmas[:-1]), **kw).images
        np.testing.assert_array_equal(ref.scheduler.sigmas.numpy(), sigmas)
    finally:
        ref.scheduler = original
    _compare(out, expected)


def test_normal_scheduler_at_the_model_shift_is_the_default(ours):
    a = ours.generate("a red fox", seed=3, **KW)
    b = ours.generate("a red fox", seed=3, scheduler="normal", shift=3.0, **KW)
    np.testing.assert_array_equal(a, b)
    c = ours.generate("a red fox", seed=3, scheduler="karras", **KW)
    assert np.abs(a - c).max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scheduler="foo"), "unknown scheduler 'foo'; choose one of normal, simple"),
        (dict(rng="gpu"), "unknown rng 'gpu'; choose one of cpu, nv, mlx"),
        (dict(sampler="euler_a"), "unknown sampler 'euler_a'; choose one of euler, euler_ancestral"),
        (dict(shift=0.0), "shift must be in (0"),
        (dict(shift=float("nan")), "shift must be in (0"),
        (dict(seed=2**64), "seed must be between 0 and"),
        (dict(seed=-1), "seed must be at least 0"),
        (dict(seed=[1, 2, 3], num_images_per_prompt=2), "seed has 3 entries; a list needs one seed per image (2)"),
        (dict(seed=[1, -2]), "seed entries must be at least 0"),
    ],
)
def test_bad_sampling_arguments_are_one_line_value_errors(ours, kwargs, message):
    kw = {"seed": 1, "num_images_per_prompt": 2, **kwargs}
    with pytest.raises(ValueError) as e:
        ours.generate("a cat", height=H, width=W, num_inference_steps=1, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("scheduler, steps", [("karras", 5), ("ddim_uniform", 7)])  # ddim_uniform: 8 sigmas for 7
def test_img2img_with_a_scheduler_starts_where_diffusers_does(ours, tiny_pipeline, monkeypatch, scheduler, steps):
    """diffusers' img2img takes `strength` over the length of the schedule it is given (retrieve_timesteps
    returns len(sigmas) steps): so do we, also where a scheduler gives another count than the steps asked."""
    from diffusers import StableDiffusion3Img2ImgPipeline
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_img2img as img2img
    from PIL import Image

    init = Image.fromarray(np.random.default_rng(4).integers(0, 256, (H, W, 3), dtype=np.uint8))
    noise = np.random.default_rng(5).standard_normal((1, H // 8, W // 8, 16), dtype=np.float32)
    nchw = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous()
    monkeypatch.setattr(img2img, "randn_tensor", lambda shape, **_: nchw)  # our noise, the posterior mean (as
    real = img2img.retrieve_latents  # tests/test_pipeline.py's img2img test)
    monkeypatch.setattr(
        img2img, "retrieve_latents", lambda out, generator=None, sample_mode="sample": real(out, sample_mode="argmax")
    )
    sigmas = scheduler_sigmas(scheduler, steps, 3.0)
    kw = {**KW, "strength": 0.6}
    del kw["num_inference_steps"]
    out = ours.generate(
        "an oil painting", image=init, latents=noise, scheduler=scheduler, num_inference_steps=steps, **kw
    )
    ref = StableDiffusion3Img2ImgPipeline.from_pretrained(tiny_pipeline, dtype=torch.float32)
    ref.scheduler = FlowMatchEulerDiscreteScheduler.from_config(ref.scheduler.config, shift=1.0)
    expected = ref("an oil painting", image=init, sigmas=list(sigmas[:-1]), **kw).images
    _compare(out, expected)
