"""LoRA through the diffusers API against diffusers itself: peft LoRAs saved by
StableDiffusion3Pipeline.save_lora_weights, loaded by both, two adapters at once, on the tiny fixture."""

import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from lora_writers import allow_installed_peft, write_diffusers_lora
from mlx.utils import tree_flatten
from parity import assert_close

from sd35m_mlx import StableDiffusion35

# float32 both sides, same weights, noise and LoRA factors: the differences are float rounding carried
# through the sampler (~1e-5), as in test_pipeline.py. 2e-3 is half a uint8 level; the LoRAs here move
# pixels by >0.1, a wrong alpha or weight by >1e-2.
PIXEL_TOL = 2e-3
H, W = 32, 48  # small: diffusers in the same process as MLX is slow (DEVELOPERS.md)
KW = dict(height=H, width=W, num_inference_steps=2, guidance_scale=4.5)


@pytest.fixture(scope="module")
def lora_files(tiny_pipeline, tmp_path_factory):
    allow_installed_peft()
    folder = tmp_path_factory.mktemp("loras")
    writer = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline, dtype=torch.float32)
    a = write_diffusers_lora(folder, writer, "a", seed=10, rank=4, alpha=8.0)
    # b: another rank, an alpha_pattern (per-module alpha in the metadata), LoRA on adaLN and embedders too
    b = write_diffusers_lora(folder, writer, "b", seed=20, rank=2, alpha=1.0, alpha_pattern={"norm1.linear": 4.0})
    dora = write_diffusers_lora(folder, writer, "dora", seed=30, rank=4, alpha=4.0, text_encoders=False, use_dora=True)
    return {"a": a, "b": b, "dora": dora}


