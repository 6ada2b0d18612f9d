"""Every other LoRA layout, written here by an independent writer from one random LoRA, must give the
diffusers-format result (itself checked against diffusers in test_lora_diffusers.py); a writer that
swaps q/k/v, drops the adaLN half swap or ignores alpha must not."""

import json
import warnings

import numpy as np
import pytest
from lora_writers import save
from parity import assert_close

from sd35m_mlx.lora import LoraError
from sd35m_mlx.lora.layers import layer_table

RANK, ALPHA = 4, 6.0  # scale 1.5: ignoring alpha (scale 1) or reading it as alpha / 3r changes the image
# The same deltas, grouped differently (shared vs per-target down, split vs fused rows): float32 rounding
# only, ~1e-6 through 2 steps. The LoRA moves pixels by >0.1; every mutation below by >1e-2.
SAME_TOL = 1e-4
H = W = 32
STREAMS = {
    "x_block": {
        "attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "attn.proj": ("attn.to_out.0",),
        "attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
        "attn2.proj": ("attn2.to_out.0",),
        "mlp.fc1": ("ff.net.0.proj",),
        "mlp.fc2": ("ff.net.2",),
        "adaLN_modulation.1": ("norm1.linear",),
    },
    "context_block": {
        "attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "attn.proj": ("attn.to_add_out",),
        "mlp.fc1": ("ff_context.net.0.proj",),
        "mlp.fc2": ("ff_context.net.2",),
        "adaLN_modulation.1": ("norm1_context.linear",),
    },
}
TOP = {
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
    "x_embedder.proj": "pos_embed.proj",  # a Conv2d: conv LoRA factors, PyTorch layout
}


@pytest.fixture(scope="module")
def lora(ours):
    """Stability module -> (down, up rows in Stability order, [our modules]); q/k/v share one down.
    Plus CLIP-L / CLIP-G modules -> (down, up)."""
    rng = np.random.default_rng(0)
    table = layer_table(ours.transformer)
    n = ours.transformer_config.num_layers

    def factor(out, inp):
        return (rng.standard_normal((RANK, inp)) / inp**0.5, rng.standard_normal((out, RANK)) * 0.05)

    mmdit = {}
    for i in range(n):
        for stream, modules in STREAMS.items():
            for stab, targets in modules.items():
                names = [f"transformer_blocks.{i}.{t}" for t in targets]
                if not all(t in table for t in names):
                    continue
                out, inp = table[names[0]]
                down, up = factor(out * len(names), inp)
                mmdit[f"joint_blocks.{i}.{stream}.{stab}"] = (down, up, names)
    for stab, target in TOP.items():
        if len(table[target]) == 4:
            out, kh, kw, inp = table[target]
            down = rng.standard_normal((RANK, inp, kh, kw)) / (inp * kh * kw) ** 0.5
            mmdit[stab] = (down, rng.standard_normal((out, RANK, 1, 1)) * 0.05, [target])
            continue
        out, inp = table[target]
        mmdit[stab] = (*factor(out, inp), [target])
    te = {}
    for component, model in (("text_encoder", ours.prompt_encoder.text_encoder), ("text_encoder_2", None)):
        model = model or ours.prompt_encoder.text_encoder_2
        for path, shape in layer_table(model).items():
            if shape is not None and ".encoder.layers." in path:
                te[(component, path)] = factor(*shape)
    return {"mmdit": mmdit, "te": te, "last": n - 1}


def _swap(up):  # Stability (shift, scale) rows <-> diffusers (scale, shift)
    h = up.shape[0] // 2
    return np.concatenate([up[h:], up[:h]])


def _needs_swap(stab: str, last: int) -> bool:
    return stab == "final_layer.adaLN_modulation.1" or stab == f"joint_blocks.{last}.context_block.adaLN_modulation.1"


