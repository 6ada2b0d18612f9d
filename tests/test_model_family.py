"""The SD3 family from the same code: SD3.5 Large-shaped (no dual attention) and SD3 Medium-shaped (no qk-norm,
smaller positional table) tiny pipelines match diffusers end to end, through the diffusers layout and the single file.
"""

import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from parity import assert_close
from safetensors.torch import save_file
from test_single_file import _prefixed, _sidecars, _single_file_checkpoint, _text_encoders

from scripts.build_fixture import build_transformer
from sd35m_mlx import StableDiffusion35

# float32 both sides, same weights and initial noise (as tests/test_pipeline.py): only rounding differs;
# 2e-3 is half a uint8 level, while a missing qk-norm, a dual-attention block or a wrong table crop moves
# pixels by > 1e-2.
PIXEL_TOL = 2e-3
H, W = 64, 96

FAMILY = {
    # SD3.5 Large: 38 plain joint blocks (no attn2), rms qk-norm, 192^2 table (the fixture's 24 is kept)
    "sd3.5-large": dict(dual_attention_layers=(), qk_norm="rms_norm"),
    # SD3 Medium: plain joint blocks, no qk-norm, a smaller table than SD3.5 Medium's (192 vs 384; here 16 vs 24)
    "sd3-medium": dict(dual_attention_layers=(), qk_norm=None, pos_embed_max_size=16),
}


@pytest.fixture(scope="module", params=list(FAMILY))
def member(request, tiny_pipeline, tmp_path_factory):
    """(name, diffusers-layout folder, single-file folder) of one family member, the fixture's other weights."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    folder = root / "diffusers"
    shutil.copytree(tiny_pipeline, folder, ignore=shutil.ignore_patterns("transformer"))
    build_transformer(folder / "transformer", seed=7, **FAMILY[name])
    single = root / "single"
    single.mkdir()
    mmdit, vae = _single_file_checkpoint(folder)
    save_file(
        {**_prefixed("model.diffusion_model.", mmdit), **_prefixed("first_stage_model.", vae)}, single / "m.safetensors"
    )
    (single / "text_encoders").mkdir()
    encoders = _text_encoders(folder)
    for key, file in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5xxl", "t5xxl_fp16")):
        save_file(encoders[key], single / "text_encoders" / f"{file}.safetensors")
    _sidecars(folder, single)
    # without qk-norm no tensor tells the head size: the tiny one (16) comes from a config, the real one is 64
    (single / "transformer").mkdir()
    shutil.copy(folder / "transformer" / "config.json", single / "transformer")
    return name, folder, single


def _reference(folder, identity_clip_l_projection=False):
    ref = StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.float32)
    if identity_clip_l_projection:  # Stability's clip_l.safetensors has no projection: identity (as diffusers' loader)
        proj = ref.text_encoder.text_projection.weight
        with torch.no_grad():
            proj.copy_(torch.eye(proj.shape[0]))
    return ref


def _run_both(ours, ref, seed=0):
    noise = np.random.default_rng(seed).standard_normal((1, H // 8, W // 8, 16), dtype=np.float32)
    kw = dict(negative_prompt="blurry", height=H, width=W, num_inference_steps=3, guidance_scale=4.5)
    out = ours.generate("a capybara holding a sign", latents=noise, output_type="np", **kw)
    latents = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous()
    ref_out = ref("a capybara holding a sign", latents=latents, output_type="np", **kw).images
    assert_close(out, ref_out, atol=PIXEL_TOL, min_std=0.02, what="pixels")


def test_family_member_in_diffusers_layout_matches_diffusers(member):
    name, folder, _ = member
    ours = StableDiffusion35.from_pretrained(folder, dtype="float32")
    config = ours.transformer_config
    assert config.dual_attention_layers == () and config.qk_norm == FAMILY[name]["qk_norm"]
    _run_both(ours, _reference(folder))


def test_family_member_single_file_matches_diffusers(member):
    name, folder, single = member
    ours = StableDiffusion35.from_pretrained(single / "m.safetensors", dtype="float32")
    config = ours.transformer_config
    assert config.dual_attention_layers == () and config.qk_norm == FAMILY[name]["qk_norm"]
    assert config.pos_embed_max_size == FAMILY[name].get("pos_embed_max_size", 24)
    _run_both(ours, _reference(folder, identity_clip_l_projection=True), seed=1)
