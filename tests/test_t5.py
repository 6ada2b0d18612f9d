"""The MLX T5 encoder matches transformers' T5EncoderModel, and stays finite in bfloat16."""

import json
import math
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from parity import assert_close
from safetensors.numpy import load_file, save_file
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel as HFT5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from sd35m_mlx.loading.safetensors_io import load_into, load_safetensors
from sd35m_mlx.loading.text_encoders import load_t5_encoder, sanitize_t5_weights
from sd35m_mlx.models.t5 import T5Config, T5EncoderModel, relative_position_buckets

# Both sides compute in float32; what remains is summation order (~1e-5 of the output std here).
TOL = 1e-4


def token_ids(vocab_size: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, vocab_size, (batch, length))


def reference(folder, ids: np.ndarray) -> torch.Tensor:
    model = HFT5EncoderModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).last_hidden_state


def test_t5_matches_transformers(tiny_pipeline):
    folder = tiny_pipeline / "text_encoder_3"
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids = token_ids(vocab, 2, 300)  # longer than max_distance 128: the log-spaced buckets are used
    expected = reference(folder, ids)

    ours = load_t5_encoder(folder)(mx.array(ids))

    assert_close(ours, expected, rtol_of_std=TOL, min_std=0.1, what="last_hidden_state")


def test_relative_position_buckets_match_transformers():
    length = 600
    pos = torch.arange(length)
    expected = HFT5Attention._relative_position_bucket(
        pos[None, :] - pos[:, None], bidirectional=True, num_buckets=32, max_distance=128
    )
    ours = np.array(relative_position_buckets(length, 32, 128))
    np.testing.assert_array_equal(ours, expected.numpy())
    assert len(np.unique(ours)) == 31  # every bucket but 16 ("0 tokens to the right") is reached


def test_t5_loads_embed_tokens_without_shared(tiny_pipeline, tmp_path):
    """Some T5 exports store the tied embedding only as encoder.embed_tokens.weight."""
    folder = tiny_pipeline / "text_encoder_3"
    weights = load_file(folder / "model.safetensors")
    weights["encoder.embed_tokens.weight"] = weights.pop("shared.weight")
    save_file(weights, tmp_path / "t5xxl.safetensors")
    config = T5Config.from_dict(json.loads((folder / "config.json").read_text()))
    ids = token_ids(config.vocab_size, 1, 40, seed=1)

    ours = load_t5_encoder(tmp_path / "t5xxl.safetensors", config=config)

    assert_close(ours(mx.array(ids)), reference(folder, ids), rtol_of_std=TOL, min_std=0.1, what="last_hidden_state")


def test_t5_v1_0_relu_feed_forward_matches_transformers(tmp_path):
    """The non-gated (original T5) feed-forward is supported too."""
    torch.manual_seed(0)
    hf = HFT5EncoderModel(
        HFT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="relu")
    )
    with torch.no_grad():  # O(1) activations (the default init is tiny)
        for name, p in hf.named_parameters():
            fan_in = p.shape[-1] if "weight" in name and p.ndim == 2 else 1
            p.normal_(0, 1 / math.sqrt(fan_in)) if "norm" not in name else p.normal_(1, 0.1)
    hf.save_pretrained(tmp_path)
    ids = token_ids(64, 2, 50)

    ours = load_t5_encoder(tmp_path)

    assert "wi" in ours.encoder.block[0].layer[1].DenseReluDense
    assert_close(ours(mx.array(ids)), reference(tmp_path, ids), rtol_of_std=TOL, min_std=0.1, what="last_hidden_state")


def test_t5_float16_is_loaded_as_bfloat16_with_a_warning(tiny_pipeline):
    with pytest.warns(UserWarning, match="float16"):
        model = load_t5_encoder(tiny_pipeline / "text_encoder_3", mx.float16)
    assert model.dtype == mx.bfloat16


def test_t5_bfloat16_stays_finite_where_float16_overflows(tiny_pipeline):
    """Scaled feed-forward outputs push the residual stream past float16's 65504, as T5-XXL's do."""
    folder = tiny_pipeline / "text_encoder_3"
    config = T5Config.from_dict(json.loads((folder / "config.json").read_text()))
    weights, origin = load_safetensors(folder)
    weights = {k: v * 1e5 if k.endswith("DenseReluDense.wo.weight") else v for k, v in weights.items()}
    ids = mx.array(token_ids(config.vocab_size, 1, 64, seed=2))

    def run(dtype, probe=False):
        model = load_into(T5EncoderModel(config), sanitize_t5_weights(weights), origin)
        model.set_dtype(dtype)
        if probe:  # the residual stream entering the final norm
            model.encoder.final_layer_norm = nn.Identity()
        return model(ids).astype(mx.float32)

    peak = mx.abs(run(mx.float32, probe=True)).max().item()
    assert peak > 2 * 65504, f"the test inputs do not push activations past float16 (peak {peak:.3g})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert not np.isfinite(np.array(run(mx.float16))).all(), "float16 should overflow here"

    ours = run(mx.bfloat16)
    expected = run(mx.float32)
    assert np.isfinite(np.array(ours)).all()
    # bfloat16 keeps 8 mantissa bits and the error compounds over layers: 0.06 x std measured on CPU
    err = mx.abs(ours - expected).max().item()
    assert err < 0.2 * np.array(expected).std(), err
