"""The Stability single-file layout, its fp8 T5 and ComfyUI all-in-one files load the same model as the
diffusers layout. Single files are built here from the tiny fixture's weights by the inverse key map, and
diffusers' own single-file converters first check that inverse, so our map is not only checked against itself."""

import dataclasses
import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    convert_sd3_transformer_checkpoint_to_diffusers,
)
from mlx.utils import tree_flatten
from parity import assert_close
from safetensors.torch import load_file, save_file

from sd35m_mlx import StableDiffusion35
from sd35m_mlx.loading.safetensors_io import WeightsError
from sd35m_mlx.loading.single_file import (
    infer_clip_config,
    infer_mmdit_config,
    infer_t5_config,
    infer_vae_config,
    load_single_file,
)
from sd35m_mlx.models.clip import CLIPTextConfig
from sd35m_mlx.models.mmdit import MMDiTConfig
from sd35m_mlx.models.t5 import T5Config
from sd35m_mlx.models.vae import VAEConfig

# Same tolerance and reason as test_pipeline.py: float32 on both sides, so only rounding differs (the weights
# are bit-identical, see the parameter checks); 2e-3 is half a uint8 level.
PIXEL_TOL = 2e-3
H, W = 64, 96

# ---------------------------------------------------------------------------------------------
# diffusers -> single file (the inverse of what the loader does), on torch tensors

_MMDIT_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_MMDIT_BLOCK = {
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_add_out": "context_block.attn.proj",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
_MMDIT_QKV = {
    ("attn.to_q", "attn.to_k", "attn.to_v"): "x_block.attn.qkv",
    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "context_block.attn.qkv",
    ("attn2.to_q", "attn2.to_k", "attn2.to_v"): "x_block.attn2.qkv",
}


def _swap(t):
    a, b = t.chunk(2)
    return torch.cat([b, a])


def mmdit_to_single_file(sd: dict, num_layers: int) -> dict:
    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    renames = dict(_MMDIT_TOP)
    for i in range(num_layers):
        renames.update({f"transformer_blocks.{i}.{a}": f"joint_blocks.{i}.{b}" for a, b in _MMDIT_BLOCK.items()})
        for (q, k, v), fused in _MMDIT_QKV.items():
            for p in ("weight", "bias"):
                block = f"transformer_blocks.{i}."
                if f"{block}{q}.{p}" in sd:
                    out[f"joint_blocks.{i}.{fused}.{p}"] = torch.cat([sd[f"{block}{n}.{p}"] for n in (q, k, v)])
    for name, value in sd.items():
        module, _, p = name.rpartition(".")
        if module in renames:
            out[f"{renames[module]}.{p}"] = value
    last = num_layers - 1
    for key in (f"joint_blocks.{last}.context_block.adaLN_modulation.1", "final_layer.adaLN_modulation.1"):
        for p in ("weight", "bias"):
            out[f"{key}.{p}"] = _swap(out[f"{key}.{p}"])
    return out


def vae_to_ldm(sd: dict, num_levels: int) -> dict:
    up = lambda m: str(num_levels - 1 - int(m.group(1)))  # noqa: E731
    rules = [
        (r"conv_norm_out\.", lambda m: "norm_out."),
        (r"down_blocks\.(\d+)\.resnets\.", lambda m: f"down.{m.group(1)}.block."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"down.{m.group(1)}.downsample."),
        (r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{up(m)}.block."),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{up(m)}.upsample."),
        (r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}."),
        (r"mid_block\.attentions\.0\.group_norm\.", lambda m: "mid.attn_1.norm."),
        (r"mid_block\.attentions\.0\.to_(q|k|v)\.", lambda m: f"mid.attn_1.{m.group(1)}."),
        (r"mid_block\.attentions\.0\.to_out\.0\.", lambda m: "mid.attn_1.proj_out."),
        (r"conv_shortcut\.", lambda m: "nin_shortcut."),
    ]
    out = {}
    for name, value in sd.items():
        for pattern, repl in rules:
            name = re.sub(pattern, repl, name)
        if ".attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out[name] = value
    return out


def _fixture_state(tiny_pipeline, folder):
    name = "model.safetensors" if folder.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
    return load_file(tiny_pipeline / folder / name)


def _config(tiny_pipeline, folder):
    return json.loads((tiny_pipeline / folder / "config.json").read_text())


def _single_file_checkpoint(tiny_pipeline) -> tuple[dict, dict]:
    """(MMDiT, VAE) in the single-file layout, without their file prefixes."""
    num_layers = _config(tiny_pipeline, "transformer")["num_layers"]
    levels = len(_config(tiny_pipeline, "vae")["block_out_channels"])
    mmdit = mmdit_to_single_file(_fixture_state(tiny_pipeline, "transformer"), num_layers)
    return mmdit, vae_to_ldm(_fixture_state(tiny_pipeline, "vae"), levels)


def _prefixed(prefix, sd):
    return {prefix + k: v for k, v in sd.items()}


def _text_encoders(tiny_pipeline) -> dict:
    clip_l = _fixture_state(tiny_pipeline, "text_encoder")
    del clip_l["text_projection.weight"]  # Stability's clip_l.safetensors has no projection
    return {
        "clip_l": clip_l,
        "clip_g": _fixture_state(tiny_pipeline, "text_encoder_2"),
        "t5xxl": _fixture_state(tiny_pipeline, "text_encoder_3"),
    }


def _sidecars(tiny_pipeline, root):
    """Tokenizers, scheduler and the configs shapes cannot replace: the tiny VAE's 8 norm groups and the tiny
    CLIPs' 4 heads (real sizes need none). No transformer/ or text_encoder_3/ config: inferred from shapes."""
    for folder in ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"):
        shutil.copytree(tiny_pipeline / folder, root / folder)
    for folder in ("vae", "text_encoder", "text_encoder_2"):
        (root / folder).mkdir()
        shutil.copy(tiny_pipeline / folder / "config.json", root / folder)


@pytest.fixture(scope="module")
def single_file_folder(tiny_pipeline, tmp_path_factory):
    """The HF repo's single-file layout: sd3.5_medium.safetensors, text_encoders/, tokenizer folders."""
    root = tmp_path_factory.mktemp("single-file")
    mmdit, vae = _single_file_checkpoint(tiny_pipeline)
    save_file(
        {**_prefixed("model.diffusion_model.", mmdit), **_prefixed("first_stage_model.", vae)},
        root / "sd3.5_medium.safetensors",
    )
    (root / "text_encoders").mkdir()
    encoders = _text_encoders(tiny_pipeline)
    for name, file in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5xxl", "t5xxl_fp16")):
        save_file(encoders[name], root / "text_encoders" / f"{file}.safetensors")
    _sidecars(tiny_pipeline, root)
    return root


@pytest.fixture(scope="module")
def reference(tiny_pipeline):
    """The diffusers-layout pipeline with CLIP-L's projection replaced by the identity: what "no projection"
    means (diffusers' own single-file loader puts torch.eye there too), so both must give the same images."""
    pipe = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32")
    clip_l = pipe.prompt_encoder.text_encoder
    clip_l.text_projection.weight = mx.eye(clip_l.config.hidden_size, dtype=mx.float32)
    return pipe


@pytest.fixture(scope="module")
def single_file_pipe(single_file_folder):
    return StableDiffusion35.from_pretrained(single_file_folder, dtype="float32")


def _params(module) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(module.parameters())}