def write_diffusers(lora, path):
    """The reference: diffusers names, q/k/v split by rows, swap undone, alpha in lora_adapter_metadata."""
    t = {}
    for stab, (down, up, names) in lora["mmdit"].items():
        up = _swap(up) if _needs_swap(stab, lora["last"]) else up
        for name, rows in zip(names, np.split(up, len(names)), strict=True):
            t[f"transformer.{name}.lora_A.weight"], t[f"transformer.{name}.lora_B.weight"] = down, rows
    for (component, name), (down, up) in lora["te"].items():
        t[f"{component}.{name}.lora_A.weight"], t[f"{component}.{name}.lora_B.weight"] = down, up
    meta = {
        f"{c}.{k}": v
        for c in ("transformer", "text_encoder", "text_encoder_2")
        for k, v in (("r", RANK), ("lora_alpha", ALPHA))
    }
    return save(path, t, {"lora_adapter_metadata": json.dumps(meta)})


def write_kohya(lora, path, *, split_qkv=False, qkv_order=(0, 1, 2), swap=True, alpha=ALPHA, te=True):
    t = {}
    for stab, (down, up, names) in lora["mmdit"].items():
        key = "lora_unet_" + stab.replace(".", "_")
        if len(names) == 3:
            parts = np.split(up, 3)
            up = np.concatenate([parts[i] for i in qkv_order])
            if split_qkv:  # three rank-r LoRAs saved as one rank-3r LoRA, block-diagonal up, alpha of one
                down = np.concatenate([down] * 3)
                block = np.zeros((up.shape[0], 3 * RANK))
                rows = up.shape[0] // 3
                for j in range(3):
                    block[j * rows : (j + 1) * rows, j * RANK : (j + 1) * RANK] = parts[qkv_order[j]]
                up = block
        elif _needs_swap(stab, lora["last"]) and not swap:
            up = _swap(up)  # a writer that forgot the Stability order writes diffusers' order here
        t[f"{key}.lora_down.weight"], t[f"{key}.lora_up.weight"], t[f"{key}.alpha"] = down, up, np.float32(alpha)
    if te:
        for (component, name), (down, up) in lora["te"].items():
            key = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component] + name.replace(".", "_")
            t[f"{key}.lora_down.weight"], t[f"{key}.lora_up.weight"], t[f"{key}.alpha"] = down, up, np.float32(alpha)
    return save(path, t)


def write_stability(lora, path):
    """ComfyUI / Stability names, lora_A / lora_B suffixes, .alpha tensors."""
    t = {}
    for stab, (down, up, _) in lora["mmdit"].items():
        key = f"diffusion_model.{stab}"
        t[f"{key}.lora_A.weight"], t[f"{key}.lora_B.weight"], t[f"{key}.alpha"] = down, up, np.float32(ALPHA)
    names = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    for (component, name), (down, up) in lora["te"].items():
        key = f"text_encoders.{names[component]}.transformer.{name}"
        t[f"{key}.lora_A.weight"], t[f"{key}.lora_B.weight"], t[f"{key}.alpha"] = down, up, np.float32(ALPHA)
    return save(path, t)


def write_ours_named(lora, path, prefix, down_suffix, up_suffix, flat=False):
    """diffusers module names with another prefix / suffix spelling and `.alpha` tensors (SimpleTuner's
    comfyui export, OneTrainer's legacy `lora_transformer_`, peft's `base_model.model.`, ...)."""
    t = {}
    for stab, (down, up, names) in lora["mmdit"].items():
        up = _swap(up) if _needs_swap(stab, lora["last"]) else up
        for name, rows in zip(names, np.split(up, len(names)), strict=True):
            key = prefix + (name.replace(".", "_") if flat else name)
            t[f"{key}.{down_suffix}"], t[f"{key}.{up_suffix}"], t[f"{key}.alpha"] = down, rows, np.float32(ALPHA)
    return save(path, t)


def _image(pipe, path):
    pipe.load_lora_weights(path)
    try:
        return pipe.generate("a red fox", seed=1, height=H, width=W, num_inference_steps=2, output_type="np")
    finally:
        pipe.unload_lora_weights()


