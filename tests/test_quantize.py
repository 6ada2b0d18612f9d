"""Quantization: which layers, per-component bits, streaming memory, and quantized pipelines that run.

The tiny fixture is 32 wide, so these tests use group_size 32: with the default 64 most of its
layers would be skipped by the width rule (which `test_width_rule_...` pins).
"""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from scripts.build_fixture import TRANSFORMER
from sd35m_mlx import StableDiffusion35
from sd35m_mlx.loading.sources import load_pipeline_parts
from sd35m_mlx.loading.text_encoders import load_t5_encoder
from sd35m_mlx.models.mmdit import MMDiTConfig, SD3Transformer2DModel
from sd35m_mlx.models.t5 import T5Config, T5EncoderModel
from sd35m_mlx.quantize import (
    Quantization,
    quantization_config,
    quantization_of,
    quantization_plan,
    quantize_model,
    quantize_parts,
)

GROUP = 32
H, W = 64, 64


def _linears(model):
    return {p: m for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))}


def _kind(path):
    if path in ("context_embedder", "proj_out") or path.startswith("time_text_embed."):
        return "kept"
    if path == "norm_out.linear" or path.endswith((".norm1.linear", ".norm1_context.linear")):
        return "adaLN"
    return "quantized"


@pytest.mark.parametrize("bits", [8, 4])
def test_transformer_keeps_embedders_and_final_layer_and_adaln_at_8_bits_or_more(bits):
    model = quantize_model(SD3Transformer2DModel(MMDiTConfig.from_dict(TRANSFORMER)), bits, GROUP)
    layers = _linears(model)
    assert len(layers) > 40 and {_kind(p) for p in layers} == {"kept", "adaLN", "quantized"}
    for path, m in layers.items():
        if _kind(path) == "kept":
            assert type(m) is nn.Linear, path
        else:
            expected = max(bits, 8) if _kind(path) == "adaLN" else bits
            assert isinstance(m, nn.QuantizedLinear) and (m.bits, m.group_size) == (expected, GROUP), path
    assert isinstance(model.pos_embed.proj, nn.Conv2d)
    assert quantization_of(model) == Quantization(bits, GROUP)
    config = quantization_config(model)
    assert {k: v for k, v in config.items() if not isinstance(v, dict)} == {"group_size": GROUP, "bits": bits}
    overrides = {k for k, v in config.items() if isinstance(v, dict)}
    assert overrides == ({p for p in layers if _kind(p) == "adaLN"} if bits < 8 else set())


def test_t5_quantizes_every_linear_and_no_embedding():
    t5 = quantize_model(T5EncoderModel(T5Config(d_model=64, d_ff=96, d_kv=16, num_heads=4, num_layers=2)), 4, GROUP)
    assert all(isinstance(m, nn.QuantizedLinear) and m.bits == 4 for m in _linears(t5).values())
    assert type(t5.shared) is nn.Embedding
    assert type(t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias) is nn.Embedding


def test_width_rule_skips_layers_whose_input_is_not_a_multiple_of_the_group_size():
    model = SD3Transformer2DModel(MMDiTConfig.from_dict(TRANSFORMER))  # hidden 32, MLP 128, context 128
    plan = quantization_plan(model, 8, 64)
    assert plan and all(path.endswith(("ff.net.2", "ff_context.net.2")) for path in plan)
    quantize_model(model, 8, 64)
    assert type(model.transformer_blocks[0].attn.to_q) is nn.Linear  # 32 inputs: not a multiple of 64
    assert isinstance(model.transformer_blocks[0].ff.net[2], nn.QuantizedLinear)  # 128 inputs


def test_bad_settings_and_requantizing_are_refused():
    with pytest.raises(ValueError, match="bits must be one of"):
        Quantization(7)
    with pytest.raises(ValueError, match="group size must be one of"):
        Quantization(8, 48)
    model = quantize_model(SD3Transformer2DModel(MMDiTConfig.from_dict(TRANSFORMER)), 8, GROUP)
    assert quantize_model(model, 8, GROUP) is model  # same settings: nothing to do
    with pytest.raises(ValueError, match="already quantized \\(8 bits, group size 32\\)"):
        quantize_model(model, 4, GROUP)


