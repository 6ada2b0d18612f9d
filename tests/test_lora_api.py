"""The adapter API's bookkeeping, adaLN LoRAs against the precomputed modulations, and T5 LoRAs."""

import numpy as np
import pytest
from lora_writers import save

from sd35m_mlx.lora.layers import layer_table

H = W = 32


def _gen(pipe):
    return pipe.generate("a red fox", seed=5, height=H, width=W, num_inference_steps=2, output_type="np")


def _factors(rng, shape, rank=4, std=0.1):
    out, inp = shape
    return rng.standard_normal((rank, inp)) / inp**0.5, rng.standard_normal((out, rank)) * std


def test_adaln_lora_reaches_the_precomputed_modulations(ours, tmp_path):
    """norm1 / norm1_context / norm_out LoRAs only: they act through the per-schedule modulations, which
    must be computed with the LoRA, and recomputed when set_adapters changes its weight."""
    rng = np.random.default_rng(0)
    table = layer_table(ours.transformer)
    t = {}
    for name, shape in table.items():
        if name.endswith(("norm1.linear", "norm1_context.linear", "norm_out.linear")):
            down, up = _factors(rng, shape)
            t[f"transformer.{name}.lora_A.weight"], t[f"transformer.{name}.lora_B.weight"] = down, up
    base = _gen(ours)
    name = ours.load_lora_weights(save(tmp_path / "adaln.safetensors", t))
    try:
        full = _gen(ours)
        assert np.abs(full - base).max() > 0.05
        ours.set_adapters(name, 0.5)
        half = _gen(ours)
        assert np.abs(half - full).max() > 1e-2 and np.abs(half - base).max() > 1e-2
    finally:
        ours.unload_lora_weights()
    assert np.array_equal(_gen(ours), base)


def test_t5_lora_kohya_equals_diffusers_names(ours, tmp_path):
    rng = np.random.default_rng(1)
    t5 = ours.prompt_encoder.text_encoder_3
    diffusers, kohya = {}, {}
    for name, shape in layer_table(t5).items():
        if shape is not None and len(shape) == 2 and ".layer." in name:
            down, up = _factors(rng, shape, std=0.3)
            diffusers[f"text_encoder_3.{name}.lora_A.weight"] = down
            diffusers[f"text_encoder_3.{name}.lora_B.weight"] = up
            key = "lora_te3_" + name.replace(".", "_")
            kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"] = down, up
            kohya[f"{key}.alpha"] = np.float32(4.0)  # alpha = rank: scale 1, as the diffusers file
    base = _gen(ours)
    images = []
    for tensors in (diffusers, kohya):
        ours.load_lora_weights(save(tmp_path / "t5.safetensors", tensors))
        images.append(_gen(ours))
        ours.unload_lora_weights()
    assert np.abs(images[0] - base).max() > 1e-2, "the T5 LoRA must change the image"
    assert np.abs(images[0] - images[1]).max() <= 1e-5


def test_adapter_bookkeeping(ours, tmp_path):
    rng = np.random.default_rng(2)
    name = "transformer_blocks.0.attn.to_q"
    down, up = _factors(rng, layer_table(ours.transformer)[name])
    path = save(
        tmp_path / "q.safetensors", {f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up}
    )
    try:
        assert ours.load_lora_weights(path) == "default_0"
        assert ours.load_lora_weights(path) == "default_1"
        with pytest.raises(ValueError, match="already loaded"):
            ours.load_lora_weights(path, adapter_name="default_0")
        with pytest.raises(ValueError, match="'nope' is not loaded"):
            ours.set_adapters(["nope"])
        with pytest.raises(ValueError, match="2 entries for 1"):
            ours.set_adapters(["default_0"], [0.5, 0.5])
        assert ours.get_list_adapters() == {"transformer": ["default_0", "default_1"]}
        ours.set_adapters(["default_0", "default_1"], [0.3, 0.7])
        info = ours.lora_info()
        assert [(i["name"], i["scale"], i["format"]) for i in info] == [
            ("default_0", 0.3, "diffusers"),
            ("default_1", 0.7, "diffusers"),
        ]
        assert len(info[0]["sha256"]) == 10
        ours.delete_adapters("default_0")
        assert ours.get_active_adapters() == ["default_1"]
    finally:
        ours.unload_lora_weights()
    assert not any(hasattr(m, "_lora") for _, m in ours.transformer.named_modules())


def test_use_loras_keeps_loaded_adapters_within_a_byte_budget_least_recently_used_out(ours, tmp_path):
    """The server's LoRA cache: bounded by the adapters' parameter bytes (not a count); the LRU one not asked for
    goes first; the requested ones always load, even past the budget; the others are inactive."""
    rng = np.random.default_rng(1)
    files = {}
    for name, rank in (("a", 4), ("b", 4), ("c", 8)):  # c holds twice a's bytes
        down, up = _factors(rng, (32, 32), rank)
        files[name] = save(tmp_path / f"{name}.safetensors", {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": down,
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": up})  # fmt: skip
    try:
        ours.use_loras([(files["a"], 1.0)], cache_bytes=0)
        one = ours.lora_bytes()
        assert one > 0

        def loaded():
            return sorted(a.source.rsplit("/", 1)[-1][0] for a in ours._loras.adapters.values())

        ours.use_loras([(files["b"], 1.0)], cache_bytes=2 * one)
        assert loaded() == ["a", "b"] and len(ours.get_active_adapters()) == 1  # within 2 x a: both stay, a off
        ours.use_loras([(files["a"], 0.5)], cache_bytes=2 * one)  # a is now the most recent
        ours.use_loras([(files["c"], 1.0)], cache_bytes=3 * one)  # 4 units held: b, the LRU, goes
        assert loaded() == ["a", "c"]
        ours.use_loras([(files["c"], 1.0), (files["a"], 1.0)], cache_bytes=one)  # asked for: kept past the budget
        assert loaded() == ["a", "c"] and ours.lora_bytes() == 3 * one
        ours.use_loras([], cache_bytes=one)  # c goes (least recently used: c, then a); a alone fits
        assert loaded() == ["a"] and ours.get_active_adapters() == []
        ours.lora_cache_bytes = 0  # the budget a caller (serve --lora-cache-mb) sets for calls that give none
        ours.use_loras([(files["b"], 1.0)])
        assert loaded() == ["b"]
        with pytest.raises(ValueError, match="cache_bytes"):
            ours.use_loras([], cache_bytes=-1)
    finally:
        ours.lora_cache_bytes = None
        ours.unload_lora_weights()
        ours._loras.cached.clear()
