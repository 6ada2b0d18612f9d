"""MMDiT parity with diffusers' SD3Transformer2DModel, loaded from the same safetensors files."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel as TorchSD3Transformer
from parity import assert_close

from scripts.build_fixture import build_transformer
from sd35m_mlx.loading.transformer import load_transformer

# float32 on both sides; the only differences are summation order in matmuls and attention
# (~1e-6 relative). 1e-4 x std leaves headroom while any wrong sign, order or crop fails by >1e-1.
REL_TOL = 1e-4


def _inputs(cfg, batch=2, height=12, width=16, ctx_len=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], height, width, generator=g)
    ctx = torch.randn(batch, ctx_len, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, cfg["pooled_projection_dim"], generator=g)
    t = torch.tensor([937.5, 12.25][:batch])  # a different (non-integer) timestep per element
    return x, ctx, pooled, t


def _run_both(folder, skip_layers=None, **shape):
    ref_model = TorchSD3Transformer.from_pretrained(folder).eval()
    cfg = dict(ref_model.config)
    x, ctx, pooled, t = _inputs(cfg, **shape)
    with torch.no_grad():
        ref = ref_model(x, ctx, pooled, t, skip_layers=skip_layers).sample.numpy()
    ours = load_transformer(folder)
    out = ours(
        mx.array(x.permute(0, 2, 3, 1).numpy()),
        mx.array(ctx.numpy()),
        mx.array(pooled.numpy()),
        mx.array(t.numpy()),
        skip_layers=skip_layers,
    )
    return np.array(out).transpose(0, 3, 1, 2), ref


@pytest.fixture(scope="module")
def sd35m_transformer(tiny_pipeline):
    return tiny_pipeline / "transformer"


def test_fixture_exercises_every_branch(sd35m_transformer):
    model = load_transformer(sd35m_transformer)
    cfg = model.config
    assert cfg.qk_norm == "rms_norm" and 0 < len(cfg.dual_attention_layers) < cfg.num_layers
    assert cfg.pos_embed_max_size * cfg.patch_size > 16, "pos table must be larger than test latents"
    assert model.transformer_blocks[-1].context_pre_only


def test_sd35_medium_matches_diffusers_nonsquare_batch(sd35m_transformer):
    out, ref = _run_both(sd35m_transformer, height=12, width=16)
    assert_close(out, ref, rtol_of_std=REL_TOL, min_std=0.1)


def test_odd_patch_grid_crop_matches_diffusers(sd35m_transformer):
    # 5 x 3 patches: an odd crop offset inside the table
    out, ref = _run_both(sd35m_transformer, batch=1, height=10, width=6, ctx_len=4)
    assert_close(out, ref, rtol_of_std=REL_TOL, min_std=0.1)


@pytest.mark.parametrize("skip", [[1], [0, 2], [3]], ids=["dual", "two", "context-pre-only"])
def test_skip_layers_match_diffusers(sd35m_transformer, tiny_pipeline, skip):
    skip = [i for i in skip if i < len(load_transformer(sd35m_transformer).transformer_blocks)]
    out, ref = _run_both(sd35m_transformer, skip_layers=skip)
    assert_close(out, ref, rtol_of_std=REL_TOL, min_std=0.1)
    full, _ = _run_both(sd35m_transformer)
    assert np.abs(full - out).max() > 1e-2, "skipping blocks must change the output"


@pytest.mark.parametrize(
    "overrides",
    [
        dict(dual_attention_layers=(), qk_norm=None),  # SD3 Medium
        dict(dual_attention_layers=(), qk_norm="rms_norm"),  # SD3.5 Large
    ],
    ids=["sd3-medium", "sd35-large"],
)
def test_other_sd3_configs_match_diffusers(tmp_path, overrides):
    folder = build_transformer(tmp_path / "transformer", seed=3, **overrides)
    out, ref = _run_both(folder, skip_layers=[1])
    assert_close(out, ref, rtol_of_std=REL_TOL, min_std=0.1)


def test_latent_larger_than_pos_table_is_rejected(sd35m_transformer):
    model = load_transformer(sd35m_transformer)
    m = model.config.pos_embed_max_size * model.config.patch_size
    cfg = model.config
    with pytest.raises(ValueError, match="positional table"):
        model(
            mx.zeros((1, m + 2, 4, cfg.in_channels)),
            mx.zeros((1, 3, cfg.joint_attention_dim)),
            mx.zeros((1, cfg.pooled_projection_dim)),
            500.0,
        )


def test_schedule_modulations_match_plain_forward(sd35m_transformer):
    """The sampler's precomputed path (context, adaLN vectors, pos crop) equals the plain call."""
    model = load_transformer(sd35m_transformer)
    cfg = model.config
    x, ctx, pooled, _ = (mx.array(a.numpy()) for a in _inputs(dict(vars(cfg))))
    x = x.transpose(0, 2, 3, 1)
    timesteps = mx.array([999.0, 640.5, 3.0])
    mods = model.schedule_modulations(timesteps, pooled)
    context = model.context_embedder(ctx)
    pos = model.pos_embed.cropped_pos_embed(x.shape[1] // 2, x.shape[2] // 2)
    for i, t in enumerate(timesteps.tolist()):
        expected = model(x, ctx, pooled, t, skip_layers=[2])
        got = model.denoise(x, context, mods[i], skip_layers=[2], pos=pos)
        assert_close(got, expected, rtol_of_std=1e-5, what=f"denoise at t={t}")


def test_released_modulation_weights_leave_denoise_unchanged(sd35m_transformer):
    model = load_transformer(sd35m_transformer)
    cfg = model.config
    x, ctx, pooled, _ = (mx.array(a.numpy()) for a in _inputs(dict(vars(cfg))))
    x = x.transpose(0, 2, 3, 1)
    mods = model.schedule_modulations(mx.array([500.0]), pooled)[0]
    context = model.context_embedder(ctx)
    before = model.denoise(x, context, mods)
    mx.eval(before, mods)
    released = model.release_modulation_weights()
    expected = sum(
        v.nbytes
        for b in load_transformer(sd35m_transformer).transformer_blocks
        for v in (
            b.norm1.linear.weight,
            b.norm1.linear.bias,
            b.norm1_context.linear.weight,
            b.norm1_context.linear.bias,
        )
    )
    assert released > expected  # plus the final layer's adaLN and the embedders
    assert "norm1" not in model.transformer_blocks[0]
    assert mx.array_equal(model.denoise(x, context, mods), before)
