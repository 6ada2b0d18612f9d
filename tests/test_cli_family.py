"""The CLI's per-model defaults (steps, guidance, SLG from the loaded model's family) and size warnings."""

import pytest
from test_cli import fake, invoke  # noqa: F401  (fixture)

from sd35m_mlx.models.mmdit import MMDiTConfig

LARGE = MMDiTConfig(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                    dual_attention_layers=())  # fmt: skip
SD3_MEDIUM = MMDiTConfig(pos_embed_max_size=192, dual_attention_layers=(), qk_norm=None)


@pytest.mark.parametrize(
    "config,model,steps,cfg,slg,line",
    [
        (MMDiTConfig(), "model", 40, 4.5, [7, 8, 9], "SD3.5 Medium: 40 steps, guidance 4.5, SLG on layers 7, 8, 9"),
        (LARGE, "model", 28, 3.5, None, "SD3.5 Large: 28 steps, guidance 3.5, no SLG"),
        (LARGE, "sd3.5_large_turbo.safetensors", 4, 0.0, None, "SD3.5 Large Turbo: 4 steps, guidance 0 (off), no SLG"),
        (SD3_MEDIUM, "model", 28, 7.0, None, "SD3 Medium: 28 steps, guidance 7, no SLG"),
    ],
)
def test_defaults_follow_the_loaded_model_and_are_printed(fake, tmp_path, config, model, steps, cfg, slg, line):  # noqa: F811
    fake.transformer_config = config
    if model != "model":
        (tmp_path / model).write_bytes(b"")  # a single-file checkpoint's name: only "turbo" in it matters
    result = invoke("a heron", "--seed", "1", "--model", model)
    assert result.exit_code == 0, result.output
    (call,) = fake.calls
    assert (call["num_inference_steps"], call["guidance_scale"], call["skip_guidance_layers"]) == (steps, cfg, slg)
    assert line in result.stderr


def test_options_given_win_over_the_model_defaults(fake):  # noqa: F811
    fake.transformer_config = LARGE
    assert invoke("a heron", "--seed", "1", "--steps", "9", "--cfg", "2", "--slg").exit_code == 0
    (call,) = fake.calls
    assert (call["num_inference_steps"], call["guidance_scale"], call["skip_guidance_layers"]) == (9, 2.0, [7, 8, 9])


@pytest.mark.parametrize(
    "size,warns", [((512, 512), False), ((1440, 1440), False), ((256, 256), True), ((2048, 1536), True)]
)
def test_sizes_outside_the_trained_megapixels_warn(fake, size, warns):  # noqa: F811
    result = invoke("p", "--seed", "1", "--steps", "1", "--width", str(size[0]), "--height", str(size[1]))
    assert result.exit_code == 0, result.output
    assert ("outside the trained range (0.25-2.0 megapixels)" in result.stderr) == warns


def test_a_model_without_the_default_slg_layers_is_not_said_to_use_them(tmp_path):
    """tiny-random has 4 blocks: the family line must not claim SLG on 7, 8, 9 and then a note say it is off."""
    from click.testing import CliRunner

    from sd35m_mlx_cli.main import cli

    args = ["--model", "tiny-random", "--steps", "1", "--width", "64", "--height", "64", "-o", str(tmp_path / "a.png")]
    result = CliRunner().invoke(cli, [*args, "a cat"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "SD3.5 Medium: 1 step, guidance 4.5, no SLG" in result.stderr
    assert "SLG on layers" not in result.stderr
