"""Every sampler against a torch reference written from ComfyUI's source (tests/comfy_reference.py), driven by
the same denoiser and the same injected noise on both sides: an analytic denoiser for every sampler x several
step counts (and an img2img start), the tiny SD3.5 transformer through diffusers for a few; ControlNet and
inpainting on a sampler's extra model evaluations against diffusers' FlowMatchHeun pipelines."""

import os
import sys
import types
import warnings
from functools import partial

import mlx.core as mx
import numpy as np
import pytest
import torch

import tests.comfy_reference as ref
from sd35m_mlx.sampling.brownian import BrownianNoise
from sd35m_mlx.sampling.loop import denoise
from sd35m_mlx.sampling.samplers import SAMPLERS, make_sampler, sampler_class, sampler_schedule
from sd35m_mlx.sampling.schedule import FlowMatchSchedule

SHIFT = 3.0
NOISE_SAMPLERS = {n for n in SAMPLERS if sampler_class(n).needs_noise}
SDE_SAMPLERS = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")  # ComfyUI draws their noise from a Brownian tree


def _velocity_np(x, sigma):
    """A fake model: smooth, nonlinear in x and dependent on sigma, so every term of every sampler matters."""
    return np.tanh(x) * (1.0 + sigma) - 0.5 * sigma * x + 0.1


def _denoised_torch(x, sigma):
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(())
    return x - sigma * (torch.tanh(x) * (1.0 + sigma) - 0.5 * sigma * x + 0.1)


class _Injected:
    """The same noise tensors for both sides, one per draw, in order."""

    def __init__(self, pool):
        self.pool, self.used = pool, 0

    def mlx(self, shape):
        a = self.pool[self.used]
        assert a.shape == tuple(shape)
        self.used += 1
        return mx.array(a)

    def torch(self, sigma, sigma_next):
        a = self.pool[self.used]
        self.used += 1
        return torch.from_numpy(a)


def _sigmas(name, steps, shift=SHIFT):
    return sampler_schedule(name, FlowMatchSchedule(shift=shift).sigmas, steps)


def _run_ours(name, sigmas, x, start, pool, shift=SHIFT):
    """Ours through the real loop, with an analytic velocity that also counts model calls."""
    calls = []

    def velocity(i, x, sigma=None):
        calls.append((i, sigma))
        return mx.array(_velocity_np(np.array(x), np.float32(sigma)).astype(np.float32))

    noise = _Injected(pool)
    sampler = make_sampler(name, sigmas, noise.mlx if name in NOISE_SAMPLERS else None, shift=shift)
    out = np.array(denoise(mx.array(x), start, sampler, velocity))
    return out, calls, noise.used, sampler


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps, start", [(1, 0), (2, 0), (3, 0), (5, 0), (12, 0), (28, 0), (12, 5)])
def test_sampler_matches_comfyui_reference_on_an_analytic_model(name, steps, start):
    sigmas = _sigmas(name, steps)
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0
    rng = np.random.default_rng(steps)
    x = rng.standard_normal((2, 5, 4, 3), dtype=np.float32)
    pool = [rng.standard_normal(x.shape, dtype=np.float32) for _ in range(2 * steps + 2)]
    ours, calls, used, _ = _run_ours(name, sigmas, x, start, pool)
    # img2img: ComfyUI runs the sliced schedule (its denoise < 1); ours starts at index `start` of the whole one
    noise = _Injected(pool)
    expected = ref.run(name, _denoised_torch, torch.from_numpy(x), torch.from_numpy(sigmas[start:]), noise.torch, SHIFT)
    assert used == noise.used, "both sides must draw the same number of noise tensors"
    exact = ref.run(
        name,
        _denoised_torch,
        torch.from_numpy(x).double(),
        torch.from_numpy(sigmas[start:]).double(),
        _Injected([p.astype(np.float64) for p in pool]).torch,
        SHIFT,
    ).numpy()
    # Our step coefficients are computed in float64, ComfyUI's in float32: where its own rounding moves the
    # result (e.g. dpmpp_sde's first steps at sigma ~0.9999, uni_pc's std at sigma 0.001: up to 2.4e-4) we may
    # differ from it by as much; elsewhere a few float32 roundings per step of O(1) values (2e-5).
    tol = 2e-5 + 1.5 * np.abs(expected.numpy() - exact).max()
    np.testing.assert_allclose(ours, expected.numpy(), rtol=0, atol=tol)
    np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-4)
    assert np.isfinite(ours).all()


