"""The MLX CLIP text towers match transformers' on the tiny fixture's weights."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from parity import assert_close
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection

from sd35m_mlx.loading.text_encoders import load_clip_encoder
from sd35m_mlx.models.clip import CLIPTextConfig

# Both sides compute in float32; what remains is summation order (~1e-6 of the output std here).
TOL = 1e-4


def token_ids(config: dict, pad_id: int, lengths: list[int], seed: int = 0) -> np.ndarray:
    """BOS, random ordinary tokens, EOS, then padding to 77: what the CLIP tokenizers produce."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), config["max_position_embeddings"]), pad_id, dtype=np.int64)
    for row, n in zip(ids, lengths, strict=True):
        row[0] = config["bos_token_id"]
        row[1 : n - 1] = rng.integers(0, config["bos_token_id"], n - 2)
        row[n - 1] = config["eos_token_id"]
    return ids


@pytest.mark.parametrize("folder", ["text_encoder", "text_encoder_2"])  # quick_gelu / exact gelu
def test_clip_matches_transformers(tiny_pipeline, folder):
    config = json.loads((tiny_pipeline / folder / "config.json").read_text())
    ids = token_ids(config, config["pad_token_id"], [2, 9, 77])
    ref = CLIPTextModelWithProjection.from_pretrained(tiny_pipeline / folder).eval()
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids), output_hidden_states=True)

    ours = load_clip_encoder(tiny_pipeline / folder)(mx.array(ids))

    assert len(ours.hidden_states) == len(expected.hidden_states) == config["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(ours.hidden_states, expected.hidden_states, strict=True)):
        assert_close(a, b, rtol_of_std=TOL, min_std=0.1, what=f"hidden_states[{i}]")
    assert_close(
        ours.last_hidden_state, expected.last_hidden_state, rtol_of_std=TOL, min_std=0.1, what="last_hidden_state"
    )
    assert_close(ours.text_embeds, expected.text_embeds, rtol_of_std=TOL, min_std=0.1, what="text_embeds")
    # pooling reads a different position per row: the rows must differ
    pooled = np.array(ours.text_embeds)
    assert np.abs(pooled[0] - pooled[1]).max() > 0.1 and np.abs(pooled[1] - pooled[2]).max() > 0.1


def test_clip_legacy_eos_token_id_pools_at_largest_id(tiny_pipeline, tmp_path):
    """Configs with eos_token_id 2 (SD3's) pool where the largest id (EOS) first occurs, not at id 2."""
    src = tiny_pipeline / "text_encoder"
    config = json.loads((src / "config.json").read_text())
    true_eos = config["eos_token_id"]
    (tmp_path / "config.json").write_text(json.dumps({**config, "eos_token_id": 2}))
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    ids = token_ids({**config, "eos_token_id": true_eos}, true_eos, [12, 30], seed=1)
    ids[:, 5] = 2  # a token equal to the legacy eos id, before the real EOS
    ref = CLIPTextModelWithProjection.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids)).text_embeds

    ours = load_clip_encoder(tmp_path)
    assert ours.config.eos_token_id == 2
    assert_close(ours(mx.array(ids)).text_embeds, expected, rtol_of_std=TOL, min_std=0.1, what="text_embeds")
    assert np.array(ours.text_model.pool_positions(mx.array(ids))).tolist() == [11, 29]


def test_clip_without_projection_pools_unprojected(tiny_pipeline, tmp_path):
    """The Stability single-file clip_l has no text_projection: the pooled vector is used as is."""
    src = tiny_pipeline / "text_encoder"
    weights = load_file(src / "model.safetensors")
    del weights["text_projection.weight"]
    weights["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]  # old exports
    save_file(weights, tmp_path / "clip_l.safetensors")
    config = json.loads((src / "config.json").read_text())
    ids = token_ids(config, config["pad_token_id"], [7, 20])
    ref = HFCLIPTextModel.from_pretrained(src).eval()
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids)).pooler_output

    ours = load_clip_encoder(tmp_path / "clip_l.safetensors", config=CLIPTextConfig.from_dict(config))

    assert not ours.has_projection and ours.pooled_dim == config["hidden_size"]
    assert_close(
        ours(mx.array(ids)).text_embeds, expected, rtol_of_std=TOL, min_std=0.1, what="pooled without projection"
    )


def test_clip_config_rejects_unknown_activation():
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_dict({"hidden_act": "swiglu", "unknown_key": 1})
