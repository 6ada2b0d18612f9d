"""LoRA training math against diffusers' train_dreambooth_lora_sd3.py recipe, in torch, on the tiny fixture:
the same weights, LoRA factors, latents, noise and timesteps; loss and LoRA gradients compared."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.training_utils import compute_loss_weighting_for_sd3
from mlx.utils import tree_flatten

from sd35m_mlx.training import Recipe, TrainableLora, resolve_targets, sample_sigmas
from sd35m_mlx.training.lora_params import checkpoint_blocks, uncheckpoint_blocks
from sd35m_mlx.training.staged import staged_loss_and_grads
from sd35m_mlx.training.step import Batch, loss_and_grads

# float32 on both sides through 4 blocks: the loss agrees to ~1e-6 relative; gradients to ~4e-5 of their
# largest entry (summation order in attention and matmuls). A recipe error (no preconditioning, sigma
# reversed, wrong table index) moves the loss by >10% and the gradients by O(1) of their size.
LOSS_RTOL = 1e-5
GRAD_TOL = 2e-4  # relative to each tensor's max abs gradient
RANK, ALPHA = 4, 8.0
U = np.array([0.3, 0.8], dtype=np.float32)  # fixed timestep-density draws (diffusers' u)


@pytest.fixture(scope="module")
def inputs(ours):
    c = ours.transformer.config
    rng = np.random.default_rng(0)
    b, h, w = len(U), 8, 12
    return dict(
        x0=rng.standard_normal((b, h, w, c.in_channels), dtype=np.float32),
        noise=rng.standard_normal((b, h, w, c.in_channels), dtype=np.float32),
        enc=rng.standard_normal((b, 7, c.joint_attention_dim), dtype=np.float32),
        pooled=rng.standard_normal((b, c.pooled_projection_dim), dtype=np.float32),
    )


def _random_lora(ours, targets="attention,mlp,adaln", seed=3):
    """Zero-init B would make A's gradient zero: give B random values so both factors are checked."""
    lora = TrainableLora(ours.transformer, resolve_targets(ours.transformer, targets), RANK, ALPHA, seed=seed)
    rng = np.random.default_rng(seed)
    for f in lora.params.values():
        f["lora_B"] = mx.array(rng.standard_normal(f["lora_B"].shape, dtype=np.float32) * 0.05)
    lora.bind(lora.params)
    return lora


def _ours(ours, lora, inputs, recipe):
    sigmas, timesteps = sample_sigmas(U, ours.schedule)
    batch = Batch(mx.array(inputs["x0"]), mx.array(inputs["enc"]), mx.array(inputs["pooled"]))
    loss, grads = loss_and_grads(lora, ours.transformer, batch, mx.array(inputs["noise"]), sigmas, timesteps, recipe)
    mx.eval(loss, grads)
    return float(loss), {k: np.array(v) for k, v in tree_flatten(grads)}


def _diffusers(tiny_pipeline, lora, inputs, recipe):
    """The loss block of diffusers' train_dreambooth_lora_sd3.py, on a peft LoRA with our factors."""
    from peft import LoraConfig

    transformer = SD3Transformer2DModel.from_pretrained(tiny_pipeline, subfolder="transformer", dtype=torch.float32)
    transformer.requires_grad_(False)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=list(lora.params))
    transformer.add_adapter(config)
    params = dict(transformer.named_parameters())
    with torch.no_grad():
        for path, f in lora.params.items():
            for name in ("lora_A", "lora_B"):
                params[f"{path}.{name}.default.weight"].copy_(torch.from_numpy(np.array(f[name])))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_pipeline, subfolder="scheduler")

    def nchw(a):
        return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()

    model_input, noise = nchw(inputs["x0"]), nchw(inputs["noise"])
    # --- as the script: indices from u, timesteps from the table, get_sigmas, noising, loss ---
    indices = (torch.from_numpy(U) * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten().reshape(-1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    model_pred = transformer(
        hidden_states=noisy_model_input,
        timestep=timesteps,
        encoder_hidden_states=torch.from_numpy(inputs["enc"]),
        pooled_projections=torch.from_numpy(inputs["pooled"]),
        return_dict=False,
    )[0]
    if recipe.precondition_outputs:
        model_pred = model_pred * (-sigmas) + noisy_model_input
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=recipe.weighting_scheme, sigmas=sigmas)
    target = model_input if recipe.precondition_outputs else noise - model_input
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    loss = loss.mean()
    loss.backward()
    loss = loss.detach()
    grads = {}
    for path in lora.params:
        for name in ("lora_A", "lora_B"):
            grads[f"{path}.{name}"] = params[f"{path}.{name}.default.weight"].grad.numpy()
    return float(loss), grads


def _compare(ours_result, ref_result):
    loss, grads = ours_result
    ref_loss, ref_grads = ref_result
    assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss), f"loss {loss} vs diffusers {ref_loss}"
    assert grads.keys() == ref_grads.keys()
    for k, g in grads.items():
        ref = ref_grads[k]
        scale = np.abs(ref).max()
        if scale == 0:  # the last block's context queries feed nothing (its context output is dropped)
            assert "transformer_blocks.3.attn.add_q_proj" in k and not np.any(g), k
            continue
        err = np.abs(g - ref).max() / scale
        assert err <= GRAD_TOL, f"{k}: gradient differs from torch autograd by {err:.1e} of its size"