@pytest.mark.parametrize("name", SDE_SAMPLERS)
@pytest.mark.parametrize("steps, start, seed", [(2, 0, 1), (5, 0, 2**40), (12, 0, 0), (12, 5, 9), (28, 0, 3)])
def test_sde_sampler_with_brownian_noise_matches_comfyui_reference(name, steps, start, seed):
    """The SDE samplers given brownian= against ComfyUI's functions with the noise sampler they make for
    themselves (torchsde's tree over the run's sigmas: an img2img start bounds it by the sliced schedule).
    The tolerance as above; a tree over the wrong sigmas, or per-call noise, moves the result by O(1)."""
    sigmas = _sigmas(name, steps)
    x = np.random.default_rng(steps).standard_normal((2, 5, 4, 3), dtype=np.float32)  # NHWC for ours
    out = np.array(
        denoise(
            mx.array(x),
            start,
            make_sampler(name, sigmas, _Injected([]).mlx, shift=SHIFT, brownian=partial(BrownianNoise, seed=seed)),
            lambda i, x, sigma=None: mx.array(_velocity_np(np.array(x), np.float32(sigma)).astype(np.float32)),
        )
    )
    x_nchw, sliced = torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(sigmas[start:])
    noise_sampler = ref.brownian_noise_sampler(x_nchw, sliced, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde clamps the last sigma up to its tree's 6-decimal t0
        expected = ref.run(name, _denoised_torch, x_nchw, sliced, noise_sampler, SHIFT).permute(0, 2, 3, 1).numpy()
    # float32 against float64 step coefficients, as above: dpmpp_sde's first steps at sigma ~0.9999 up to 1.5e-4
    np.testing.assert_allclose(out, expected, rtol=0, atol=3e-4)


# -- the tiny SD3.5 transformer: ours.generate against the reference driven by diffusers' transformer --------

H, W = 64, 96  # latents 8 x 12
PIXEL_TOL = 2e-3  # float32 both sides: half a uint8 level; a wrong sigma, timestep or noise draw moves pixels > 1e-2
PROMPT, NEGATIVE, GUIDANCE = "a capybara holding a sign", "blurry", 4.5


@pytest.fixture(scope="module")
def ours(tiny_pipeline):
    from sd35m_mlx import StableDiffusion35

    return StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32")


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_pipeline):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_pipeline, dtype=torch.float32)


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()


