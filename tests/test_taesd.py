"""TAESD3 (diffusers AutoencoderTiny) parity with diffusers, its loaders, and SD3 decoding with it."""

import hashlib
import json
import os

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny as TorchAutoencoderTiny
from diffusers import StableDiffusion3Pipeline
from parity import assert_close
from safetensors.torch import save_file

from scripts.build_fixture import build_taesd
from sd35m_mlx import StableDiffusion35
from sd35m_mlx.images import decode_latents
from sd35m_mlx.loading import hub
from sd35m_mlx.loading.safetensors_io import WeightsError
from sd35m_mlx.loading.taesd import TAESD3_REPO, load_taesd, map_raw_decoder_weights
from sd35m_mlx.models import vae_blocks
from sd35m_mlx.models.taesd import TAESDConfig

# float32 on both sides, same weights: only the summation order inside the convs differs (measured
# ~6e-6 x std). 1e-4 x std leaves headroom, while a wrong clamp, padding, upsampling or skip moves
# outputs by > 1e-1 x std.
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def taesd_folder(tmp_path_factory):
    """Random weights in TAESD3's real (full-size: 64 channels, 16 latent channels) config."""
    return build_taesd(tmp_path_factory.mktemp("taesd") / "taesd3", seed=0)


@pytest.fixture(scope="module")
def ref(taesd_folder):
    return TorchAutoencoderTiny.from_pretrained(taesd_folder).eval()


@pytest.fixture(scope="module")
def our_taesd(taesd_folder):
    return load_taesd(taesd_folder)


def _nhwc(a: np.ndarray) -> mx.array:
    return mx.array(a.transpose(0, 2, 3, 1))


def _nchw(a: mx.array) -> np.ndarray:
    return np.array(a).transpose(0, 3, 1, 2)


def _latents(seed=0, shape=(2, 16, 8, 12)) -> np.ndarray:
    return (1.5 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)  # reaches the tanh clamp


def test_decoder_matches_diffusers(our_taesd, ref):
    z = _latents()
    with torch.no_grad():
        expected = ref.decode(torch.from_numpy(z)).sample.numpy()
    assert_close(_nchw(our_taesd.decode(_nhwc(z))), expected, rtol_of_std=REL_TOL)


def test_encoder_matches_diffusers(our_taesd, ref):
    images = np.random.default_rng(1).uniform(-1, 1, (2, 3, 64, 96)).astype(np.float32)
    with torch.no_grad():
        expected = ref.encode(torch.from_numpy(images)).latents.numpy()
    assert_close(_nchw(our_taesd.encode(_nhwc(images))), expected, rtol_of_std=REL_TOL)


def test_banded_convs_match_diffusers(our_taesd, ref, monkeypatch):
    """At 1024 px the CPU convolutions run in bands of rows; force that path at test size."""
    monkeypatch.setattr(vae_blocks, "_MAX_UNFOLD", 1 << 12)
    z = _latents(seed=2, shape=(1, 16, 8, 8))
    with torch.no_grad():
        expected = ref.decode(torch.from_numpy(z)).sample.numpy()
    assert_close(_nchw(our_taesd.decode(_nhwc(z))), expected, rtol_of_std=REL_TOL)


def test_bfloat16_decode_stays_close_to_float32(taesd_folder, our_taesd):
    z = _nhwc(_latents(seed=3, shape=(1, 16, 8, 8)))
    full = np.array(our_taesd.decode(z))
    half = load_taesd(taesd_folder, mx.bfloat16)
    assert half.decoder.layers[0].weight.dtype == mx.bfloat16
    out = np.array(half.decode(z.astype(mx.bfloat16)).astype(mx.float32))
    assert np.abs(out - full).max() < 0.1 * full.std()  # bfloat16 keeps ~3 significant digits