def _assert_same_params(a, b, skip=()):
    pa, pb = _params(a), _params(b)
    assert set(pa) == set(pb) - set(skip)
    for k in pa:
        assert pa[k].shape == pb[k].shape and np.array_equal(pa[k], pb[k]), k


def _generate(pipe, seed=0, **kw):
    noise = np.random.default_rng(seed).standard_normal((1, H // 8, W // 8, 16), dtype=np.float32)
    args = dict(height=H, width=W, num_inference_steps=3, guidance_scale=4.5, output_type="np") | kw
    return pipe.generate("a capybara in a hat", latents=noise, **args)


def _compare_images(out, ref):
    assert_close(out, ref, atol=PIXEL_TOL, min_std=0.02, what="pixels")


# ---------------------------------------------------------------------------------------------
# 1. The built single file is what diffusers' own converters expect


def test_built_single_file_converts_back_with_diffusers_converters(tiny_pipeline):
    mmdit, vae = _single_file_checkpoint(tiny_pipeline)
    checkpoint = {**_prefixed("model.diffusion_model.", mmdit), **_prefixed("first_stage_model.", vae)}
    for theirs, ours in (
        (
            convert_sd3_transformer_checkpoint_to_diffusers(dict(checkpoint)),
            _fixture_state(tiny_pipeline, "transformer"),
        ),
        (convert_ldm_vae_checkpoint(checkpoint, _config(tiny_pipeline, "vae")), _fixture_state(tiny_pipeline, "vae")),
    ):
        assert set(theirs) == set(ours)
        assert all(torch.equal(theirs[k], ours[k]) for k in ours)


# ---------------------------------------------------------------------------------------------
# 2. Loaded from the single-file folder == loaded from the diffusers folder


def test_single_file_weights_equal_diffusers_layout_weights(single_file_pipe, reference):
    _assert_same_params(single_file_pipe.transformer, reference.transformer)
    _assert_same_params(single_file_pipe.vae, reference.vae)
    _assert_same_params(
        single_file_pipe.prompt_encoder.text_encoder, reference.prompt_encoder.text_encoder, ["text_projection.weight"]
    )
    _assert_same_params(single_file_pipe.prompt_encoder.text_encoder_2, reference.prompt_encoder.text_encoder_2)
    _assert_same_params(single_file_pipe.prompt_encoder.text_encoder_3, reference.prompt_encoder.text_encoder_3)
    # sample_size (the default resolution) is the one thing no tensor tells: SD3's 128 when no config says
    assert single_file_pipe.transformer.config == dataclasses.replace(reference.transformer.config, sample_size=128)
    assert single_file_pipe.vae.config == reference.vae.config
    assert single_file_pipe.schedule == reference.schedule


def test_single_file_matches_diffusers_layout(single_file_pipe, reference):
    _compare_images(
        _generate(single_file_pipe, negative_prompt="blurry"), _generate(reference, negative_prompt="blurry")
    )


def test_single_file_path_loads_like_its_folder(single_file_folder, single_file_pipe):
    parts = load_single_file(single_file_folder / "sd3.5_medium.safetensors", mx.float32, load_t5=False)
    _assert_same_params(parts.transformer, single_file_pipe.transformer)
    assert parts.prompt_encoder.text_encoder_3 is None
    assert parts.prompt_encoder.joint_attention_dim == single_file_pipe.transformer.config.joint_attention_dim


# ---------------------------------------------------------------------------------------------
# 3. float8 e4m3fn T5


def _fp8(t):
    return t.to(torch.float8_e4m3fn)


@pytest.fixture(scope="module")
def fp8_folder(single_file_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8") / "sd35"
    shutil.copytree(single_file_folder, root)
    t5 = root / "text_encoders" / "t5xxl_fp16.safetensors"
    save_file({k: _fp8(v) for k, v in load_file(t5).items()}, root / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors")
    t5.unlink()
    return root


def test_fp8_t5_matches_reference_with_fp8_rounded_weights(fp8_folder, tiny_pipeline, reference, single_file_pipe):
    fp8 = StableDiffusion35.from_pretrained(fp8_folder, dtype="float32")
    rounded = {k: mx.array(_fp8(v).float().numpy()) for k, v in _fixture_state(tiny_pipeline, "text_encoder_3").items()}
    ref_t5 = reference.prompt_encoder.text_encoder_3
    original = list(tree_flatten(ref_t5.parameters()))
    try:
        ref_t5.load_weights(list(rounded.items()), strict=True)
        _assert_same_params(fp8.prompt_encoder.text_encoder_3, ref_t5)
        ref_image = _generate(reference, seed=1)
    finally:
        ref_t5.load_weights(original, strict=True)
    image = _generate(fp8, seed=1)
    _compare_images(image, ref_image)
    # and the rounding matters: full-precision T5 gives a clearly different image (~0.1 here)
    assert np.abs(_generate(single_file_pipe, seed=1) - image).max() > 10 * PIXEL_TOL


def test_fp16_t5_is_preferred_over_fp8(fp8_folder, single_file_folder, single_file_pipe, tmp_path):
    root = tmp_path / "both"
    shutil.copytree(fp8_folder, root)
    shutil.copy(single_file_folder / "text_encoders" / "t5xxl_fp16.safetensors", root / "text_encoders")
    parts = load_single_file(root, mx.float32)
    _assert_same_params(parts.prompt_encoder.text_encoder_3, single_file_pipe.prompt_encoder.text_encoder_3)


def test_fp8_t5_decodes_exactly_to_bfloat16(fp8_folder):
    """e4m3fn values are exact in bfloat16 (3 mantissa bits of 7), so the bfloat16 load loses nothing."""
    t5_bf16 = load_single_file(fp8_folder, mx.bfloat16).prompt_encoder.text_encoder_3
    t5_f32 = _params(load_single_file(fp8_folder, mx.float32).prompt_encoder.text_encoder_3)
    for k, v in tree_flatten(t5_bf16.parameters()):
        assert v.dtype == mx.bfloat16
        assert np.array_equal(np.array(v.astype(mx.float32)), t5_f32[k]), k


# ---------------------------------------------------------------------------------------------
# 4. ComfyUI all-in-one


def _all_in_one(tiny_pipeline, root, encoders):
    root.mkdir(parents=True)
    mmdit, vae = _single_file_checkpoint(tiny_pipeline)
    tensors = {**_prefixed("model.diffusion_model.", mmdit), **_prefixed("first_stage_model.", vae)}
    for name, sd in encoders.items():
        tensors.update(_prefixed(f"text_encoders.{name}.transformer.", sd))
        tensors[f"text_encoders.{name}.logit_scale"] = torch.tensor(4.6052)  # ComfyUI extras are ignored
    save_file(tensors, root / "sd3.5_medium_incl_clips_t5xxlfp16.safetensors")
    _sidecars(tiny_pipeline, root)
    return root / "sd3.5_medium_incl_clips_t5xxlfp16.safetensors"


def test_comfyui_all_in_one_equals_separate_files(tiny_pipeline, tmp_path, single_file_pipe):
    path = _all_in_one(tiny_pipeline, tmp_path / "comfy", _text_encoders(tiny_pipeline))
    parts = load_single_file(path, mx.float32)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        _assert_same_params(getattr(parts.prompt_encoder, name), getattr(single_file_pipe.prompt_encoder, name))
    _assert_same_params(parts.transformer, single_file_pipe.transformer)
    _assert_same_params(parts.vae, single_file_pipe.vae)


def test_comfyui_all_in_one_without_t5(tiny_pipeline, tmp_path, single_file_pipe):
    encoders = _text_encoders(tiny_pipeline)
    del encoders["t5xxl"]
    path = _all_in_one(tiny_pipeline, tmp_path / "comfy", encoders)
    parts = load_single_file(path, mx.float32, load_t5=False)
    _assert_same_params(parts.prompt_encoder.text_encoder_2, single_file_pipe.prompt_encoder.text_encoder_2)
    with pytest.raises(WeightsError, match="no T5.*load_t5=False"):
        load_single_file(path, mx.float32)


def test_comfyui_scaled_fp8_t5(tiny_pipeline, tmp_path):
    """ComfyUI's `t5xxlfp8scaled`: weight = float8 tensor * per-tensor `scale_weight`, marker `scaled_fp8`."""
    encoders = _text_encoders(tiny_pipeline)
    t5, expected = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in encoders["t5xxl"].items():
        if v.ndim == 2 and "relative_attention_bias" not in k and k != "shared.weight":
            scale = v.abs().max() / 448.0
            t5[k], t5[k.removesuffix("weight") + "scale_weight"] = _fp8(v / scale), scale
            expected[k] = _fp8(v / scale).float() * scale
        else:
            t5[k] = expected[k] = v
    encoders["t5xxl"] = t5
    parts = load_single_file(_all_in_one(tiny_pipeline, tmp_path / "comfy", encoders), mx.float32)
    got = _params(parts.prompt_encoder.text_encoder_3)
    assert set(got) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)


# ---------------------------------------------------------------------------------------------
# 5. Other architectures and broken sources: one clear line


@pytest.mark.parametrize(
    "tensors, message",
    [
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8),
                "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
            },
            "SDXL checkpoint",
        ),
        (
            {
                "double_blocks.0.img_attn.qkv.weight": torch.zeros(12, 4),
                "single_blocks.0.linear1.weight": torch.zeros(8, 4),
            },
            "FLUX checkpoint",
        ),
        ({"foo": torch.zeros(2), "bar.weight": torch.zeros(3, 3)}, "not an SD3 checkpoint"),
        ({"first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, "no MMDiT"),
    ],
    ids=["sdxl", "flux", "random", "vae-only"],
)
def test_other_checkpoints_get_a_one_line_error(tmp_path, tensors, message):
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    for source in (path, tmp_path):  # the file, and a folder holding it
        with pytest.raises(WeightsError, match=message) as err:
            StableDiffusion35.from_pretrained(source, dtype="float32")
        assert "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda sd: sd.pop("model.diffusion_model.context_embedder.weight"),
            r"\(MMDiT\): incomplete.*context_embedder",
        ),
        (
            lambda sd: sd.update({"model.diffusion_model.joint_blocks.0.x_block.extra.weight": torch.zeros(2)}),
            "unknown",
        ),
        (lambda sd: sd.update({"first_stage_model.decoder.mid.attn_2.q.weight": torch.zeros(2)}), r"\(VAE\): unknown"),
    ],
    ids=["missing", "extra-mmdit", "extra-vae"],
)
def test_damaged_sd3_checkpoint_names_the_tensor(single_file_folder, tmp_path, edit, message):
    root = tmp_path / "damaged"
    shutil.copytree(single_file_folder, root)
    sd = load_file(root / "sd3.5_medium.safetensors")
    edit(sd)
    save_file(sd, root / "sd3.5_medium.safetensors")
    with pytest.raises(WeightsError, match=message):
        load_single_file(root, mx.float32, load_t5=False)