def _write_t5(folder, config: T5Config):
    """A T5 folder with random weights, written by MLX (no torch needed for this size)."""
    model = T5EncoderModel(config)
    folder.mkdir()
    weights = {k: 0.05 * mx.random.normal(v.shape, key=mx.random.key(i)) for i, (k, v) in enumerate(
        tree_flatten(model.parameters()))}  # fmt: skip
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config.__dict__))


def test_quantizing_a_lazily_loaded_model_streams_layer_by_layer(tmp_path):
    # 4 layers of 512 x 1536 gated FFN and attention: 30 MiB of float32 linear weights
    config = T5Config(vocab_size=64, d_model=512, d_ff=1536, d_kv=64, num_heads=8, num_layers=4)
    _write_t5(tmp_path / "t5", config)
    model = load_t5_encoder(tmp_path / "t5", mx.float32)  # lazy: nothing read yet
    mx.eval(model.shared.weight, [n.weight for _, n in model.named_modules() if hasattr(n, "eps")])
    full = sum(m.weight.nbytes for m in _linears(model).values())
    largest = max(m.weight.nbytes for m in _linears(model).values())

    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    quantize_model(model, 4, 64)
    peak = mx.get_peak_memory() - base
    quantized = sum(
        v.nbytes for k, v in tree_flatten(model.parameters()) if "layer_norm" not in k and "shared" not in k
    )
    # Streaming bound: the quantized result plus one layer in full precision while it is quantized
    # (+ the file read buffer of that layer). A whole-model float32 copy would be `full` (6x more).
    bound = quantized + 2 * largest
    print(f"peak {peak / 2**20:.1f} MiB, quantized {quantized / 2**20:.1f} MiB, float32 {full / 2**20:.1f} MiB")
    assert bound < full / 2, "the test must be able to tell streaming from a full-precision copy"
    assert peak <= bound, f"peak {peak} bytes while quantizing > {bound} (quantized + one float32 layer x 2)"
    assert mx.get_active_memory() - base <= quantized + largest // 8


@pytest.fixture(scope="module")
def float32_pipe(tiny_pipeline):
    return StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32")


def _quantized_pipe(folder, transformer_bits, t5_bits):
    parts = quantize_parts(
        load_pipeline_parts(folder, mx.float32), transformer_bits=transformer_bits, t5_bits=t5_bits, group_size=GROUP
    )
    return StableDiffusion35(parts.transformer, parts.vae, parts.prompt_encoder, parts.schedule, mx.float32)


def _psnr(a, b):
    return 10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-12))


@pytest.mark.parametrize("transformer_bits, t5_bits, min_psnr", [(8, 8, 30.0), (8, 4, 15.0), (4, 4, 15.0)])
def test_quantized_pipeline_runs_finite_and_near_float32(
    tiny_pipeline, float32_pipe, transformer_bits, t5_bits, min_psnr
):
    pipe = _quantized_pipe(tiny_pipeline, transformer_bits, t5_bits)
    assert quantization_of(pipe.transformer).bits == transformer_bits
    assert quantization_of(pipe.prompt_encoder.text_encoder_3).bits == t5_bits
    assert quantization_of(pipe.prompt_encoder.text_encoder) is None  # CLIP is never quantized
    kw = dict(height=H, width=W, num_inference_steps=3, seed=5, output_type="np")
    out = pipe.generate("a capybara in a field", **kw)
    ref = float32_pipe.generate("a capybara in a field", **kw)
    assert np.isfinite(out).all() and out.std() > 0.02
    # Random tiny weights (32 wide, groups of 32) are a rough stand-in for the real model: 8 bits stays
    # within a few uint8 levels of float32, 4 bits only has to stay the same picture (PSNR > 15 dB).
    psnr = _psnr(out, ref)
    print(f"{transformer_bits}-bit MMDiT, {t5_bits}-bit T5 vs float32: PSNR {psnr:.1f} dB")
    assert psnr > min_psnr


def test_t5_only_quantization_leaves_the_transformer_alone(tiny_pipeline):
    parts = quantize_parts(load_pipeline_parts(tiny_pipeline, mx.float32), t5_bits=4, group_size=GROUP)
    assert quantization_of(parts.transformer) is None
    assert quantization_of(parts.prompt_encoder.text_encoder_3) == Quantization(4, GROUP)