def test_config_reads_taesd3_json_and_scales_latents_like_the_sd3_pipeline(taesd_folder):
    config = TAESDConfig.from_dict(json.loads((taesd_folder / "config.json").read_text()))
    assert config == TAESDConfig()  # TAESD3's config is the default
    assert (config.latent_channels, config.scaling_factor, config.shift_factor, config.downscale) == (16, 1.0, 0.0, 8)
    assert config.block_out_channels == (64, 64, 64, 64)
    scaled = load_taesd(build_taesd(taesd_folder.parent / "scaled", scaling_factor=1.5305, shift_factor=0.0609))
    x = mx.array([[-1.0, 0.0, 2.0]])
    # StableDiffusion3Pipeline: latents / vae.config.scaling_factor + vae.config.shift_factor
    assert np.allclose(np.array(scaled.unscale_latents(x)), np.array(x) / 1.5305 + 0.0609)
    assert np.allclose(np.array(scaled.scale_latents(scaled.unscale_latents(x))), np.array(x), atol=1e-6)
    with pytest.raises(ValueError, match="upsample_fn"):
        TAESDConfig.from_dict({"upsample_fn": "bilinear"})
    with pytest.raises(ValueError, match="not an AutoencoderTiny"):
        TAESDConfig.from_dict({"_class_name": "AutoencoderKL"})


def _raw_decoder_state_dict(ref: TorchAutoencoderTiny) -> dict[str, torch.Tensor]:
    """madebyollin's raw layout, built by torch itself: his decoder is one nn.Sequential whose
    first module is the parameter-free Clamp, then diffusers' DecoderTiny layers in order."""
    raw = torch.nn.Sequential(torch.nn.Identity(), *ref.decoder.layers)
    return {k: v.contiguous() for k, v in raw.state_dict().items()}


def test_raw_decoder_file_loads_like_the_diffusers_folder(our_taesd, ref, tmp_path):
    state = _raw_decoder_state_dict(ref)
    assert {"1.weight", "3.conv.0.weight", "3.conv.4.bias", "19.weight"} <= state.keys()
    path = tmp_path / "taesd3_decoder.safetensors"
    save_file(state, str(path))
    raw = load_taesd(path)
    assert "encoder" not in raw and raw.config.latent_channels == 16
    z = _nhwc(_latents(seed=4, shape=(1, 16, 8, 8)))
    assert np.array_equal(np.array(raw.decode(z)), np.array(our_taesd.decode(z)))
    with pytest.raises(ValueError, match="without its encoder"):
        raw.encode(mx.zeros((1, 64, 64, 3)))
    assert map_raw_decoder_weights("3.conv.0.weight", z)[0][0] == "decoder.layers.2.conv.0.weight"
    with pytest.raises(KeyError):
        map_raw_decoder_weights("0.weight", z)


def test_diffusers_safetensors_file_loads_without_its_config(our_taesd, taesd_folder, tmp_path):
    lone = tmp_path / "taesd3.safetensors"
    lone.write_bytes((taesd_folder / "diffusion_pytorch_model.safetensors").read_bytes())
    model = load_taesd(lone)
    assert "encoder" in model
    z = _nhwc(_latents(seed=5, shape=(1, 16, 8, 8)))
    assert np.array_equal(np.array(model.decode(z)), np.array(our_taesd.decode(z)))


def test_loading_errors_are_one_clear_line(taesd_folder, ref, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such TAESD folder or file"):
        load_taesd(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="taesd must be"):
        load_taesd(3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        load_taesd(empty)

    pickle_only = tmp_path / "pickle-only"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text((taesd_folder / "config.json").read_text())
    torch.save(ref.state_dict(), pickle_only / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match="pickle checkpoints are never loaded"):
        load_taesd(pickle_only)
    with pytest.raises(WeightsError, match="pickle checkpoints are never loaded"):
        load_taesd(pickle_only / "diffusion_pytorch_model.bin")

    # weights of a 4-latent-channel TAESD (SD1's) under TAESD3's config
    wrong = build_taesd(tmp_path / "wrong", latent_channels=4)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "latent_channels": 16}))
    with pytest.raises(WeightsError, match=r"wrong shape for (en|de)coder\.layers\.\d+\.weight .*, expected"):
        load_taesd(wrong)

    missing = tmp_path / "missing-key.safetensors"
    state = {k: v for k, v in ref.state_dict().items() if k != "decoder.layers.2.conv.2.weight"}
    save_file(state, str(missing))
    with pytest.raises(WeightsError, match=r"missing key decoder\.layers\.2\.conv\.2\.weight"):
        load_taesd(missing)

    encoder_only = tmp_path / "taesd3_encoder.safetensors"
    save_file({k: v.contiguous() for k, v in ref.encoder.layers.state_dict().items()}, str(encoder_only))
    with pytest.raises(WeightsError, match="raw TAESD encoder file"):
        load_taesd(encoder_only)

    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 16}))
    with pytest.raises(WeightsError, match="describes a AutoencoderKL, not an AutoencoderTiny"):
        load_taesd(vae)