def test_non_safetensors_file_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_single_file(tmp_path / "model.safetensors", mx.float32)
    (tmp_path / "model.ckpt").write_bytes(b"PK")
    with pytest.raises(WeightsError, match="only .safetensors"):
        load_single_file(tmp_path / "model.ckpt", mx.float32)


def test_missing_tokenizers_say_where_they_were_looked_for(single_file_folder, tmp_path):
    root = tmp_path / "bare"
    shutil.copytree(single_file_folder, root, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(WeightsError, match=rf"no tokenizer/ folder in {re.escape(str(root))}.*tokenizer_3"):
        load_single_file(root, mx.float32, load_t5=False)


def test_missing_tokenizers_come_from_the_hub_cache(single_file_folder, tiny_pipeline, tmp_path, monkeypatch):
    from sd35m_mlx.loading import hub

    root = tmp_path / "bare"
    shutil.copytree(single_file_folder, root, ignore=shutil.ignore_patterns("tokenizer*"))
    asked = []
    monkeypatch.setattr(hub, "download_tokenizers", lambda repo, **kw: asked.append(repo) or tiny_pipeline)
    parts = load_single_file(root, mx.float32)
    assert asked and asked[0] == "stabilityai/stable-diffusion-3.5-medium"
    assert parts.prompt_encoder.tokenizer_3 is not None


# ---------------------------------------------------------------------------------------------
# Config inference at the real sizes (torch meta tensors: shapes only, no memory)


def _meta_state(model_fn):
    with torch.device("meta"):
        return model_fn().state_dict()


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(pos_embed_max_size=192, dual_attention_layers=(), qk_norm=None)],
    ids=["sd3.5-medium", "sd3-medium"],
)
def test_mmdit_config_inferred_from_real_shapes(overrides):
    from diffusers import SD3Transformer2DModel

    expected = MMDiTConfig(**overrides)
    config = {k: v for k, v in vars(expected).items()}
    sd = _meta_state(lambda: SD3Transformer2DModel(**config))
    assert infer_mmdit_config(_shapes(mmdit_to_single_file(sd, expected.num_layers))) == expected


