"""Denoising and decoding bound the work MLX may hold in flight (sd35m_mlx/sampling/memory.py).

The bound is MLX's memory limit, lowered for the loop and restored after it: these tests pin that
the loop runs under it, that it is only ever lowered, and that it is put back (also on
cancellation), since a leaked limit would slow everything the user runs afterwards.
"""

import mlx.core as mx
import numpy as np
import pytest

from sd35m_mlx import GenerationCancelled, StableDiffusion35
from sd35m_mlx.sampling.memory import DEFAULT_WORK_BUDGET, GIB, LOW_MEMORY_WORK_BUDGET, bounded_work

KW = dict(height=64, width=64, num_inference_steps=3, guidance_scale=4.5, seed=0, output_type="np")


def test_bounded_work_lowers_the_limit_and_restores_it():
    before = mx.get_memory_limit()
    with bounded_work(GIB):
        inside = mx.get_memory_limit()
    assert inside == mx.get_active_memory() + GIB < before
    assert mx.get_memory_limit() == before


def test_bounded_work_never_raises_a_lower_limit_and_none_is_no_bound():
    before = mx.get_memory_limit()
    low = mx.get_active_memory() + GIB // 2
    mx.set_memory_limit(low)
    try:
        with bounded_work(100 * GIB):
            assert mx.get_memory_limit() == low
        with bounded_work(None):
            assert mx.get_memory_limit() == low
    finally:
        mx.set_memory_limit(before)


@pytest.mark.parametrize("low_memory", [False, True])
def test_generate_denoises_and_decodes_under_the_budget_and_restores_the_limit(tiny_pipeline, low_memory):
    pipe = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32", low_memory=low_memory)
    budget = LOW_MEMORY_WORK_BUDGET if low_memory else DEFAULT_WORK_BUDGET
    assert pipe.work_budget == budget
    before = mx.get_memory_limit()
    seen = []
    decode = pipe.vae.decode

    def recording_decode(z):
        seen.append(mx.get_memory_limit())
        return decode(z)

    pipe.vae.decode = recording_decode
    out = pipe.generate("a red cube", callback=lambda i, n, x: seen.append(mx.get_memory_limit()), **KW)
    assert len(seen) == 4 and all(limit < before for limit in seen)  # 3 steps, then the decode
    # the bound sits `budget` above what the loop started with (weights, context, latents)
    assert all(0 < limit - budget <= mx.get_peak_memory() for limit in seen)
    assert mx.get_memory_limit() == before

    pipe.work_budget = None
    unbounded = pipe.generate("a red cube", callback=lambda i, n, x: seen.append(mx.get_memory_limit()), **KW)
    assert seen[-1] == before
    np.testing.assert_array_equal(out, unbounded)  # the bound changes scheduling, never results


def test_cancelled_generation_restores_the_limit(tiny_pipeline):
    pipe = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32")
    before = mx.get_memory_limit()
    with pytest.raises(GenerationCancelled):
        pipe.generate("a red cube", callback=lambda i, n, x: False, **KW)
    assert mx.get_memory_limit() == before