def _diffusers_denoiser(pipe, guidance=GUIDANCE):
    """x0 = x - sigma * v with diffusers' transformer, CFG on v, timestep sigma * 1000 in float32."""
    with torch.no_grad():
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            PROMPT, None, None, negative_prompt=NEGATIVE, do_classifier_free_guidance=True
        )
    context, pooled_all = torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled])

    def model(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(())
        with torch.no_grad():
            v = pipe.transformer(
                hidden_states=torch.cat([x, x]),
                timestep=(sigma * 1000).expand(2),
                encoder_hidden_states=context,
                pooled_projections=pooled_all,
                return_dict=False,
            )[0]
        v_uncond, v_cond = v.chunk(2)
        return x - sigma * (v_uncond + guidance * (v_cond - v_uncond))

    return model


def _diffusers_decode(pipe, latents):
    with torch.no_grad():
        z = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(z, return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", SAMPLERS)
def test_generate_matches_comfyui_sampler_on_the_tiny_model(ours, diffusers_pipe, monkeypatch, name):
    """generate(sampler=...) end to end (the schedule ComfyUI's KSampler builds, every extra evaluation's
    timestep and modulations, the per-step noise) against the reference on diffusers' transformer and VAE.
    The SDE samplers draw from the seed's Brownian tree on both sides (rng="cpu", torchsde's on theirs)."""
    from sd35m_mlx.pipeline import stable_diffusion as pipeline_module

    steps, seed = 4, 2**33 + 5
    rng = np.random.default_rng(7)
    noise = rng.standard_normal((1, H // 8, W // 8, 16), dtype=np.float32)
    pool = [rng.standard_normal(noise.shape, dtype=np.float32) for _ in range(2 * steps)]
    injected = _Injected(pool)
    monkeypatch.setattr(pipeline_module, "sampler_noise", lambda seed, rng: injected.mlx)
    out = ours.generate(
        PROMPT,
        negative_prompt=NEGATIVE,
        latents=noise,
        height=H,
        width=W,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        sampler=name,
        seed=seed,
        rng="cpu",
        output_type="np",
    )
    sigmas = ref.schedule(FlowMatchSchedule(shift=SHIFT).sigmas, name, steps)
    theirs = _Injected([_nchw(p).numpy() for p in pool])
    noise_sampler = theirs.torch
    if name in SDE_SAMPLERS:
        noise_sampler = ref.brownian_noise_sampler(_nchw(noise), sigmas, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde clamps the last sigma up to its tree's 6-decimal t0
        latents = ref.run(name, _diffusers_denoiser(diffusers_pipe), _nchw(noise), sigmas, noise_sampler, SHIFT)
    expected = _diffusers_decode(diffusers_pipe, latents)
    assert injected.used == theirs.used
    assert expected.std() > 0.02
    err = np.abs(out - expected).max()
    assert err <= PIXEL_TOL, f"max abs pixel difference {err:.2e} > {PIXEL_TOL}"


# -- extra evaluations with ControlNet and inpainting, against diffusers' own FlowMatchHeun pipelines --------
# diffusers' FlowMatchHeunDiscreteScheduler is ComfyUI's heun on this schedule (the same 2N - 1 model calls);
# its pipelines call the ControlNet at every evaluation's timestep and re-impose the inpainting known region
# after the first-order half-step too, which is what our loop's extra evaluations must reproduce.


def _heun(pipe):
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def test_heun_matches_diffusers_flowmatch_heun_pipeline(ours, tiny_pipeline):
    from diffusers import StableDiffusion3Pipeline

    pipe = _heun(StableDiffusion3Pipeline.from_pretrained(tiny_pipeline, dtype=torch.float32))
    noise = np.random.default_rng(3).standard_normal((1, H // 8, W // 8, 16), dtype=np.float32)
    kw = dict(negative_prompt=NEGATIVE, height=H, width=W, num_inference_steps=4, guidance_scale=GUIDANCE)
    out = ours.generate(PROMPT, latents=noise, sampler="heun", output_type="np", **kw)
    expected = pipe(PROMPT, latents=_nchw(noise), output_type="np", **kw).images
    euler = ours.generate(PROMPT, latents=noise, sampler="euler", output_type="np", **kw)
    assert np.abs(out - expected).max() <= PIXEL_TOL
    assert np.abs(out - euler).max() > 1e-2, "heun must differ from euler"


@pytest.fixture(scope="module")
def controlnet_folder(tmp_path_factory):
    from scripts.build_fixture import build_controlnet

    return build_controlnet(tmp_path_factory.mktemp("controlnets") / "sd35m", seed=1, style="sd35m")


def test_controlnet_acts_on_heuns_second_evaluation_as_diffusers(ours, tiny_pipeline, controlnet_folder, monkeypatch):
    """The second evaluation of each heun step (at sigma_next) gets the ControlNet residuals at its own
    timestep: without them, or at the step's timestep, the pixels move by more than the tolerance."""
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline
    from diffusers.models.autoencoders import vae as diffusers_vae

    from sd35m_mlx.loading.controlnet import load_controlnet
    from tests.test_controlnet import _control

    monkeypatch.setattr(diffusers_vae.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    pipe = _heun(
        StableDiffusion3ControlNetPipeline.from_pretrained(
            tiny_pipeline, controlnet=SD3ControlNetModel.from_pretrained(controlnet_folder), dtype=torch.float32
        )
    )
    ours.controlnets = [load_controlnet(controlnet_folder, mx.float32)]
    try:
        noise = np.random.default_rng(4).standard_normal((1, H // 8, W // 8, 16), dtype=np.float32)
        kw = dict(height=H, width=W, num_inference_steps=4, guidance_scale=GUIDANCE, output_type="np")
        kw |= dict(control_image=_control(1), controlnet_conditioning_scale=0.8)
        out = ours.generate("a house by a lake", latents=noise, sampler="heun", **kw)
        expected = pipe("a house by a lake", latents=_nchw(noise), **kw).images
    finally:
        ours.controlnets = []
    assert expected.std() > 0.02
    err = np.abs(out - expected).max()
    assert err <= PIXEL_TOL, f"max abs pixel difference {err:.2e} > {PIXEL_TOL}"


def test_inpainting_known_region_reaches_heuns_second_evaluation_as_diffusers(ours, tiny_pipeline, monkeypatch):
    """The second evaluation of each heun step sees the known region noised to sigma_next (diffusers blends
    after the first-order half-step); the latents after the last step keep the clean image latents there."""
    from diffusers import StableDiffusion3InpaintPipeline
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_inpaint as diffusers_inpaint

    from tests.test_inpaint import _image, _soft_mask

    pipe = _heun(StableDiffusion3InpaintPipeline.from_pretrained(tiny_pipeline, dtype=torch.float32))
    noise = np.random.default_rng(5).standard_normal((1, H // 8, W // 8, 16), dtype=np.float32)
    monkeypatch.setattr(diffusers_inpaint, "randn_tensor", lambda shape, **_: _nchw(noise))
    real = diffusers_inpaint.retrieve_latents
    monkeypatch.setattr(
        diffusers_inpaint,
        "retrieve_latents",
        lambda out, generator=None, sample_mode="sample": real(out, sample_mode="argmax"),
    )
    image, mask = _image(), _soft_mask()
    kw = dict(height=H, width=W, num_inference_steps=4, guidance_scale=GUIDANCE, strength=1.0, output_type="latent")
    lat = np.asarray(ours.generate("a bowl", image=image, mask_image=mask, latents=noise, sampler="heun", **kw))
    expected = pipe("a bowl", image=image, mask_image=mask, **kw).images.permute(0, 2, 3, 1).numpy()
    # latents (std ~1): float rounding carried through 7 model calls, as tests/test_inpaint.py
    err = np.abs(lat - expected).max()
    assert err <= 1e-4, f"max abs latent difference {err:.2e} > 1e-4"


# -- the protocol: schedules, model calls, the sigmas announced ahead, bad input -----------------------------

TWO_CALLS = {"heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"}


@pytest.mark.parametrize("name", SAMPLERS)
def test_model_calls_and_announced_sigmas(name):
    """Second-order single-step samplers call the model twice per step except the last (to sigma 0); every
    sigma the run evaluates is in `model_sigmas`, so the pipeline can compute its modulations up front."""
    steps, start = 6, 2
    sigmas = _sigmas(name, steps)
    x = np.random.default_rng(0).standard_normal((1, 2, 2, 3), dtype=np.float32)
    pool = [np.random.default_rng(k).standard_normal(x.shape, dtype=np.float32) for k in range(2 * steps)]
    _, calls, _, sampler = _run_ours(name, sigmas, x, start, pool)
    run = steps - start
    assert len(calls) == (2 * run - 1 if name in TWO_CALLS else run)
    assert [i for i, _ in calls] == sorted(i for i, _ in calls)  # step indices in order
    announced = {float(np.float32(s)) for s in sampler.model_sigmas(start)}
    assert {float(np.float32(s)) for _, s in calls} <= announced


def test_schedules_as_comfyui_builds_them():
    sigmas_for = FlowMatchSchedule(shift=SHIFT).sigmas
    np.testing.assert_array_equal(sampler_schedule("euler", sigmas_for, 5), sigmas_for(5))
    six = sigmas_for(6)
    np.testing.assert_array_equal(sampler_schedule("dpm_2", sigmas_for, 5), np.concatenate([six[:-2], [0.0]]))
    for name in SAMPLERS:
        assert sampler_class(name).discard_penultimate_sigma == (name in ref.DISCARD_PENULTIMATE)


def test_noise_is_required_where_drawn_and_names_are_checked():
    sigmas = FlowMatchSchedule().sigmas(4)
    assert NOISE_SAMPLERS == {
        "euler_ancestral",
        "dpm_2_ancestral",
        "dpmpp_2s_ancestral",
        "dpmpp_sde",
        "dpmpp_2m_sde",
        "dpmpp_3m_sde",
        "lcm",
    }
    with pytest.raises(ValueError, match="draws fresh noise every step"):
        make_sampler("euler_ancestral", sigmas)
    with pytest.raises(ValueError, match=r"unknown sampler 'k_euler'; choose one of euler, euler_ancestral"):
        make_sampler("k_euler", sigmas)


def test_low_memory_precomputes_the_midpoints_before_releasing_the_weights(tiny_pipeline, ours):
    """low_memory drops the adaLN weights once the modulations exist: dpm_2's midpoints must be among them."""
    from sd35m_mlx import StableDiffusion35

    staged = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32", low_memory=True)
    kw = dict(height=H, width=W, num_inference_steps=3, seed=5, output_type="np", sampler="dpm_2")
    assert np.array_equal(staged.generate("a capybara", **kw), ours.generate("a capybara", **kw))


def test_cfg_split_gets_its_half_of_an_off_schedule_sigmas_modulations(tiny_pipeline):
    """The CFG split's rank keeps its half of the batch's modulations for a sampler's midpoints too."""
    from types import SimpleNamespace

    from mlx.utils import tree_flatten

    from sd35m_mlx.distributed.cfg_split import CfgSplitDenoiser
    from sd35m_mlx.loading.transformer import load_transformer
    from sd35m_mlx.sampling.guidance import GuidanceConfig, GuidedDenoiser

    transformer = load_transformer(tiny_pipeline / "transformer", mx.float32)
    cfg = transformer.config
    rng = np.random.default_rng(0)
    context = mx.array(rng.standard_normal((2, 5, cfg.joint_attention_dim), dtype=np.float32))
    pooled = mx.array(rng.standard_normal((2, cfg.pooled_projection_dim), dtype=np.float32))
    args = (transformer, context, pooled, [1000.0, 600.0], GuidanceConfig(scale=4.5), 0, mx.float32)
    whole = GuidedDenoiser(*args)
    for rank, half in ((0, slice(0, 1)), (1, slice(1, 2))):
        split = CfgSplitDenoiser(*args, ranks=SimpleNamespace(size=2, rank=rank))
        for sigma in (0.6, 0.77):  # on the schedule, and a midpoint
            got, want = tree_flatten(split._mods(0, sigma)), tree_flatten(whole._mods(0, sigma))
            assert len(got) == len(want)
            for (_, g), (_, w) in zip(got, want, strict=True):
                np.testing.assert_array_equal(np.array(g), np.array(w[half]))


@pytest.mark.skipif(not os.environ.get("SD35M_COMFYUI"), reason="set SD35M_COMFYUI to a ComfyUI checkout")
@pytest.mark.parametrize("name", SAMPLERS)
def test_reference_equals_comfyuis_own_functions(name):
    """tests/comfy_reference.py against ComfyUI's own sampler functions (not on the package index; point
    SD35M_COMFYUI at a checkout, e.g. commit a125cd84). Its heavy imports are stubbed: the functions run with
    injected noise, so torchsde's Brownian tree and scipy's quadrature (lms only) are never reached."""
    stubs = ["scipy", "scipy.integrate", "torchsde", "comfy.model_patcher", "comfy.ldm", "comfy.ldm.modules"]
    stubs += ["comfy.ldm.modules.diffusionmodules", "comfy.ldm.modules.diffusionmodules.util"]
    for stub in stubs:
        sys.modules.setdefault(stub, types.ModuleType(stub))
    sys.modules["comfy.ldm.modules.diffusionmodules.util"].make_beta_schedule = None
    sys.path.insert(0, os.environ["SD35M_COMFYUI"])
    import comfy.model_sampling as model_sampling
    from comfy.extra_samplers import uni_pc
    from comfy.k_diffusion import sampling

    class Flow(model_sampling.ModelSamplingDiscreteFlow, model_sampling.CONST):
        pass

    flow = Flow()
    flow.set_parameters(shift=SHIFT)
    wrapped = types.SimpleNamespace(model_sampling=flow)

    class Model:  # what KSAMPLER hands the sampler functions, as far as they look
        inner_model = types.SimpleNamespace(
            inner_model=wrapped, model_patcher=types.SimpleNamespace(get_model_object=lambda _: flow)
        )

        def __call__(self, x, sigma, **_):
            return _denoised_torch(x, sigma.reshape(-1)[0])

    functions = {"ddim": sampling.sample_euler, "uni_pc": uni_pc.sample_unipc, "uni_pc_bh2": uni_pc.sample_unipc_bh2}
    function = functions.get(name) or getattr(sampling, f"sample_{name}")
    for steps in (1, 2, 3, 7):
        sigmas = torch.from_numpy(_sigmas(name, steps))
        rng = np.random.default_rng(steps)
        x = torch.from_numpy(rng.standard_normal((2, 3, 4, 5), dtype=np.float32))
        pool = [rng.standard_normal(tuple(x.shape), dtype=np.float32) for _ in range(2 * steps)]
        expected = ref.run(name, _denoised_torch, x, sigmas, _Injected(pool).torch, SHIFT)
        kw = {"noise_sampler": _Injected(pool).torch} if name in NOISE_SAMPLERS | {"res_multistep"} else {}
        s = sigmas.clone()
        got = flow.inverse_noise_scaling(s[-1], function(Model(), x.clone(), s, extra_args={}, disable=True, **kw))
        # the same float32 operations, save DEIS's autograd and sums: 1.2e-6 measured at commit a125cd84
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_bench_samplers_counts_model_calls(ours):
    """benchmarks/bench_samplers.py keeps running against the pipeline (its timings mean nothing here)."""
    from benchmarks.bench_samplers import bench

    r = bench(ours, ["euler", "heun", "dpm_2"], steps=3, size=64, runs=1)
    assert [r[n]["model_calls"] for n in ("euler", "heun", "dpm_2")] == [3, 5, 5]
    assert r["euler"]["relative_to_euler"] == 1.0


def test_a_run_leaves_no_denoiser_for_the_cycle_collector(ours):
    """The denoiser (its embedded context, modulations and positions: megabytes at 1024 px) must go when a run
    ends, not when Python's cycle collector next runs: a server's active memory then wandered 11-27 MiB."""
    import gc

    from sd35m_mlx.sampling.guidance import GuidedDenoiser

    gc.collect()
    gc.disable()
    try:
        ours.generate("a cat", width=64, height=64, num_inference_steps=2, seed=1)
        assert not [o for o in gc.get_objects() if isinstance(o, GuidedDenoiser)]
    finally:
        gc.enable()