def _noise(seed=0):
    return np.random.default_rng(seed).standard_normal((1, H // 8, W // 8, 16), dtype=np.float32)


def _gen(pipe, noise, prompt="a red fox"):
    return pipe.generate(prompt, latents=noise, output_type="np", **KW)


def _ref_gen(ref, noise, prompt="a red fox"):
    latents = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous()
    return ref(prompt, latents=latents, output_type="np", **KW).images


def test_two_adapters_match_diffusers(tiny_pipeline, lora_files, ours):
    ref = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline, dtype=torch.float32)
    ref.load_lora_weights(str(lora_files["a"]), adapter_name="a")
    ref.load_lora_weights(str(lora_files["b"]), adapter_name="b")
    ref.set_adapters(["a", "b"], [0.8, 0.5])
    noise = _noise()
    base = _gen(ours, noise)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every tensor maps (conv patch embedding included)
            assert ours.load_lora_weights(lora_files["a"], adapter_name="a") == "a"
            assert ours.load_lora_weights(lora_files["b"], adapter_name="b") == "b"
        assert ours.transformer.pos_embed.proj._lora.down_t.ndim == 4
        assert ours.get_active_adapters() == ["b"]  # as diffusers: the last loaded one
        ours.set_adapters(["a", "b"], [0.8, 0.5])
        assert ours.get_active_adapters() == ["a", "b"]
        out = _gen(ours, noise)
        expected = _ref_gen(ref, noise)
        assert np.abs(out - base).max() > 0.1, "the LoRAs must change the image"
        assert_close(out, expected, atol=PIXEL_TOL, what="pixels vs diffusers")

        # text encoders alone (CLIP-L and CLIP-G LoRAs): diffusers with the transformer LoRA off
        ref.transformer.set_adapters(["a", "b"], [0.0, 0.0])
        te_ref = _ref_gen(ref, noise)
        state = ours._loras
        saved = {n: dict(a.factors) for n, a in state.adapters.items()}
        for adapter in state.adapters.values():
            adapter.factors.pop("transformer")
        ours.set_adapters(["a", "b"], [0.8, 0.5])
        te_out = _gen(ours, noise)
        for n, f in saved.items():
            state.adapters[n].factors = f
        assert np.abs(te_out - base).max() > 1e-2, "the text encoder LoRAs must change the image"
        assert_close(te_out, te_ref, atol=PIXEL_TOL, what="pixels vs diffusers, text encoder LoRAs")
    finally:
        ours.unload_lora_weights()


def test_fuse_unfuse_and_unload_restore_the_base_exactly(lora_files, ours):
    noise = _noise(1)
    base = _gen(ours, noise)
    weights = {k: np.array(v) for k, v in tree_flatten(ours.transformer.parameters())}
    ours.load_lora_weights(lora_files["a"], adapter_name="a")
    ours.load_lora_weights(lora_files["b"], adapter_name="b")
    ours.set_adapters(["a", "b"], [0.8, 0.5])
    unfused = _gen(ours, noise)
    ours.fuse_lora()
    fused = _gen(ours, noise)
    # fused: W + delta rounded once to float32 vs the side path's separate matmuls: ~1e-6 relative per
    # layer, carried through 3 steps; 1e-4 is far below the LoRA's own effect (>0.1)
    assert np.abs(fused - unfused).max() <= 1e-4
    with pytest.raises(ValueError, match="unfuse_lora"):
        ours.set_adapters(["a"], [1.0])
    ours.unfuse_lora()
    after = {k: np.array(v) for k, v in tree_flatten(ours.transformer.parameters())}
    assert after.keys() == weights.keys()
    assert all(np.array_equal(after[k], weights[k]) for k in weights), "unfuse must restore the weights bit for bit"
    assert np.array_equal(_gen(ours, noise), unfused)
    ours.unload_lora_weights()
    assert np.array_equal(_gen(ours, noise), base), "unload must give the base model's image exactly"


def test_weight_zero_is_exactly_no_lora(lora_files, ours):
    noise = _noise(2)
    base = _gen(ours, noise)
    ours.load_lora_weights(lora_files["a"], adapter_name="a")
    try:
        ours.set_adapters(["a"], [0.0])
        assert np.array_equal(_gen(ours, noise), base)
        ours.set_adapters("a", 1.0)
        assert np.abs(_gen(ours, noise) - base).max() > 0.1
    finally:
        ours.unload_lora_weights()


def test_from_pretrained_loras_and_low_memory_reapply(tiny_pipeline, lora_files, ours):
    noise = _noise(3)
    ours.load_lora_weights(lora_files["a"], adapter_name="a")
    ours.load_lora_weights(lora_files["b"], adapter_name="b")
    ours.set_adapters(["a", "b"], [0.8, 0.5])
    expected = _gen(ours, noise)
    ours.unload_lora_weights()
    low = StableDiffusion35.from_pretrained(
        tiny_pipeline, dtype="float32", low_memory=True, loras=[(lora_files["a"], 0.8), (lora_files["b"], 0.5)]
    )
    assert low.get_active_adapters() == ["default_0", "default_1"]
    # the transformer is reloaded (and its adaLN weights released) at every run: LoRAs come back each time
    first, second = _gen(low, noise), _gen(low, noise)
    assert np.abs(first - expected).max() <= 1e-5
    assert np.array_equal(first, second)
    # loading after the text encoders were released still maps their LoRA keys (key tables read no weights)
    low._loras.tables = None
    assert low.prompt_encoder is None
    name = low.load_lora_weights(lora_files["a"], adapter_name="again")
    assert {"transformer", "text_encoder", "text_encoder_2"} <= set(low._loras.adapters[name].factors)


def test_lora_factors_follow_the_compute_dtype(tiny_pipeline, lora_files):
    pipe = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="bfloat16")
    pipe.load_lora_weights(lora_files["a"])
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert layer._lora.down_t.dtype == mx.bfloat16 and layer._lora.up_t.dtype == mx.bfloat16
    x = mx.ones((1, 4, layer.weight.shape[1]), dtype=mx.bfloat16)
    assert layer(x).dtype == mx.bfloat16


def test_dora_matches_diffusers(tiny_pipeline, lora_files, ours):
    """peft DoRA (lora_magnitude_vector) on every Linear of the transformer, at weight 0.7 (inside the norm)."""
    ref = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline, dtype=torch.float32)
    ref.load_lora_weights(str(lora_files["dora"]), adapter_name="dora")
    ref.set_adapters(["dora"], [0.7])
    noise = _noise(4)
    base = _gen(ours, noise)
    try:
        ours.load_lora_weights(lora_files["dora"], adapter_name="dora")
        ours.set_adapters("dora", 0.7)
        out = _gen(ours, noise)
        assert np.abs(out - base).max() > 0.1
        assert_close(out, _ref_gen(ref, noise), atol=PIXEL_TOL, what="DoRA pixels vs diffusers")
        ours.fuse_lora()
        assert np.abs(_gen(ours, noise) - out).max() <= 1e-4  # as the fused LoRA test above
        ours.unfuse_lora()
    finally:
        ours.unload_lora_weights()
