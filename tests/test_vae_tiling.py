"""Tiled VAE decode/encode (models/vae_tiling.py) and the pipeline's tiling switch (pipeline/tiling.py)."""

import mlx.core as mx
import numpy as np
import pytest

from sd35m_mlx.loading.vae import load_vae
from sd35m_mlx.models import vae_tiling as vt

# Tolerances below come from the tiny fixture VAE (random weights, 16-32 channels, float32), measured:
# tiles of 8 latent px with 4 px overlap decode at 37.9 dB PSNR against the untiled decode (encode 35.7).
# A random toy VAE amplifies the zero padding at tile borders far more than the real one (the full-size
# SD3 VAE's figures are in benchmarks/README.md); a wrong blend or misplaced tile drops below 20 dB.
MIN_PSNR_DB = 33.0


def _psnr(a: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10((ref.max() - ref.min()) ** 2 / np.mean((a - ref) ** 2)))


@pytest.fixture(scope="module")
def vae(tiny_pipeline):
    return load_vae(tiny_pipeline / "vae")


def _latent(two_tone: bool = False) -> mx.array:
    z = np.random.default_rng(0).standard_normal((1, 16, 24, 16)).astype(np.float32)
    if two_tone:  # the left part flat and brighter: per-tile statistics then differ from the image's
        z[:, :, :8] = z[:, :, :8] * 0.2 + 1.0
    return mx.array(z)


def _image(two_tone: bool = False) -> mx.array:
    x = np.random.default_rng(1).uniform(-1, 1, (1, 128, 192, 3)).astype(np.float32)
    if two_tone:
        x[:, :, :64] = 0.1 * x[:, :, :64] + 0.5
    return mx.array(x)


@pytest.mark.parametrize("size,tile,overlap", [(24, 8, 4), (32, 8, 2), (100, 64, 16), (64, 64, 16), (65, 64, 16)])
def test_tiles_cover_the_axis_overlap_enough_and_own_a_partition(size, tile, overlap):
    spans = vt.tile_spans(size, tile, overlap)
    assert spans[0].start == 0 and spans[-1].end == size
    assert all(s.end - s.start == min(tile, size) for s in spans)
    assert all(a.end - b.start >= overlap for a, b in zip(spans, spans[1:], strict=False))
    assert [s.core_start for s in spans[1:]] == [s.core_end for s in spans[:-1]]
    assert spans[0].core_start == 0 and spans[-1].core_end == size
    assert all(s.start <= s.core_start < s.core_end <= s.end for s in spans)


def test_blend_weights_are_smooth_and_never_zero():
    spans = vt.tile_spans(40, 16, 4)
    w = vt.blend_weights(spans, 1, 8)
    assert w.min() > 0 and w.max() == 1 and np.all(np.abs(np.diff(w)) < 0.1)


@pytest.mark.parametrize("tile, overlap", [(8, 3), (8, 4)])  # 8, 4 on 17 px: three tiles overlap, ramps sum past 1
def test_a_local_network_tiles_exactly(tile, overlap):
    # Steps with no reach beyond a pixel (nearest upsampling, a pointwise map) have no seams: tiling must
    # then reproduce them exactly, which checks tile placement and that blend weights are normalised.
    def upsample(x):
        return mx.repeat(mx.repeat(x, 2, axis=1), 2, axis=2)

    steps = [upsample, lambda x: mx.tanh(x[..., :3] * 2 + 1), upsample]
    x = mx.random.normal((2, 23, 17, 5), key=mx.random.key(0))
    tiled = vt.run_tiled(steps, x, [], in_factor=1, out_factor=4, tile=tile, overlap=overlap)
    full = x
    for step in steps:
        full = step(full)
    np.testing.assert_allclose(np.array(tiled), np.array(full), atol=1e-6)


def test_tiled_decode_is_close_to_untiled_with_several_tiles(vae):
    z = _latent()
    assert len(vt.tile_spans(16, 8, 4)) == 3 and len(vt.tile_spans(24, 8, 4)) == 5
    ref = np.array(vae.decode(z))
    tiled = np.array(vt.decode_tiled(vae, z, tile=8, overlap=4))
    assert tiled.shape == ref.shape == (1, 128, 192, 3)
    assert _psnr(tiled, ref) >= MIN_PSNR_DB


