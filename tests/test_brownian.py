"""The SDE samplers' Brownian-tree noise (sampling/brownian.py) against torchsde's BrownianTree and ComfyUI's
BrownianTreeNoiseSampler (tests/comfy_reference.py), queried as the samplers query them."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchsde

import tests.comfy_reference as ref
from sd35m_mlx.sampling.brownian import CACHE_SIZE, BrownianNoise, BrownianTree, sde_sigma_bounds
from sd35m_mlx.sampling.samplers.dpmpp import _midpoint_f32
from sd35m_mlx.sampling.schedule import FlowMatchSchedule
from sd35m_mlx.sampling.schedulers import scheduler_sigmas

F32 = np.float32
# (seed, shape): seeds past 32 and 64 bits, a latent, an odd 4-D shape, a vector
CASES = [(0, (1, 16, 8, 12)), (7, (2, 3, 5, 7)), (2**32 + 1, (17,)), (2**64 - 1, (1, 16, 8, 12))]


def _schedules():
    normal = FlowMatchSchedule(shift=3.0).sigmas
    karras = [scheduler_sigmas("karras", n, shift=3.0) for n in (9, 30)]
    return [normal(2), normal(4), normal(28), *karras]


def _sampler_queries(sigmas):
    """(sigma, sigma_next) pairs in the order the SDE samplers ask: dpmpp_sde's midpoint then its full step,
    the first sigma moved off 1.0 as ComfyUI moves it (shift 3)."""
    sigmas = np.array(sigmas, F32)
    if sigmas[0] >= 1:
        sigmas[0] = 3 * (1 - 1e-4) / (1 + 2 * (1 - 1e-4))
    pairs = []
    for s, s_next in zip(sigmas[:-2], sigmas[1:-1], strict=True):
        pairs += [(s, F32(_midpoint_f32(s, s_next, 0.5))), (s, s_next)]
    return pairs


def _torch_tree(shape, t0, t1, seed):
    return torchsde.BrownianTree(
        torch.tensor(t0, dtype=torch.float32), torch.zeros(shape), torch.tensor(t1), entropy=seed
    )


@pytest.mark.parametrize("seed, shape", CASES)
def test_tree_equals_torchsde_bit_for_bit(seed, shape):
    """Every increment the samplers ask for, in their order, then in reverse and at random: the same float32
    values (torchsde draws with torch's CPU generator, ours with the "cpu" source; the bridge's float32
    operations are the same). A wrong seed, spawn key, rounding or split point changes every value."""
    rng = np.random.default_rng(seed % 2**32)
    for sigmas in _schedules():
        lo, hi = sde_sigma_bounds(sigmas)
        queries = [(b, a) for a, b in _sampler_queries(sigmas)]  # as (ta, tb), ta <= tb
        queries += queries[::-1] + [tuple(sorted(rng.uniform(lo, hi, 2).astype(F32))) for _ in range(5)]
        theirs, ours = _torch_tree(shape, lo, hi, seed), BrownianTree(shape, lo, hi, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchsde warns where it clamps sigma_min up to its 6-decimal t0
            for ta, tb in queries:
                expected = theirs(torch.tensor(ta), torch.tensor(tb)).numpy()
                np.testing.assert_array_equal(ours(ta, tb), expected, err_msg=f"W({ta}, {tb})")


def test_tree_values_do_not_depend_on_the_cache():
    """The cache only saves work: a tree that forgets everything gives the same increments."""
    sigmas = scheduler_sigmas("karras", 40, shift=3.0)
    lo, hi = sde_sigma_bounds(sigmas)
    kept, fresh = BrownianTree((2, 3), lo, hi, 5), None
    for s, s_next in _sampler_queries(sigmas):
        fresh = BrownianTree((2, 3), lo, hi, 5)
        np.testing.assert_array_equal(kept(s_next, s), fresh(s_next, s))
    assert len(kept._cache) == CACHE_SIZE  # a small latent: the most the cache holds


@pytest.mark.parametrize("seed", [3, [11, 2**40]])
def test_noise_equals_comfyuis_brownian_tree_noise_sampler(seed):
    """BrownianNoise (NHWC) against ComfyUI's BrownianTreeNoiseSampler (NCHW): one seed, one tree over the
    batch; a list of seeds, one tree per image. The increments are equal; the normalized noise within two
    float32 ulps: torch's float32 sqrt of |sigma_next - sigma| (MKL's on x86) is 1 ulp off IEEE's in ~20% of
    cases, ours is IEEE's."""
    sigmas = FlowMatchSchedule(shift=3.0).sigmas(12)
    x = torch.zeros(2, 16, 4, 6)
    theirs = ref.brownian_noise_sampler(x, torch.from_numpy(sigmas), seed)
    ours = BrownianNoise((2, 4, 6, 16), *sde_sigma_bounds(sigmas), seed)
    for s, s_next in _sampler_queries(sigmas):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the last sigma_next is below t0 = sigma_min rounded up: clamped
            expected = theirs(torch.tensor(s), torch.tensor(s_next)).numpy()
        got = np.array(ours(float(s), float(s_next)))
        np.testing.assert_allclose(got.transpose(0, 3, 1, 2), expected, rtol=2.5e-7, atol=0)
        assert abs(expected.std() - 1) < 0.1  # normalized: a standard normal draw


def test_bad_queries_and_seeds_are_one_line_errors():
    tree = BrownianTree((3,), 0.1, 0.9, 1)
    with pytest.raises(ValueError, match="ta <= tb"):
        tree(0.5, 0.2)
    with pytest.raises(ValueError, match="t0 <= t1"):
        BrownianTree((3,), 0.9, 0.1, 1)
    with pytest.raises(ValueError, match="seed"):
        BrownianTree((3,), 0.1, 0.9, -1)
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        BrownianNoise((3, 2, 2, 16), 0.1, 0.9, [1, 2])
    np.testing.assert_array_equal(tree(0.4, 0.4), np.zeros(3, F32))


def test_pipeline_draws_sde_noise_from_the_tree_except_for_mlx():
    """rng "cpu" and "nv": the seed's tree (one per seed of a list); "mlx" keeps the per-call draws of before,
    so its PNGs replay."""
    from sd35m_mlx.pipeline.steps import sampler_brownian

    assert sampler_brownian(5, "mlx") is None
    noise = sampler_brownian(5, "cpu")((1, 4, 6, 16), 0.03, 1.0)
    assert [t.seed for t in noise.trees] == [5] and noise.trees[0].rng == "cpu"
    noise = sampler_brownian([5, 6], "nv")((2, 4, 6, 16), 0.03, 1.0)
    assert [(t.seed, t.shape, t.rng) for t in noise.trees] == [(5, (1, 16, 4, 6), "nv"), (6, (1, 16, 4, 6), "nv")]
