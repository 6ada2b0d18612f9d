"""Noise sources: torch's CPU generator, A1111's NV source, and the old MLX noise, each against its reference."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch

from sd35m_mlx.sampling.noise import RNG_SOURCES, NoiseGenerator, check_rng, check_seed, latent_noise, randn

SEEDS = [0, 1, 42, 2**31 - 1, 2**32 - 1, 2**32, 2**32 + 42, 2**63 + 5, 2**64 - 1]
# Below 16 values torch takes its double-precision path; 16, 17, 33 and the odd 4-D shapes cross the
# block-of-16 kernel and its tail rule; the last is a 1024 px SD3 latent.
SHAPES = [(1,), (7,), (15,), (16,), (17,), (31,), (33,), (2, 3, 5, 7), (3, 16, 13, 11), (1, 16, 128, 128)]

# torch's x86 build runs Box-Muller through avx_mathfun's log/sincos, which the "cpu" source reproduces bit
# for bit; its scalar kernel (Apple silicon, CPUs without AVX2) calls the platform libm, 2e-6 away at most
# (measured against glibc below).
_TORCH_VECTOR_KERNEL = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
_SCALAR_KERNEL_ATOL = 5e-6


def _assert_torch_equal(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    if _TORCH_VECTOR_KERNEL or ours.size < 16:  # below 16 values both sides compute in float64
        np.testing.assert_array_equal(ours, theirs)
    else:
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=_SCALAR_KERNEL_ATOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_cpu_source_equals_torch_randn(seed):
    for shape in SHAPES:
        expected = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()
        _assert_torch_equal(randn(shape, seed, rng="cpu"), expected)


@pytest.mark.parametrize("seed", [0, 2**32 + 7, 2**64 - 1])
def test_successive_draws_equal_one_torch_generator(seed):
    # Mixed sizes: torch keeps the second value of a float64 Box-Muller pair in the generator across
    # calls (even across a float32 block draw in between), and every call continues the MT19937 stream.
    shapes = [(3,), (40,), (5,), (1,), (16,), (2, 9), (1,), (1, 16, 8, 8), (1, 16, 9, 7)]
    gen = torch.Generator().manual_seed(seed)
    ours = NoiseGenerator(seed, "cpu")
    for shape in shapes:
        _assert_torch_equal(ours(shape), torch.randn(shape, generator=gen).numpy())


_SCALAR_KERNEL_SCRIPT = """
import json, sys, torch
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
out = {str(s): torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(s)).flatten().tolist()
       for s in (0, 2**32 + 1)}
json.dump(out, sys.stdout)
"""


@pytest.mark.skipif(not _TORCH_VECTOR_KERNEL, reason="torch already runs its scalar kernel here")
def test_cpu_source_is_ulp_close_to_torch_scalar_kernel():
    """What a Mac user's torch gives: the scalar kernel (forced here with ATEN_CPU_CAPABILITY=default)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    run = subprocess.run([sys.executable, "-c", _SCALAR_KERNEL_SCRIPT], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for seed, values in json.loads(run.stdout).items():
        ours = randn((1, 16, 64, 64), int(seed)).ravel()
        scalar = np.array(values, np.float32)
        assert 0 < np.abs(ours - scalar).max() <= _SCALAR_KERNEL_ATOL  # differ, but by ulps only


# --- "nv": a reference written from A1111's modules/rng_philox.py (commit ef1698fd6dbd6387341a1eeeded068ff1476ee50),
# one element at a time with Python integers.


def _philox_element(counter: list[int], key: list[int]) -> list[int]:
    m0, m1, w0, w1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
    c, k = list(counter), list(key)
    for r in range(10):
        p0, p2 = c[0] * m0, c[2] * m1
        c = [(p2 >> 32) ^ c[1] ^ k[0], p2 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k[1], p0 & 0xFFFFFFFF]
        if r < 9:
            k = [(k[0] + w0) & 0xFFFFFFFF, (k[1] + w1) & 0xFFFFFFFF]
    return c


def _a1111_nv_randn(seed: int, offset: int, n: int) -> np.ndarray:
    words = np.array([_philox_element([offset, 0, i, 0], [seed & 0xFFFFFFFF, seed >> 32])[:2] for i in range(n)])
    inv = float(np.float32(2.3283064e-10))
    inv_2pi = float(np.float32(2.3283064e-10 * 6.2831855))
    u = words[:, 0] * inv + inv / 2
    v = words[:, 1] * inv_2pi + inv_2pi / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 2**63 + 5, 2**64 - 1])