def _lay_out_hub_cache(cache, repo_id: str, files: dict[str, bytes]):
    """The HF cache layout (blobs, snapshots/<commit>/ symlinks, refs/main), as huggingface_hub writes it."""
    commit = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_loads_from_the_cache_and_offline_miss_says_what_to_do(our_taesd, taesd_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # conftest already sets HF_HUB_OFFLINE
    miss = r"madebyollin/taesd3 is not in the Hugging Face cache .*offline"
    with pytest.raises(hub.ModelSourceError, match=miss) as e:
        load_taesd(TAESD3_REPO)
    assert "--taesd" in str(e.value) and "diffusers-layout" not in str(e.value)  # TAESD's way out, not a model's

    names = ("config.json", "diffusion_pytorch_model.safetensors")
    _lay_out_hub_cache(cache, TAESD3_REPO, {n: (taesd_folder / n).read_bytes() for n in names})
    model = load_taesd(TAESD3_REPO)
    z = _nhwc(_latents(seed=6, shape=(1, 16, 8, 8)))
    assert np.array_equal(np.array(model.decode(z)), np.array(our_taesd.decode(z)))


# --- the whole pipeline decoding with TAESD, against diffusers' SD3 pipeline with vae=AutoencoderTiny ---

# As tests/test_pipeline.py: float32, same weights and noise; 2e-3 on the [0, 1] scale is half a uint8 level.
PIXEL_TOL = 2e-3
H, W = 64, 96


def test_generate_then_decode_with_taesd_matches_diffusers_with_autoencoder_tiny(tiny_pipeline, tmp_path):
    # SD3's VAE scaling instead of TAESD3's identity, so a scaling mistake cannot hide
    folder = build_taesd(tmp_path / "taesd", seed=1, scaling_factor=1.5305, shift_factor=0.0609)
    ref_taesd = TorchAutoencoderTiny.from_pretrained(folder).eval()
    ref = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline, vae=ref_taesd, dtype=torch.float32)
    pipe = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32")
    taesd = load_taesd(folder)

    noise = np.random.default_rng(7).standard_normal((1, H // 8, W // 8, 16), dtype=np.float32)
    kw = dict(height=H, width=W, num_inference_steps=3, guidance_scale=4.5)
    x = pipe.generate("a lighthouse at dusk", latents=noise, output_type="latent", **kw)
    out = np.array(decode_latents(taesd, x, taesd.dtype))
    expected = ref(
        "a lighthouse at dusk", latents=torch.from_numpy(noise).permute(0, 3, 1, 2), output_type="np", **kw
    ).images
    assert out.shape == (1, H, W, 3)
    assert_close(out, expected, atol=PIXEL_TOL, min_std=0.02, what="pixels")


def test_bench_taesd_runs_and_agrees_with_diffusers(tiny_pipeline, taesd_folder, our_taesd, tmp_path):
    """benchmarks/bench_taesd.py keeps running (timings here mean nothing): both sides decode the same latents."""
    from benchmarks import bench_taesd
    from benchmarks.bench_speed import TorchRunner
    from sd35m_mlx.loading.vae import load_vae

    args = bench_taesd.parse_args(["--sizes", "64", "--repeats", "1", "--json", str(tmp_path / "taesd.json")])
    args.device = "cpu"
    folders = {"taesd": taesd_folder, "vae": tiny_pipeline / "vae"}
    r = bench_taesd.bench_size(64, our_taesd, load_vae(folders["vae"]), folders, args, TorchRunner(isolate=False))
    assert r["max_abs_pixel_err"] < PIXEL_TOL
    assert r["taesd"]["s"] > 0 and r["vae"]["work_gib"] > 0 and r["taesd_over_vae_s"] > 0
    bench_taesd.print_report({"dtype": "float32", "device": "cpu", "sizes": [r]})