def test_tiled_encode_is_close_to_untiled_with_several_tiles(vae):
    x = _image()
    ref_mean, ref_logvar = (np.array(a) for a in vae.encode_moments(x))
    mean, logvar = (np.array(a) for a in vt.encode_moments_tiled(vae, x, tile=8, overlap=4))
    assert mean.shape == ref_mean.shape == (1, 16, 24, 16)
    assert _psnr(mean, ref_mean) >= MIN_PSNR_DB and _psnr(logvar, ref_logvar) >= MIN_PSNR_DB


@pytest.mark.parametrize("direction", ["decode", "encode"])
def test_shared_statistics_are_closer_to_untiled_than_per_tile(vae, direction):
    # An image whose parts differ (one flat and bright): each tile's own GroupNorm statistics then differ
    # from the image's and shift its tone. Measured: decode 32.2 vs 30.5 dB, encode 26.5 vs 24.3 dB;
    # equal statistics would give equal figures.
    if direction == "decode":
        x, run, untiled = _latent(two_tone=True), vt.decode_tiled, vae.decode
    else:
        x, run, untiled = _image(two_tone=True), vt.encode_tiled, vae.encode
    ref = np.array(untiled(x))
    shared = _psnr(np.array(run(vae, x, tile=8, overlap=4)), ref)
    per_tile = _psnr(np.array(run(vae, x, tile=8, overlap=4, shared_statistics=False)), ref)
    assert shared >= per_tile + 1.0, f"shared statistics {shared:.1f} dB, per-tile {per_tile:.1f} dB"


def test_one_tile_decodes_and_encodes_exactly(vae):
    z = _latent()[:, :8, :8]
    np.testing.assert_array_equal(np.array(vt.decode_tiled(vae, z, 8, 2)), np.array(vae.decode(z)))
    x = _image()[:, :64, :64]
    np.testing.assert_array_equal(np.array(vt.encode_tiled(vae, x, 8, 2)), np.array(vae.encode(x)))


# -- the pipeline --------------------------------------------------------------------------------------


def test_enable_vae_tiling_decodes_in_tiles_close_to_untiled(pipe, capsys):
    kw = dict(height=128, width=192, num_inference_steps=2, seed=3, output_type="np")
    untiled = pipe.generate("a lighthouse", **kw)
    pipe.enable_vae_tiling(64)  # 8 latent px: 2 x 3 tiles
    try:
        tiled = pipe.generate("a lighthouse", **kw)
        tiled_i2i = pipe.generate("a lighthouse", image=untiled[0], strength=0.5, **kw)
    finally:
        pipe.vae_tiling.setting = None
    # 8 latent px tiles at the pipeline's 25% overlap (2 px): measured 30.6 dB
    assert not np.array_equal(tiled, untiled) and _psnr(tiled, untiled) >= 28.0
    assert tiled_i2i.shape == untiled.shape
    assert "tiles" not in capsys.readouterr().err  # asked for: no notice


def test_low_memory_tiles_automatically_with_a_notice(pipe, capsys, monkeypatch):
    z = mx.zeros((1, 72, 16, 16))  # 576 x 128 px: more than one 512 px tile
    monkeypatch.setattr(pipe, "low_memory", True)
    calls = []
    monkeypatch.setattr(vt, "decode_tiled", lambda vae, z, tile, overlap: calls.append((tile, overlap)) or z)
    pipe._decode(z)
    assert calls == [(64, 16)]  # the default tile, 512 px, at 25% overlap
    assert "VAE in 512 px tiles (low_memory)" in capsys.readouterr().err
    pipe._decode(mx.zeros((1, 8, 64, 16)))  # fits in one tile: untiled, no notice
    assert len(calls) == 1 and capsys.readouterr().err == ""
    pipe.disable_vae_tiling()
    try:
        pipe._decode(z)
    finally:
        pipe.vae_tiling.setting = None
    assert len(calls) == 1


@pytest.mark.parametrize("tile_size", [32, 100, "512", 512.0])
def test_enable_vae_tiling_rejects_bad_tile_sizes(pipe, tile_size):
    with pytest.raises(ValueError, match="tile_size"):
        pipe.enable_vae_tiling(tile_size)