def test_nv_source_equals_a1111_philox(seed):
    gen = NoiseGenerator(seed, "nv")
    for offset, shape in enumerate([(37,), (2, 4, 3, 5), (1,)]):  # the offset counts draws, not values
        expected = _a1111_nv_randn(seed, offset, math.prod(shape)).reshape(shape)
        np.testing.assert_array_equal(gen.randn(shape), expected)


def test_nv_source_reproduces_a1111_documented_values():
    # modules/rng_philox.py's docstring prints Generator(seed=0).randn((3, 4)); its numbers are torch's on
    # CUDA, which A1111's float64 port (and so ours) matches to 2.7e-7 (at most 32 float32 ulps).
    documented = [
        [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
        [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
        [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
    ]
    np.testing.assert_allclose(randn((3, 4), 0, rng="nv"), documented, rtol=0, atol=3e-7)


# --- "mlx": the noise of releases before these sources


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 3, 2**64 - 1])
def test_mlx_source_replays_old_pipeline_noise(seed):
    """sd35m_mlx/pipeline.py `_initial_noise` (commit 6c0e031) drew mx.random.normal(NHWC, key(seed)) in float32;
    the mlx source, asked for the NCHW shape, hands back that draw transposed to NCHW."""
    batch, height, width, channels = 2, 12, 10, 16
    old = np.array(mx.random.normal((batch, height, width, channels), key=mx.random.key(seed)).astype(mx.float32))
    ours = randn((batch, channels, height, width), seed, rng="mlx")
    assert ours.shape == (batch, channels, height, width) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours.transpose(0, 2, 3, 1), old)


@pytest.mark.parametrize("seed", [0, 2**32 + 3])
def test_latent_noise_is_the_torch_order_draw_in_nhwc(seed):
    nchw = torch.randn((2, 16, 5, 3), generator=torch.Generator().manual_seed(seed))
    ours = latent_noise(NoiseGenerator(seed, "cpu"), (2, 5, 3, 16))
    assert isinstance(ours, mx.array) and ours.dtype == mx.float32
    np.testing.assert_array_equal(np.array(ours), nchw.permute(0, 2, 3, 1).numpy())
    old = mx.random.normal((2, 5, 3, 16), key=mx.random.key(seed)).astype(mx.float32)  # the old pipeline's draw
    np.testing.assert_array_equal(np.array(latent_noise(NoiseGenerator(seed, "mlx"), (2, 5, 3, 16))), np.array(old))


def test_successive_draws_differ_for_every_source():
    for rng in RNG_SOURCES:
        gen = NoiseGenerator(5, rng)
        first, second = gen((1, 16, 4, 4)), gen((1, 16, 4, 4))
        assert not np.array_equal(first, second), rng
        np.testing.assert_array_equal(first, randn((1, 16, 4, 4), 5, rng))  # a fresh generator restarts


# --- validation


def test_unknown_rng_is_a_value_error_naming_the_valid_ones():
    with pytest.raises(ValueError, match="unknown rng 'gpu'; valid: cpu, nv, mlx"):
        randn((4,), 0, rng="gpu")
    assert check_rng("nv") == "nv"


@pytest.mark.parametrize(
    ("seed", "error"), [(-1, ValueError), (2**64, ValueError), (1.0, TypeError), (True, TypeError), ("3", TypeError)]
)
def test_bad_seeds_are_rejected(seed, error):
    with pytest.raises(error, match="seed must be"):
        NoiseGenerator(seed)


def test_numpy_integer_seeds_are_accepted():
    assert check_seed(np.uint64(2**64 - 1)) == 2**64 - 1
    np.testing.assert_array_equal(randn((20,), np.int64(9)), randn((20,), 9))


def test_negative_shapes_are_rejected():
    with pytest.raises(ValueError, match="negative"):
        randn((2, -1), 0)


def test_bench_noise_runs_every_source(capsys):
    from benchmarks import bench_noise

    bench_noise.main(["--sizes", "64", "--runs", "1"])
    out = capsys.readouterr().out
    assert "(1, 16, 8, 8)" in out and all(name in out for name in (*RNG_SOURCES, "torch"))


def test_front_ends_can_import_the_names_and_checks_without_mlx():
    code = (
        "import sys; import sd35m_mlx.sampling.noise, sd35m_mlx.sampling.schedulers; "
        "assert 'mlx.core' not in sys.modules, 'mlx imported'"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
