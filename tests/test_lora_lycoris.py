"""Files written by the LyCORIS library itself (`lycoris-lora`, SimpleTuner's default adapter output): keys
`lycoris_<diffusers transformer path with _>` for LoRA, LoKr, LoHa and full fine-tunes. The library wraps the
tiny diffusers transformer, its factors are randomised, it saves the file with its own `save_weights`, and
the wrapped diffusers transformer runs lycoris' own forward: our pipeline with the file loaded must give that
image. lycoris 4.1.3's `merge_to` agrees where alpha / dim is 1; for LoKr / LoHa with another scale it applies
alpha / dim twice (`get_diff_weight` multiplies `get_weight`'s already scaled product), unlike its forward
and ComfyUI (comfy/weight_adapter/lokr.py, loha.py at a125cd84b054a57729b5eecab930ca9408719832), so the
reference is the forward and merge_to is checked only where the two agree."""

import warnings

import numpy as np
import pytest
import torch

lycoris = pytest.importorskip("lycoris", reason="the test extra installs lycoris-lora")
from diffusers import StableDiffusion3Pipeline  # noqa: E402

from sd35m_mlx import StableDiffusion35  # noqa: E402

# float32 on both sides, as tests/test_lora_diffusers.py: the merged weights and our side paths differ in
# rounding only; the adapters move pixels by > 0.05
PIXEL_TOL = 2e-3
H, W = 64, 96
KW = dict(height=H, width=W, num_inference_steps=3, guidance_scale=4.5)
CASES = {
    "lora": dict(algo="lora", linear_dim=4, linear_alpha=2.0),  # LoCon merges with alpha / dim once
    "lokr": dict(algo="lokr", linear_dim=2, linear_alpha=3.0, factor=4),  # w2 decomposed: scale alpha / dim
    "lokr_full_matrix": dict(algo="lokr", linear_dim=10000, linear_alpha=1.0, factor=16),  # SimpleTuner's default
    "loha": dict(algo="loha", linear_dim=4, linear_alpha=2.0),
    "full": dict(algo="full"),
}
MERGE_AGREES = {"lora", "lokr_full_matrix", "full"}


@pytest.fixture(scope="module")
def ours(tiny_pipeline):
    return StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32")


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(1).standard_normal((1, H // 8, W // 8, 16), dtype=np.float32)


def _lycoris_network(ref, case: str, path):
    """Wrap `ref.transformer` with lycoris (its forward now adds the adapter), randomise the factors, save."""
    from lycoris import create_lycoris

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = create_lycoris(ref.transformer, 1.0, **CASES[case])  # lycoris' default preset
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for lora in net.loras:
            for name, p in lora.named_parameters():
                if name.startswith("org_"):
                    continue
                # full: lycoris' own copy of the weight; the others: the factors (lycoris inits one to zero)
                r = torch.randn(p.shape, generator=g)
                p.copy_(p + 0.05 * r if case == "full" else 0.3 * r)
    net.apply_to()  # registers the modules under their lycoris_ names (its state dict is empty before)
    net.save_weights(str(path), torch.float32, {})
    return net


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_library_file_gives_lycoris_merge_through_diffusers(case, tiny_pipeline, ours, noise, tmp_path):
    ref = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline, dtype=torch.float32)
    latents = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous()
    base = ref("a red fox", latents=latents, output_type="np", **KW).images
    path = tmp_path / f"{case}.safetensors"
    net = _lycoris_network(ref, case, path)
    expected = ref("a red fox", latents=latents, output_type="np", **KW).images
    assert np.abs(expected - base).max() > 0.05, "the adapter must change the image"
    if case in MERGE_AGREES:
        net.restore()  # the original forwards back, then lycoris bakes its delta into the weights
        net.merge_to(1.0)
        merged = ref("a red fox", latents=latents, output_type="np", **KW).images
        assert np.abs(merged - expected).max() <= PIXEL_TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor must map
        name = ours.load_lora_weights(path)
    try:
        assert ours.lora_info()[0]["format"] == "lycoris"
        out = ours.generate("a red fox", latents=noise, output_type="np", **KW)
    finally:
        ours.unload_lora_weights()
    err = np.abs(out - expected).max()
    assert err <= PIXEL_TOL, f"{case} ({name}): max abs pixel difference {err:.2e} vs lycoris' merge in diffusers"