@pytest.mark.parametrize(
    "recipe",
    [Recipe(), Recipe(precondition_outputs=False), Recipe(weighting_scheme="cosmap")],
    ids=["preconditioned", "velocity", "cosmap"],
)
def test_loss_and_lora_grads_match_diffusers_recipe(tiny_pipeline, ours, inputs, recipe):
    lora = _random_lora(ours)
    try:
        _compare(_ours(ours, lora, inputs, recipe), _diffusers(tiny_pipeline, lora, inputs, recipe))
    finally:
        lora.detach()


def test_checkpointed_blocks_give_the_same_grads(ours, inputs):
    lora = _random_lora(ours, "attention,adaln")
    try:
        plain = _ours(ours, lora, inputs, Recipe())
        checkpoint_blocks(ours.transformer)
        checkpointed = _ours(ours, lora, inputs, Recipe())
    finally:
        uncheckpoint_blocks(ours.transformer)
        lora.detach()
    assert plain[0] == checkpointed[0]
    for k, g in plain[1].items():
        np.testing.assert_allclose(checkpointed[1][k], g, rtol=0, atol=1e-7 * np.abs(g).max())


def test_staged_backward_gives_the_same_loss_and_grads(ours, inputs):
    """training/staged.py: every stage kind carries LoRA here (inputs: context_embedder and the adaLN layers;
    blocks; output: proj_out), and each gradient must come out as the one-graph step's."""
    lora = _random_lora(ours, "attention,mlp,adaln,context_embedder,proj_out")
    try:
        plain = _ours(ours, lora, inputs, Recipe())
        sigmas, timesteps = sample_sigmas(U, ours.schedule)
        args = (mx.array(inputs[k]) for k in ("x0", "enc", "pooled", "noise"))
        loss, grads = staged_loss_and_grads(lora, ours.transformer, *args, sigmas, timesteps, Recipe())
        staged = float(loss), {k: np.array(v) for k, v in tree_flatten(grads)}
    finally:
        lora.detach()
    assert {k.split(".")[0] for k in plain[1]} >= {"context_embedder", "proj_out", "transformer_blocks"}
    assert set(staged[1]) == set(plain[1])
    np.testing.assert_allclose(staged[0], plain[0], rtol=1e-6)
    for k, g in plain[1].items():
        np.testing.assert_allclose(staged[1][k], g, rtol=0, atol=1e-6 * np.abs(g).max(), err_msg=k)


def test_zero_init_lora_leaves_the_model_unchanged(ours, inputs):
    x = mx.array(inputs["x0"])
    args = (mx.array(inputs["enc"]), mx.array(inputs["pooled"]), mx.array([500.0, 250.0]))
    base = np.array(ours.transformer(x, *args))
    lora = TrainableLora(ours.transformer, resolve_targets(ours.transformer), rank=8)
    try:
        assert all(not np.any(np.array(f["lora_B"])) for f in lora.params.values())
        assert np.array_equal(np.array(ours.transformer(x, *args)), base)
    finally:
        lora.detach()


def test_default_targets_are_both_attention_streams_and_attn2(ours):
    paths = resolve_targets(ours.transformer)
    assert "transformer_blocks.0.attn2.to_q" in paths and "transformer_blocks.0.attn.add_k_proj" in paths
    assert "transformer_blocks.3.attn.to_add_out" not in paths  # the context-pre-only block has none
    assert not any("ff." in p or "norm1" in p for p in paths)
    with pytest.raises(ValueError, match="targets: 'attn.to_z'"):
        resolve_targets(ours.transformer, "attention,attn.to_z")
