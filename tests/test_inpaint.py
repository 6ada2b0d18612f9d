"""Inpainting (`generate(image=..., mask_image=...)`) against diffusers' StableDiffusion3InpaintPipeline."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3InpaintPipeline
from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_inpaint as diffusers_inpaint
from parity import assert_close
from PIL import Image

from sd35m_mlx.images import from_pil_or_array

# float32 both sides, same weights, same initial noise and the VAE posterior mean on both sides: the
# differences are float rounding carried through the steps (~1e-5). Latents: 1e-4 absolute (their
# std is ~1). Pixels: 2e-3 on [0, 1] is half a uint8 level; a wrong blend sigma or mask moves them >1e-2.
LATENT_TOL = 1e-4
PIXEL_TOL = 2e-3
H, W = 64, 96  # non-square; latents 8 x 12


@pytest.fixture(scope="module")
def ref(tiny_pipeline):
    return StableDiffusion3InpaintPipeline.from_pretrained(tiny_pipeline, dtype=torch.float32)


def _noise(h=H, w=W, seed=0):
    return np.random.default_rng(seed).standard_normal((1, h // 8, w // 8, 16), dtype=np.float32)


def _image(h=H, w=W, seed=1):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _soft_mask(h=H, w=W):
    """A soft (grey-level) mask: a horizontal ramp 0..1 inside a box, so binarisation at 0.5 matters."""
    m = np.zeros((h, w), np.float32)
    m[h // 4 : 3 * h // 4, w // 6 : 5 * w // 6] = np.linspace(0.0, 1.0, 5 * w // 6 - w // 6)[None]
    return Image.fromarray((m * 255).round().astype(np.uint8), "L")


@pytest.fixture
def same_noise(monkeypatch):
    """diffusers samples its own noise and the VAE posterior: use ours and the posterior mean."""

    def use(noise):
        latents = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous()
        monkeypatch.setattr(diffusers_inpaint, "randn_tensor", lambda shape, **_: latents.clone())
        real = diffusers_inpaint.retrieve_latents
        monkeypatch.setattr(
            diffusers_inpaint,
            "retrieve_latents",
            lambda out, generator=None, sample_mode="sample": real(out, sample_mode="argmax"),
        )

    return use


def _patch_decode_shift(monkeypatch, ref, seen=None):
    """diffusers' inpaint decode omits the VAE shift factor (diffusers issue #13611): decode as its other
    SD3 pipelines do, latents / scale + shift. `seen` collects what the pipeline handed to decode."""
    real, shift = ref.vae.decode, ref.vae.config.shift_factor

    def decode(z, *a, **k):
        if seen is not None:
            seen.append(z)
        return real(z + shift, *a, **k)

    monkeypatch.setattr(ref.vae, "decode", decode)


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpaint_latents_match_diffusers(ours, ref, same_noise, strength):
    noise, image, mask = _noise(), _image(), _soft_mask()
    same_noise(noise)
    kw = dict(height=H, width=W, num_inference_steps=5, guidance_scale=4.5, strength=strength)
    lat = np.asarray(ours.generate("a bowl", image=image, mask_image=mask, latents=noise, output_type="latent", **kw))
    ref_lat = ref("a bowl", image=image, mask_image=mask, output_type="latent", **kw).images
    ref_lat = ref_lat.permute(0, 2, 3, 1).numpy()
    assert_close(lat, ref_lat, atol=LATENT_TOL, what="latents")

    # the kept region is the clean image latents after the last step; the repainted region is not
    z = np.asarray(ours.vae.scale_latents(ours.vae.encode(from_pil_or_array(image, H, W))))
    repaint = np.asarray(mask)[::8, ::8] >= 128
    assert np.abs(lat[0][~repaint] - z[0][~repaint]).max() < 1e-6
    assert np.abs(lat[0][repaint] - z[0][repaint]).max() > 0.1


def test_inpaint_pixels_match_diffusers_with_its_decode_shift_fixed(ours, ref, same_noise, monkeypatch):
    noise, image, mask = _noise(seed=2), _image(seed=5), _soft_mask()
    same_noise(noise)
    seen = []
    _patch_decode_shift(monkeypatch, ref, seen)
    kw = dict(height=H, width=W, num_inference_steps=4, guidance_scale=4.5, strength=0.7, output_type="np")
    out = ours.generate("a bowl", image=image, mask_image=mask, latents=noise, **kw)
    ref_out = ref("a bowl", image=image, mask_image=mask, **kw).images
    assert_close(out, ref_out, atol=PIXEL_TOL, min_std=0.02, what="pixels")
    # diffusers as released (no shift) gives other pixels: a difference on purpose
    with torch.no_grad():
        buggy = ref.image_processor.postprocess(_decode_without_shift(ref.vae, seen[0]), output_type="np")
    assert np.abs(out - buggy).max() > 1e-2, "diffusers' decode without the shift factor should differ from ours"


def _decode_without_shift(vae, z):
    """The pipeline's own decode call as released: latents / scale, no shift."""
    return type(vae).decode(vae, z, return_dict=False)[0]