def test_vae_and_text_encoder_configs_inferred_from_real_shapes():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig as HFCLIPTextConfig
    from transformers import CLIPTextModelWithProjection, T5EncoderModel
    from transformers import T5Config as HFT5Config

    vae = VAEConfig()
    sd = _meta_state(
        lambda: AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=vae.block_out_channels,
            layers_per_block=vae.layers_per_block,
            latent_channels=vae.latent_channels,
            norm_num_groups=vae.norm_num_groups,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    )
    assert infer_vae_config(_shapes(vae_to_ldm(sd, 4))) == vae

    clip_l = CLIPTextConfig()
    sd = _meta_state(lambda: CLIPTextModelWithProjection(HFCLIPTextConfig(**vars(clip_l))))
    del sd["text_projection.weight"]
    assert infer_clip_config(_shapes(sd)) == clip_l

    clip_g = CLIPTextConfig(
        hidden_size=1280,
        intermediate_size=5120,
        projection_dim=1280,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
    )
    sd = _meta_state(lambda: CLIPTextModelWithProjection(HFCLIPTextConfig(**vars(clip_g))))
    assert infer_clip_config(_shapes(sd)) == clip_g

    t5 = T5Config()
    sd = _meta_state(lambda: T5EncoderModel(HFT5Config(**vars(t5), is_encoder_decoder=False)))
    assert infer_t5_config(_shapes(sd)) == t5
