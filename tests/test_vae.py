"""AutoencoderKL parity with diffusers (same safetensors files) and its memory-saving paths."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from parity import assert_close

from scripts.build_fixture import VAE
from sd35m_mlx.loading.safetensors_io import WeightsError
from sd35m_mlx.loading.vae import load_vae
from sd35m_mlx.models import vae_blocks
from sd35m_mlx.models.vae import VAEConfig

# float32 on both sides; the only differences are summation order in convs, matmuls and GroupNorm
# reductions (~1e-6 relative). 1e-4 x std leaves headroom while a wrong padding, transpose or norm
# fails by > 1e-2.
REL_TOL = 1e-4


def _sd3_like_vae(seed=0) -> TorchAutoencoderKL:
    """SD3's VAE architecture at toy width (the tiny fixture's config: 4 levels, 16 latent channels, no quant
    convs), with its own weights."""
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(**VAE).eval()
    with torch.no_grad():  # default init leaves norms at identity and biases at 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    _sd3_like_vae().save_pretrained(folder)
    return folder


def _nhwc(t: torch.Tensor) -> mx.array:
    return mx.array(t.permute(0, 2, 3, 1).numpy())


def _nchw(a: mx.array) -> np.ndarray:
    return np.array(a).transpose(0, 3, 1, 2)


def _check_encode(folder):
    ref_model = TorchAutoencoderKL.from_pretrained(folder).eval()
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1  # non-square
    with torch.no_grad():
        dist = ref_model.encode(images).latent_dist
    mean, logvar = load_vae(folder).encode_moments(_nhwc(images))
    assert_close(_nchw(mean), dist.mean, rtol_of_std=REL_TOL, min_std=0.1, what="mean")
    assert_close(_nchw(logvar), dist.logvar, rtol_of_std=REL_TOL, min_std=0.1, what="logvar")


def _check_decode(folder):
    ref_model = TorchAutoencoderKL.from_pretrained(folder).eval()
    z = torch.randn(2, ref_model.config.latent_channels, 5, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ref_model.decode(z).sample.numpy()
    assert_close(_nchw(load_vae(folder).decode(_nhwc(z))), ref, rtol_of_std=REL_TOL, min_std=0.1, what="decode")


def test_encode_matches_diffusers(vae_folder):
    _check_encode(vae_folder)


def test_decode_matches_diffusers(vae_folder):
    _check_decode(vae_folder)


def test_banded_convs_and_chunked_attention_match_diffusers(vae_folder, monkeypatch):
    # Thresholds this low split every 3x3 conv into bands of one or two rows and the mid-block
    # attention into single-query chunks: the paths large images take, on toy sizes.
    monkeypatch.setattr(vae_blocks, "_MAX_UNFOLD", 1)
    monkeypatch.setattr(vae_blocks, "_MAX_SCORES", 1)
    _check_encode(vae_folder)
    _check_decode(vae_folder)


def test_tiny_pipeline_vae_matches_diffusers(request):
    try:
        folder = request.getfixturevalue("tiny_pipeline") / "vae"
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py has no tiny_pipeline fixture yet")
    _check_encode(folder)
    _check_decode(folder)


def test_bfloat16_decode_stays_close_to_float32(vae_folder):
    z = mx.random.normal((1, 5, 7, 16), key=mx.random.key(4))
    ref = np.array(load_vae(vae_folder).decode(z))
    out = load_vae(vae_folder, mx.bfloat16).decode(z.astype(mx.bfloat16))
    assert out.dtype == mx.bfloat16
    # bfloat16 keeps 8 mantissa bits (~4e-3 relative per rounding) over ~30 layers: on this model
    # diffusers in bfloat16 is off by 2% of std (RMS), and so are we; 5% catches real bugs.
    err = np.sqrt(np.mean((np.array(out.astype(mx.float32)) - ref) ** 2))
    assert err <= 0.05 * ref.std(), f"RMS error {err:.3g} vs std {ref.std():.3g}"


def test_latent_sampling_and_scaling_follow_diffusers(vae_folder):
    vae = load_vae(vae_folder)
    g = torch.Generator().manual_seed(3)
    moments, noise = torch.randn(1, 32, 3, 4, generator=g), torch.randn(1, 16, 3, 4, generator=g)
    dist = DiagonalGaussianDistribution(moments * 20)  # large enough to hit the logvar clamp
    mean, logvar = mx.split(_nhwc(moments * 20), 2, axis=-1)
    sample = vae.sample_latents(mean, mx.clip(logvar, -30.0, 20.0), _nhwc(noise))
    np.testing.assert_allclose(_nchw(sample), (dist.mean + dist.std * noise).numpy(), rtol=1e-6)

    z = _nhwc(noise)
    np.testing.assert_allclose(np.array(vae.scale_latents(z)), (np.array(z) - 0.0609) * 1.5305, rtol=1e-6)
    np.testing.assert_allclose(np.array(vae.unscale_latents(vae.scale_latents(z))), np.array(z), atol=1e-6)


def test_config_reads_sd3_vae_json_and_rejects_other_architectures():
    sd3 = {  # stabilityai/stable-diffusion-3.5-medium vae/config.json
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.31.0.dev0",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 16,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": 2,
        "mid_block_add_attention": True,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 1024,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    }
    assert VAEConfig.from_dict(sd3) == VAEConfig()
    with pytest.raises(ValueError, match="up_block_types"):
        VAEConfig.from_dict({**sd3, "up_block_types": ["AttnUpDecoderBlock2D"] * 4})


def test_load_vae_names_a_missing_key(vae_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    weights = load_file(vae_folder / "diffusion_pytorch_model.safetensors")
    del weights["decoder.mid_block.attentions.0.to_q.weight"]
    save_file(weights, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((vae_folder / "config.json").read_text())
    with pytest.raises(WeightsError, match="decoder.mid_block.attentions.0.to_q.weight"):
        load_vae(tmp_path)
