"""The kohya-layout export of a trained LoRA (sd35m_mlx/lora/kohya_export.py): read by our loader and by the
alpha / rank rule every kohya reader applies (ComfyUI's LoRA adapter: delta = up @ down * alpha / down rows)
with the same deltas as the diffusers/PEFT file; fused q|k|v is where a naive export goes wrong."""

import mlx.core as mx
import numpy as np
import pytest
from lora_writers import velocity_probe
from safetensors.numpy import load_file

from sd35m_mlx.loading.keymaps import map_mmdit_weights
from sd35m_mlx.lora.kohya_export import PREFIX, _routes, kohya_state_dict
from sd35m_mlx.training.checkpoint import export_kohya, save_lora
from sd35m_mlx.training.lora_params import TrainableLora, resolve_targets

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def trained(pipe, tmp_path_factory):
    """A 'trained' LoRA (random non-zero B) on attention of both streams, attn2 and every adaLN (the last
    context adaLN and norm_out are row-swapped in the single file), saved in both layouts."""
    model = pipe.transformer
    lora = TrainableLora(model, resolve_targets(model, "attention,adaln"), RANK, ALPHA, seed=3)
    rng = np.random.default_rng(0)
    for f in lora.params.values():
        f["lora_B"] = mx.array(rng.standard_normal(f["lora_B"].shape, dtype=np.float32) * 0.05)
    folder = tmp_path_factory.mktemp("lora")
    try:
        peft = save_lora(lora, folder)
        kohya = export_kohya(lora, folder / "kohya.safetensors")
    finally:
        lora.detach()
    factors = {p: (np.array(f["lora_A"]), np.array(f["lora_B"])) for p, f in lora.params.items()}
    return factors, peft, kohya, model.config.num_layers


def _naive_deltas(tensors: dict, num_layers: int) -> dict[str, np.ndarray]:
    """What ComfyUI / kohya (no split_qkv) apply: up @ down * alpha / rank on the single-file module, mapped
    to our modules through the single-file key map."""
    names = {PREFIX + n.replace(".", "_"): n for n, *_ in _routes(num_layers).values()}
    out = {}
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        base = key.removesuffix(".lora_down.weight")
        down, up = tensors[key], tensors[f"{base}.lora_up.weight"]
        delta = up @ down * float(tensors[f"{base}.alpha"]) / down.shape[0]
        for ours, value in map_mmdit_weights(f"{names[base]}.weight", mx.array(delta), num_layers):
            out[ours.removesuffix(".weight")] = np.array(value)
    return out


def _expected(factors) -> dict[str, np.ndarray]:
    return {p: ALPHA / RANK * b @ a for p, (a, b) in factors.items()}


def test_alpha_over_rank_readers_get_the_trained_deltas(trained):
    factors, _, kohya, n = trained
    tensors = load_file(str(kohya))
    assert any("_attn_qkv." in k for k in tensors) and any("final_layer_adaLN" in k for k in tensors)
    got, expected = _naive_deltas(tensors, n), _expected(factors)
    assert set(got) == set(expected)
    for path, delta in expected.items():
        # float64 refactor stored in float32: rounding of the factors only
        assert np.abs(got[path] - delta).max() <= 1e-5 * np.abs(delta).max(), path


def test_naive_block_diagonal_export_is_three_times_too_weak(trained):
    """The counter-example the refactor avoids: kohya's split_qkv form (block-diagonal up, alpha of one)."""
    factors, _, _, n = trained
    tensors = {k: np.array(v) for k, v in kohya_state_dict(factors, ALPHA, RANK, n).items()}
    base = PREFIX + "joint_blocks_0_x_block_attn_qkv"
    parts = [factors[f"transformer_blocks.0.attn.to_{x}"] for x in "qkv"]
    tensors[f"{base}.lora_down.weight"] = np.concatenate([a for a, _ in parts])
    up = np.zeros((sum(b.shape[0] for _, b in parts), 3 * RANK), np.float32)
    for i, (_, b) in enumerate(parts):
        up[i * b.shape[0] : (i + 1) * b.shape[0], i * RANK : (i + 1) * RANK] = b
    tensors[f"{base}.lora_up.weight"], tensors[f"{base}.alpha"] = up, np.float32(ALPHA)
    got, expected = _naive_deltas(tensors, n), _expected(factors)
    q = "transformer_blocks.0.attn.to_q"
    np.testing.assert_allclose(got[q] * 3, expected[q], rtol=1e-4, atol=1e-7)


def test_our_loader_reads_the_export_as_the_peft_file(pipe, trained):
    _, peft, kohya, _ = trained
    base = velocity_probe(pipe)
    out = {}
    for name, path in (("peft", peft), ("kohya", kohya)):
        pipe.load_lora_weights(path, adapter_name=name)
        try:
            out[name] = velocity_probe(pipe)
        finally:
            pipe.unload_lora_weights()
    assert np.abs(out["peft"] - base).max() > 1e-2, "the LoRA must change the transformer's output"
    err = np.abs(out["kohya"] - out["peft"]).max()
    assert err <= 1e-5 * np.abs(out["peft"]).max(), f"kohya export vs PEFT file: {err:.2e}"


def test_a_module_outside_the_single_file_layout_is_refused():
    a, b = np.zeros((2, 4), np.float32), np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="kohya export: nowhere.linear has no module"):
        kohya_state_dict({"nowhere.linear": (a, b)}, 2.0, 2, 2)
