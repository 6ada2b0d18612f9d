"""SD3 ControlNet: the model, its loaders and `generate(control_image=...)` against diffusers'
SD3ControlNetModel and StableDiffusion3ControlNetPipeline on the tiny fixture."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import SD3ControlNetModel as RefControlNet
from diffusers import StableDiffusion3ControlNetPipeline
from diffusers.models.autoencoders import vae as diffusers_vae
from parity import assert_close
from PIL import Image

from sd35m_mlx import StableDiffusion35
from sd35m_mlx.loading.controlnet import load_controlnet
from sd35m_mlx.loading.hub import ModelSourceError
from sd35m_mlx.loading.safetensors_io import WeightsError

# float32 both sides, same weights and noise: float rounding carried through the steps (~1e-5). 2e-3 on the
# [0, 1] pixel scale is half a uint8 level; a residual at the wrong block, a wrong scale or gating step moves
# pixels by > 1e-2 (each test checks that the ControlNet changes the image by more than that).
PIXEL_TOL = 2e-3
H, W = 64, 96  # non-square; latents 8 x 12, 4 x 6 patches


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    from scripts.build_fixture import build_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    return {
        "sd35m": build_controlnet(root / "sd35m", seed=1, style="sd35m"),
        "sd35m_b": build_controlnet(root / "sd35m_b", seed=2, style="sd35m"),
        "instantx": build_controlnet(root / "instantx", seed=3, style="instantx"),
    }


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers samples the VAE posterior for the control image; we use its mean."""
    monkeypatch.setattr(diffusers_vae.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def _ref_pipe(tiny_pipeline, folders):
    nets = [RefControlNet.from_pretrained(f) for f in folders]
    return StableDiffusion3ControlNetPipeline.from_pretrained(
        tiny_pipeline, controlnet=nets[0] if len(nets) == 1 else nets, dtype=torch.float32
    )


def _noise(seed=0):
    return np.random.default_rng(seed).standard_normal((1, H // 8, W // 8, 16), dtype=np.float32)


def _control(seed, size=(W, H)):
    """An edge-map-like control image: sparse white strokes on black."""
    a = np.zeros((size[1], size[0]), np.uint8)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        r, c = rng.integers(0, size[1]), rng.integers(0, size[0] - 30)
        a[r, c : c + 30] = 255
        a[rng.integers(0, size[1] - 20) :, rng.integers(0, size[0])][:20] = 255
    return Image.fromarray(a).convert("RGB")


def _run_both(ours, ref, noise, **kw):
    common = dict(height=H, width=W, num_inference_steps=4, guidance_scale=4.5, output_type="np")
    common |= {k: v for k, v in kw.items()}
    out = ours.generate("a house by a lake", latents=noise, **common)
    latents = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous()
    ref_out = ref("a house by a lake", latents=latents, **common).images
    return out, ref_out


def _compare(out, ref_out, plain):
    assert_close(out, ref_out, atol=PIXEL_TOL, min_std=0.02, what="pixels")
    assert np.abs(out - plain).max() > 1e-2, "the ControlNet must change the image"


@pytest.mark.parametrize("style", ["sd35m", "instantx"])
def test_controlnet_residuals_match_diffusers_model(nets, style):
    """Tight check of the model alone: every block residual, with the pooled text and scale as given."""
    ref = RefControlNet.from_pretrained(nets[style]).eval()
    net = load_controlnet(nets[style], mx.float32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 12, 16), dtype=np.float32)
    cond = rng.standard_normal((2, 8, 12, 16), dtype=np.float32)
    ctx = rng.standard_normal((2, 7, 128), dtype=np.float32)
    pooled = rng.standard_normal((2, 96), dtype=np.float32)
    t = np.array([900.0, 250.0], np.float32)
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    with torch.no_grad():
        expected = ref(
            nchw(x), nchw(cond), 0.7, torch.from_numpy(ctx), torch.from_numpy(pooled), torch.from_numpy(t)
        ).controlnet_block_samples
    got = net(mx.array(x), mx.array(cond), 0.7, mx.array(ctx), mx.array(pooled), mx.array(t))
    assert len(got) == len(expected) == net.config.num_layers
    for g, e in zip(got, expected, strict=True):
        # 1e-4 x std: float32 rounding (matmul order) through two or three blocks
        assert_close(g, e, rtol_of_std=1e-4, min_std=0.1, what="block residual")


def test_sd35m_style_controlnet_matches_diffusers_pipeline(ours, nets, tiny_pipeline, posterior_mean):
    ours.controlnets = [load_controlnet(nets["sd35m"], mx.float32)]
    ref = _ref_pipe(tiny_pipeline, [nets["sd35m"]])
    noise, control = _noise(1), _control(1)
    out, ref_out = _run_both(ours, ref, noise, control_image=control, controlnet_conditioning_scale=0.8)
    ours.controlnets = []
    plain = ours.generate(
        "a house by a lake", latents=noise, height=H, width=W, num_inference_steps=4, output_type="np"
    )
    _compare(out, ref_out, plain)


def test_instantx_style_controlnet_with_guidance_window_matches_diffusers(ours, nets, tiny_pipeline, posterior_mean):
    """force_zeros_for_pooled_projection (zero pooled text, control latents without the VAE shift), and the
    ControlNet acting only on steps 1 and 2 of 4 (start 0.25, end 0.75)."""
    ours.controlnets = [load_controlnet(nets["instantx"], mx.float32)]
    ref = _ref_pipe(tiny_pipeline, [nets["instantx"]])
    noise, control = _noise(2), _control(2)
    kw = dict(control_image=control, control_guidance_start=0.25, control_guidance_end=0.75)
    out, ref_out = _run_both(ours, ref, noise, **kw)
    full = ours.generate(
        "a house by a lake",
        latents=noise,
        height=H,
        width=W,
        num_inference_steps=4,
        output_type="np",
        control_image=control,
    )
    ours.controlnets = []
    _compare(out, ref_out, full)


def test_two_controlnets_match_diffusers_multi_controlnet(ours, nets, tiny_pipeline, posterior_mean):
    ours.controlnets = [load_controlnet(nets[k], mx.float32) for k in ("sd35m", "sd35m_b")]
    ref = _ref_pipe(tiny_pipeline, [nets["sd35m"], nets["sd35m_b"]])
    noise = _noise(3)
    kw = dict(
        control_image=[_control(3), _control(4)],
        controlnet_conditioning_scale=[0.6, 1.2],
        control_guidance_start=[0.0, 0.5],
        control_guidance_end=[0.75, 1.0],
    )
    out, ref_out = _run_both(ours, ref, noise, **kw)
    ours.controlnets = []
    plain = ours.generate(
        "a house by a lake", latents=noise, height=H, width=W, num_inference_steps=4, output_type="np"
    )
    _compare(out, ref_out, plain)


def test_controlnet_of_another_width_is_refused_before_any_work(ours, tmp_path):
    from scripts.build_fixture import build_controlnet

    wide = build_controlnet(tmp_path / "wide", style="instantx", num_attention_heads=3, caption_projection_dim=48)
    with pytest.raises(ValueError, match="width 48 but this transformer has 32"):
        ours.load_controlnet(wide)
    assert ours.controlnets == []
    ours.controlnets = [load_controlnet(wide, mx.float32)]
    try:
        with pytest.raises(ValueError, match="width 48"):
            ours.generate("a cat", height=H, width=W, control_image=_control(0), num_inference_steps=1)
    finally:
        ours.controlnets = []


def test_single_file_and_folder_give_the_same_controlnet(nets, tmp_path):
    src = nets["sd35m"] / "diffusion_pytorch_model.safetensors"
    with_config = tmp_path / "a"
    with_config.mkdir()
    shutil.copy(src, with_config / "cn.safetensors")
    shutil.copy(nets["sd35m"] / "config.json", with_config / "config.json")
    bare = tmp_path / "b"
    bare.mkdir()
    shutil.copy(src, bare / "cn.safetensors")
    folder = load_controlnet(nets["sd35m"], mx.float32)
    a = load_controlnet(with_config / "cn.safetensors", mx.float32)
    with pytest.warns(UserWarning, match="no config.json"):
        b = load_controlnet(bare / "cn.safetensors", mx.float32)
    config = json.loads((nets["sd35m"] / "config.json").read_text())
    assert b.config.force_zeros_for_pooled_projection is True  # diffusers' default: not in the shapes
    assert a.config == folder.config
    for field in ("num_layers", "num_attention_heads", "dual_attention_layers", "qk_norm", "pos_embed_max_size"):
        expected = config[field] if field != "dual_attention_layers" else tuple(config[field])
        assert getattr(b.config, field) == expected
    for (ka, va), (kb, vb) in zip(sorted(dict(_flat(folder)).items()), sorted(dict(_flat(b)).items()), strict=True):
        assert ka == kb and np.array_equal(np.asarray(va), np.asarray(vb))


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def test_controlnet_sources_fail_with_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such ControlNet"):
        load_controlnet(tmp_path / "missing")
    with pytest.raises(WeightsError, match="no config.json"):
        load_controlnet(tmp_path)
    with pytest.raises(ModelSourceError, match="offline"):
        load_controlnet("someone/sd35m-controlnet-canny")
    (tmp_path / "x.ckpt").write_bytes(b"\0" * 16)
    with pytest.raises(WeightsError, match="pickle"):
        load_controlnet(tmp_path / "x.ckpt")
    from safetensors.numpy import save_file

    stability = {"controlnet_blocks.0.weight": np.zeros((8, 8), np.float32)}
    stability["transformer_blocks.0.adaLN_modulation.1.weight"] = np.zeros((48, 8), np.float32)
    save_file(stability, tmp_path / "sd3.5_large_controlnet_canny.safetensors")
    with pytest.raises(WeightsError, match="SD3.5 Large ControlNet format"):
        load_controlnet(tmp_path / "sd3.5_large_controlnet_canny.safetensors")
    save_file({"x": np.zeros(2, np.float32)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="not an SD3 ControlNet"):
        load_controlnet(tmp_path / "other.safetensors")


def test_from_pretrained_loads_several_controlnets(tiny_pipeline, nets):
    pipe = StableDiffusion35.from_pretrained(
        tiny_pipeline, dtype="float32", load_t5=False, controlnet=[nets["sd35m"], str(nets["sd35m_b"])]
    )
    assert [n.config.num_layers for n in pipe.controlnets] == [3, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(control_image=[None, None]), "2 image"),
        (dict(control_guidance_start=0.8, control_guidance_end=0.2), "control_guidance_start/end"),
        (dict(controlnet_conditioning_scale=[1.0, 2.0]), "2 values for 1"),
    ],
)
def test_bad_control_arguments_raise_value_error(ours, nets, kwargs, message):
    ours.controlnets = [load_controlnet(nets["instantx"], mx.float32)]
    try:
        kw = dict(control_image=_control(0), height=H, width=W, num_inference_steps=1) | kwargs
        with pytest.raises(ValueError, match=message):
            ours.generate("a cat", **kw)
    finally:
        ours.controlnets = []
    with pytest.raises(ValueError, match="needs a ControlNet"):
        ours.generate("a cat", control_image=_control(0), height=H, width=W, num_inference_steps=1)


def test_quantized_controlnet_stays_close(ours, nets):
    import mlx.nn as nn

    net = ours.load_controlnet(nets["sd35m"], quantize=8, quantize_group_size=32)
    ours.controlnets = []
    full = load_controlnet(nets["sd35m"], mx.float32)
    assert isinstance(net.transformer_blocks[0].attn.to_q, nn.QuantizedLinear)
    assert isinstance(net.controlnet_blocks[0], nn.QuantizedLinear)
    assert isinstance(net.time_text_embed.timestep_embedder.linear_1, nn.Linear)  # kept in full precision
    rng = np.random.default_rng(0)
    args = [mx.array(rng.standard_normal(s, dtype=np.float32)) for s in ((1, 8, 12, 16), (1, 8, 12, 16), (1, 7, 128))]
    pooled = mx.array(rng.standard_normal((1, 96), dtype=np.float32))
    a = net(*args[:2], 1.0, args[2], pooled, 500.0)
    b = full(*args[:2], 1.0, args[2], pooled, 500.0)
    for x, y in zip(a, b, strict=True):
        rel = float(mx.abs(x - y).max() / mx.abs(y).max())
        assert rel < 0.05, f"8-bit ControlNet residual off by {rel:.3f} of its range"


def test_controlnet_without_context_stream_matches_diffusers_model(tmp_path):
    """Stability's SD3.5 Large ControlNet layout in diffusers: no context_embedder (image-only blocks) and the
    transformer's patch embedding (use_pos_embed=False)."""
    from diffusers.models.embeddings import PatchEmbed as RefPatchEmbed

    from scripts.build_fixture import _randomise_
    from sd35m_mlx.models.embeddings import PatchEmbed

    torch.manual_seed(0)
    ref = RefControlNet(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=None, caption_projection_dim=32, pooled_projection_dim=96, pos_embed_max_size=None,
        use_pos_embed=False, extra_conditioning_channels=1,
    )  # fmt: skip
    _randomise_(ref, 0, salt=7).save_pretrained(tmp_path / "cn", safe_serialization=True)
    ref_embed = _randomise_(RefPatchEmbed(32, 32, 2, 16, 32, pos_embed_max_size=24), 0, salt=8).eval()
    embed = PatchEmbed(16, 32, 2, 24)
    w = ref_embed.proj.weight.detach().permute(0, 2, 3, 1).numpy()
    embed.load_weights(
        [
            ("proj.weight", mx.array(w)),
            ("proj.bias", mx.array(ref_embed.proj.bias.detach().numpy())),
            ("pos_embed", mx.array(ref_embed.pos_embed.numpy())),
        ]
    )
    net = load_controlnet(tmp_path / "cn", mx.float32)
    assert not net.joint and "pos_embed" not in net
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 8, 12, 16), dtype=np.float32)
    cond = rng.standard_normal((1, 8, 12, 17), dtype=np.float32)
    pooled = rng.standard_normal((1, 96), dtype=np.float32)
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    with torch.no_grad():
        expected = ref(
            ref_embed(nchw(x)), nchw(cond), 0.5, None, torch.from_numpy(pooled), torch.tensor([400.0])
        ).controlnet_block_samples
    got = net(mx.array(x), mx.array(cond), 0.5, None, mx.array(pooled), 400.0, patch_embed=embed)
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, rtol_of_std=1e-4, what="block residual")  # as in the test with context above