@pytest.fixture(scope="module")
def reference(ours, lora, tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    base = ours.generate("a red fox", seed=1, height=H, width=W, num_inference_steps=2, output_type="np")
    expected = _image(ours, write_diffusers(lora, folder / "diffusers.safetensors"))
    assert np.abs(expected - base).max() > 0.1, "the LoRA must change the image"
    return expected, folder


def _mmdit_only(lora):
    return {**lora, "te": {}}


WRITERS = {
    "kohya": lambda lora, p: write_kohya(lora, p),
    "kohya_split_qkv": lambda lora, p: write_kohya(lora, p, split_qkv=True),
    "stability_comfyui": write_stability,
    "simpletuner_comfyui": lambda lora, p: write_ours_named(lora, p, "transformer.", "lora_A.weight", "lora_B.weight"),
    "comfyui_diffusers_names": lambda lora, p: write_ours_named(
        lora, p, "diffusion_model.", "lora_A.weight", "lora_B.weight"
    ),
    "onetrainer_legacy": lambda lora, p: write_ours_named(
        lora, p, "lora_transformer_", "lora_down.weight", "lora_up.weight", flat=True
    ),
    "peft_prefix_lora_dot": lambda lora, p: write_ours_named(
        lora, p, "base_model.model.", "lora.down.weight", "lora.up.weight"
    ),
    "lora_linear_layer": lambda lora, p: write_ours_named(
        lora, p, "transformer.", "lora_linear_layer.down.weight", "lora_linear_layer.up.weight"
    ),
}
TE_FREE = {
    "simpletuner_comfyui",
    "comfyui_diffusers_names",
    "onetrainer_legacy",
    "peft_prefix_lora_dot",
    "lora_linear_layer",
}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_format_gives_the_diffusers_result(fmt, ours, lora, reference, tmp_path):
    expected, folder = reference
    if fmt in TE_FREE:  # these writers carry no text-encoder part: compare with a diffusers file without it
        expected = _image(ours, write_diffusers(_mmdit_only(lora), tmp_path / "ref.safetensors"))
    path = WRITERS[fmt](lora, tmp_path / f"{fmt}.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor must map
        out = _image(ours, path)
    assert_close(out, expected, atol=SAME_TOL, what=f"{fmt} pixels vs the diffusers-format file")


MUTATIONS = {
    "qkv_order_swapped": dict(qkv_order=(1, 0, 2)),
    "half_swap_dropped": dict(swap=False),
    "alpha_ignored": dict(alpha=float(RANK)),  # what a reader that ignores alpha would compute
    "split_qkv_qkv_swapped": dict(split_qkv=True, qkv_order=(0, 2, 1)),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_mutated_writer_is_caught(mutation, ours, lora, reference, tmp_path):
    """The comparison above is sensitive to each mistake a converter could make."""
    expected, _ = reference
    out = _image(ours, write_kohya(lora, tmp_path / "m.safetensors", **MUTATIONS[mutation]))
    assert np.abs(out - expected).max() > 1e-2


def test_lokr_and_loha_match_their_dense_delta(ours, tmp_path):
    """LyCORIS products with their alpha rules, against the same delta as a full-rank diffusers LoRA."""
    rng = np.random.default_rng(5)
    name = "transformer_blocks.1.attn.to_q"
    out, inp = layer_table(ours.transformer)[name]
    w1a, w1b = rng.standard_normal((2, 2)), rng.standard_normal((2, 4))  # kron factor 1: (2, 4), rank 2
    w2 = rng.standard_normal((out // 2, inp // 4)) * 0.05
    alpha = 3.0
    lokr_delta = np.kron(w1a @ w1b, w2) * (alpha / 2)  # LyCORIS: alpha / rank of the decomposed factor
    h1a, h1b = rng.standard_normal((out, 2)) * 0.3, rng.standard_normal((2, inp)) * 0.3
    h2a, h2b = rng.standard_normal((out, 2)) * 0.3, rng.standard_normal((2, inp)) * 0.3
    loha_delta = (h1a @ h1b) * (h2a @ h2b) * (alpha / 2)
    key = "lora_unet_joint_blocks_1_x_block_attn_qkv"  # any layout's name; use ours in diffusers spelling
    key = f"transformer.{name}"
    lokr = {f"{key}.lokr_w1_a": w1a, f"{key}.lokr_w1_b": w1b, f"{key}.lokr_w2": w2, f"{key}.alpha": np.float32(alpha)}
    loha = {f"{key}.hada_w1_a": h1a, f"{key}.hada_w1_b": h1b, f"{key}.hada_w2_a": h2a, f"{key}.hada_w2_b": h2b}
    loha[f"{key}.alpha"] = np.float32(alpha)
    for tensors, delta in ((lokr, lokr_delta), (loha, loha_delta)):
        dense = {f"{key}.lora_A.weight": np.eye(inp), f"{key}.lora_B.weight": delta}  # rank = in, alpha = rank
        got = _image(ours, save(tmp_path / "ly.safetensors", tensors))
        want = _image(ours, save(tmp_path / "dense.safetensors", dense))
        assert_close(got, want, atol=SAME_TOL, what="pixels vs the dense delta")


def test_bad_files_are_refused_with_a_reason(ours, lora, tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(LoraError, match="pickle"):
        ours.load_lora_weights(tmp_path / "x.ckpt")
    flux = save(
        tmp_path / "flux.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": np.ones((2, 8))}
    )
    with pytest.raises(LoraError, match="FLUX"):
        ours.load_lora_weights(flux)
    sdxl = {
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": np.ones((2, 8)),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.ones((2, 32)),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.ones((32, 2)),
    }
    with pytest.raises(LoraError, match="SDXL"):
        ours.load_lora_weights(save(tmp_path / "sdxl.safetensors", sdxl))
    wide = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((2, 64))}
    wide["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] = np.ones((64, 2))
    with pytest.raises(LoraError, match=r"transformer_blocks.0.attn.to_q .*\(64, 64\).*\(32, 32\)"):
        ours.load_lora_weights(save(tmp_path / "large.safetensors", wide))
    dora = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((2, 32))}
    dora["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] = np.ones((32, 2))
    dora["transformer.transformer_blocks.0.attn.to_q.dora_scale"] = np.ones((32, 1))  # LyCORIS DoRA
    with pytest.raises(LoraError, match="DoRA"):
        ours.load_lora_weights(save(tmp_path / "dora.safetensors", dora))
    partial = {**dora, "transformer.not_a_layer.lora_A.weight": np.ones((2, 32))}
    del partial["transformer.transformer_blocks.0.attn.to_q.dora_scale"]
    with pytest.warns(UserWarning, match=r"1 of 3 tensors .*not_a_layer"):
        ours.load_lora_weights(save(tmp_path / "partial.safetensors", partial))
    ours.unload_lora_weights()
    assert ours.get_active_adapters() == []


def test_non_finite_tensors_and_weights_are_refused(ours, tmp_path):
    """A NaN / Inf anywhere in a LoRA (a damaged file, a float16 save after an overflow) would make every
    image black with exit 0: refused at load naming file and tensor; so are non-finite adapter weights."""
    key = "transformer.transformer_blocks.0.attn.to_q"
    good = {f"{key}.lora_A.weight": np.ones((2, 32)), f"{key}.lora_B.weight": np.ones((32, 2))}
    for bad_value in (np.nan, np.inf):
        tensors = {**good, f"{key}.lora_B.weight": np.ones((32, 2))}
        tensors[f"{key}.lora_B.weight"][3, 1] = bad_value
        path = save(tmp_path / "bad.safetensors", tensors)
        with pytest.raises(LoraError, match=rf"bad.safetensors: tensor {key}.lora_B.weight holds NaN or Inf") as e:
            ours.load_lora_weights(path)
        assert "\n" not in str(e.value)
    assert ours.get_list_adapters() == {}  # nothing half-loaded
    name = ours.load_lora_weights(save(tmp_path / "good.safetensors", good))
    try:
        for weights in ([float("nan")], [float("inf")], float("-inf")):
            with pytest.raises(ValueError, match="adapter_weights must be finite"):
                ours.set_adapters([name], weights)
        with pytest.raises(ValueError, match="lora_scale must be a finite"):
            ours.fuse_lora(lora_scale=float("nan"))
        assert ours.get_active_adapters() == [name]
    finally:
        ours.unload_lora_weights()