def test_padding_mask_crop_matches_diffusers(ours, ref, same_noise, monkeypatch):
    """A 160x112 picture with a small soft mask: the crop around it (padded by 8 px, widened to 96:64) is
    generated at 96x64 and pasted back. Both sides produce 8-bit images (diffusers' overlay works on PIL
    images), and the paste-back resizes the crop with Lanczos: float rounding may flip a uint8 level,
    which the resize may spread to 2 levels; a wrong crop box or overlay moves pixels by tens of levels."""
    image = _image(112, 160, seed=3)
    m = np.zeros((112, 160), np.uint8)
    m[40:70, 60:100] = np.linspace(0, 255, 40).astype(np.uint8)[None]
    mask = Image.fromarray(m, "L")
    noise = _noise(seed=4)
    same_noise(noise)
    _patch_decode_shift(monkeypatch, ref)
    kw = dict(height=H, width=W, num_inference_steps=4, guidance_scale=4.5, strength=0.8, padding_mask_crop=8)
    out = ours.generate("a cat", image=image, mask_image=mask, latents=noise, **kw)[0]
    ref_out = ref("a cat", image=image, mask_image=mask, **kw).images[0]
    assert out.size == ref_out.size == (160, 112)
    a, b = np.asarray(out, np.int16), np.asarray(ref_out, np.int16)
    assert np.abs(a - b).max() <= 2, f"max abs difference {np.abs(a - b).max()} uint8 levels > 2"
    outside = np.asarray(mask) == 0
    assert np.array_equal(a[outside], np.asarray(image, np.int16)[outside]), "the original must show outside"
    assert np.abs(a[~outside] - np.asarray(image, np.int16)[~outside]).max() > 20


def test_all_white_mask_is_img2img(ours):
    kw = dict(height=H, width=W, num_inference_steps=4, strength=0.6, seed=2, output_type="np")
    image = _image()
    a = ours.generate("a lake", image=image, mask_image=Image.new("L", (W, H), 255), **kw)
    b = ours.generate("a lake", image=image, **kw)
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask_image=Image.new("L", (W, H), 0)), "all black"),
        (dict(mask_image=Image.new("L", (W, H), 255), image=None), "mask_image needs image"),
        (dict(mask_image=Image.new("L", (W, H), 255), padding_mask_crop=-1), "padding_mask_crop"),
        (dict(mask_image=np.zeros((2, 3, 4, 5))), "mask_image array"),
    ],
)
def test_bad_inpaint_arguments_raise_value_error(ours, kwargs, message):
    kw = dict(image=_image(), height=H, width=W, num_inference_steps=1) | kwargs
    with pytest.raises(ValueError, match=message):
        ours.generate("a cat", **kw)


def test_mask_of_another_size_is_resized(ours):
    kw = dict(height=H, width=W, num_inference_steps=2, strength=0.6, seed=2, output_type="latent")
    small = _soft_mask().resize((W // 2, H // 2), Image.Resampling.NEAREST)
    out = ours.generate("a lake", image=_image(), mask_image=small, **kw)
    assert out.shape == (1, H // 8, W // 8, 16)


def test_outpaint_helper_end_to_end_keeps_the_original_inside(ours):
    from sd35m_mlx.editing.outpaint import outpaint

    image = _image(48, 64, seed=6)
    job = outpaint(image, (16, 0, 16, 16), fill="blur", feather=8)
    kw = dict(num_inference_steps=2, strength=1.0, seed=3)
    result = ours.generate("a wide landscape", image=job.image, mask_image=job.mask, **kw)
    (final,) = job.composite(result)
    assert final.size == (96, 64)
    a = np.asarray(final)
    assert np.array_equal(a[:40, 24:72], np.asarray(image)[:40, 8:56])
    assert np.abs(a[:, :16].astype(int) - np.asarray(job.image)[:, :16]).max() > 10