def test_skip_layer_guidance_pass_gets_the_cond_half_of_the_residuals(ours, nets, monkeypatch):
    """diffusers' ControlNet pipeline has no SLG; ours runs the skip pass (cond batch only) with the cond half
    of the residuals, added after every block as diffusers' transformer does, skipped blocks included."""
    ours.controlnets = [load_controlnet(nets["sd35m"], mx.float32)]
    seen = []
    real = type(ours.transformer).denoise

    def record(self, x, context, mods, skip_layers=None, pos=None, block_residuals=None):
        seen.append((x.shape[0], skip_layers, [r.shape[0] for r in block_residuals or []]))
        return real(self, x, context, mods, skip_layers, pos=pos, block_residuals=block_residuals)

    monkeypatch.setattr(type(ours.transformer), "denoise", record)
    kw = dict(height=H, width=W, num_inference_steps=4, seed=0, output_type="np", control_image=_control(5))
    slg = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.1, skip_layer_guidance_stop=0.6)
    try:
        with_slg = ours.generate("a barn", **kw, **slg)
        without = ours.generate("a barn", **kw)
    finally:
        ours.controlnets = []
    skip_calls = [s for s in seen if s[1]]
    assert len(skip_calls) == 2 and all(b == 1 and res == [1, 1, 1] for b, _, res in skip_calls)
    assert all(res == [2, 2, 2] for b, skip, res in seen if not skip)
    assert np.abs(with_slg - without).max() > 1e-2
