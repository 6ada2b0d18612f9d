"""LoRA on quantized models: a side path beside QuantizedLinear, never baked into the quantized weight."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from lora_writers import save
from mlx.utils import tree_flatten

from sd35m_mlx import StableDiffusion35
from sd35m_mlx.lora.layers import is_lora_layer, layer_table

GROUP = 32  # the tiny fixture is 32 wide
H = W = 32


def _lora_file(pipe, path, seed=0):
    """A LoRA on every Linear of the transformer, diffusers names, alpha = rank."""
    rng = np.random.default_rng(seed)
    t = {}
    for name, shape in layer_table(pipe.transformer).items():
        if shape is None or len(shape) != 2:
            continue
        out, inp = shape
        t[f"transformer.{name}.lora_A.weight"] = rng.standard_normal((4, inp)) / inp**0.5
        t[f"transformer.{name}.lora_B.weight"] = rng.standard_normal((out, 4)) * 0.05
    return save(path, t)


def _gen(pipe):
    return pipe.generate("a red fox", seed=3, height=H, width=W, num_inference_steps=2, output_type="np")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_with_lora(bits, tiny_pipeline, tmp_path):
    pipe = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32", quantize=bits, quantize_group_size=GROUP)
    q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(q, nn.QuantizedLinear)
    packed = {k: np.array(v) for k, v in tree_flatten(pipe.transformer.parameters())}
    base = _gen(pipe)
    name = pipe.load_lora_weights(_lora_file(pipe, tmp_path / "l.safetensors"))
    assert is_lora_layer(q) and isinstance(q, nn.QuantizedLinear)
    with_lora = _gen(pipe)
    assert np.abs(with_lora - base).max() > 0.05, f"q{bits}: the LoRA must change the image"
    pipe.set_adapters([name], [0.0])
    assert np.array_equal(_gen(pipe), base), "weight 0 must be exactly no LoRA"
    pipe.set_adapters([name], [1.0])
    with pytest.warns(UserWarning, match="quantized layers keep their LoRA as a side path"):
        pipe.fuse_lora()
    assert is_lora_layer(q) and q._lora.down_t is not None  # still beside, not inside, the 4/8-bit weight
    # full-precision layers (embedders, proj_out) fused, quantized ones on the side path: same image
    assert np.abs(_gen(pipe) - with_lora).max() <= 1e-4
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    after = {k: np.array(v) for k, v in tree_flatten(pipe.transformer.parameters())}
    assert all(np.array_equal(after[k], packed[k]) for k in packed), "quantized weights must never change"
    assert np.array_equal(_gen(pipe), base)


def test_side_path_matches_a_dense_delta():
    """y = base(x) + scale * x @ (up @ down).T on a QuantizedLinear, at float32."""
    from sd35m_mlx.lora.adapter import Factor
    from sd35m_mlx.lora.layers import apply

    model = nn.Module()
    model.layer = nn.QuantizedLinear.from_linear(nn.Linear(64, 32), GROUP, 4)
    down, up = mx.random.normal((3, 64), key=mx.random.key(0)), mx.random.normal((32, 3), key=mx.random.key(1))
    x = mx.random.normal((2, 5, 64), key=mx.random.key(2))
    base = model.layer(x)
    apply(model, {"layer": [(0.5, Factor(down=down, up=up, scale=2.0))]})
    expected = base + x @ (up @ down).T
    assert mx.abs(model.layer(x) - expected).max().item() < 1e-4
