"""Two-pass upscaling (sd35m_mlx/upscale.py and the CLI's --upscale) end to end on the tiny fixture."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sd35m_mlx import StableDiffusion35
from sd35m_mlx.sampling.schedule import img2img_start_index
from sd35m_mlx.upscale import second_pass_schedule, target_size, upscale_generate
from sd35m_mlx_cli import model as model_io
from sd35m_mlx_cli.main import cli
from sd35m_mlx_cli.metadata import JSON_KEY
from sd35m_mlx_cli.settings import Settings


@pytest.mark.parametrize("size,factor", [((1024, 768), 1.5), ((64, 96), 1.5), ((832, 1216), 1.25), ((64, 64), 1)])
def test_target_size_is_a_multiple_of_16_and_matches_the_cli(size, factor):
    w, h = target_size(*size, factor)
    assert w % 16 == 0 and h % 16 == 0 and abs(w - size[0] * factor) <= 8 and abs(h - size[1] * factor) <= 8
    assert Settings("p", width=size[0], height=size[1], upscale=factor).upscale_size == (w, h)


@pytest.mark.parametrize("factor", [0.5, "2", None])
def test_bad_factor_raises(factor):
    with pytest.raises(ValueError, match="factor"):
        target_size(64, 64, factor)


class Recording:
    """A pipeline wrapper that records its generate calls (and what was released when it was loaded)."""

    def __init__(self, pipe, events):
        self.pipe, self.events = pipe, events

    def generate(self, prompt, **kw):
        self.events.append(("second", kw["width"], kw["height"], kw["num_inference_steps"], kw["seed"]))
        return self.pipe.generate(prompt, **kw)


def test_two_passes_with_a_second_model_released_first_in_low_memory(tiny_pipeline):
    first = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32", low_memory=True)
    second = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32")
    events = []

    def load():
        events.append(("load", first.transformer is None and first.prompt_encoder is None))
        return Recording(second, events)

    result = upscale_generate(
        first, "a lighthouse", factor=1.5, width=64, height=96, num_inference_steps=2, upscale_steps=3, seed=4,
        second=load,
    )  # fmt: skip
    assert [im.size for im in result.first_pass] == [(64, 96)]
    assert [im.size for im in result.images] == [(96, 144)]
    # A1111's hires steps: 3 steps run at 0.35, the last of a schedule of int(3 / 0.35) = 8
    assert events == [("load", True), ("second", 96, 144, 8, 4)]
    assert result.passes == [
        dict(width=64, height=96, steps=2),
        dict(width=96, height=144, steps=3, schedule=8, strength=0.35, upscaler="Lanczos", factor=1.5),
    ]
    # the second pass starts from the enlarged first image: close to it, not equal
    up = result.first_pass[0].resize((96, 144), Image.Resampling.LANCZOS)
    assert up.tobytes() != result.images[0].tobytes()


def test_cli_upscale_writes_the_second_pass_with_both_passes_recorded(tiny_pipeline, tmp_path, monkeypatch):
    loads = []
    real_load = model_io.load_pipeline

    def load(folder, dtype, load_t5, **options):
        loads.append(str(folder))
        return real_load(folder, dtype, load_t5, **options)

    monkeypatch.setattr(model_io, "load_pipeline", load)
    monkeypatch.chdir(tmp_path)
    second = tmp_path / "second-model"
    second.symlink_to(tiny_pipeline)
    args = ["a red cube", "--model", str(tiny_pipeline), "--width", "64", "--height", "64", "--steps", "2",
            "--dtype", "float32", "--seed", "7", "--upscale", "1.5", "--upscale-steps", "3",
            "--upscale-model", str(second), "-o", "up.png"]  # fmt: skip
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert loads == [str(tiny_pipeline), str(second)]  # the second model is loaded and used
    assert "second pass: 96x96, 3 steps at strength 0.35" in result.stderr
    image = Image.open(tmp_path / "up.png")
    assert image.size == (96, 96)
    stored = json.loads(image.text[JSON_KEY])
    assert (stored["width"], stored["height"], stored["steps"], stored["seed"]) == (64, 64, 2, 7)
    assert (stored["upscale"], stored["upscale_steps"], stored["upscale_strength"]) == (1.5, 3, 0.35)
    assert stored["upscale_model"] == str(second)
    text = image.text["parameters"]
    assert "Size: 64x64" in text and "Hires resize: 96x96" in text and "Hires steps: 3" in text
    assert "Hires checkpoint: second-model" in text
    # --from-image replays both passes (the second model too): the same picture
    loads.clear()
    result = CliRunner().invoke(cli, ["--from-image", "up.png", "-o", "again.png"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert loads == [str(tiny_pipeline), str(second)]
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / "again.png")))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--upscale", "5"], "--upscale must be between 1 and 4"),
        (["--upscale", "1.5", "--upscale-strength", "0"], "--upscale-strength must be in (0, 1]"),
        (["--upscale-steps", "3"], "--upscale-steps only applies with --upscale"),
        (["--upscale", "1.5", "--upscale-strength", "0.1", "--upscale-steps", "150"], "a schedule of 1500 steps"),
        (["--upscale", "4", "--width", "2048"], "over 6144 px"),
    ],
)
def test_cli_upscale_bad_values_are_one_line_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    result = CliRunner().invoke(cli, ["p", "--model", "model", *args])
    assert result.exit_code == 2 and message in result.output


def test_cli_upscale_beyond_the_model_fails_before_the_first_pass(tiny_pipeline, tmp_path, monkeypatch):
    """The tiny fixture takes at most 384 px: 384 x 2 is refused once the model is loaded, before any step."""
    import time

    steps = []
    real_generate = StableDiffusion35.generate

    def generate(self, *args, **kwargs):
        steps.append(1)
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusion35, "generate", generate)
    monkeypatch.chdir(tmp_path)
    args = ["p", "--model", str(tiny_pipeline), "--width", "384", "--height", "384", "--upscale", "2", "--steps", "1",
            "--dtype", "float32"]  # fmt: skip
    start = time.perf_counter()
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "--upscale 2.0 makes 768x768, over this model's 384 px" in result.stderr
    assert steps == [] and time.perf_counter() - start < 10 and not list(tmp_path.iterdir())


def test_cli_size_from_image_names_the_image_not_the_flags(tiny_pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (608, 800), "gray").save("photo.png")  # in the trained range: kept as it is, over 384
    args = ["p", "--model", str(tiny_pipeline), "--image", "photo.png", "--steps", "1", "--dtype", "float32"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    message = result.stderr.strip().splitlines()[-1]
    assert "the height of --image photo.png must be at most 384" in message and "got 800" in message
    assert message.endswith("pass --width/--height to resize") and "--height" not in message.split(";")[0]


# -- the second pass's steps, as A1111's hires fix -----------------------------------------------------------------


def a1111_img2img(pipe, prompt, image, steps, strength, **kw):
    """A1111's hires second pass (setup_img2img_steps, modules/sd_samplers_common.py at
    0027ce1f6e58c5f4279173e468a60aef420babfe): a schedule of int(steps / min(strength, 0.999)) steps, the last
    `steps` of them run. Built here as a diffusers img2img of that length; the step count is checked, so the
    strength given (where diffusers' float start rule lands on N - steps) cannot hide an extra or missing step."""
    n = int(steps / min(strength, 0.999))
    ran = []
    out = pipe.generate(prompt, image=image, strength=strength, num_inference_steps=n,
                        callback=lambda *a: ran.append(1), **kw)  # fmt: skip
    assert len(ran) == steps
    return out


def test_second_pass_schedule_starts_where_a1111_does():
    """Over steps 1..150 and strengths 0.001..1 (float64 and float32-rounded, as JSON and the CLI give them), the
    img2img start the schedule gives is A1111's N - steps. `strength` itself would not always do: at 51 steps and
    0.68, diffusers' int(N - N * strength) starts one step early."""
    strengths = {k / 1000 for k in range(1, 1001)} | {float(np.float32(k / 100)) for k in range(1, 101)} | {0.9999}
    for steps in range(1, 151):
        for d in strengths:
            n = int(steps / min(d, 0.999))
            if n > 1000:
                continue
            got_n, start_strength = second_pass_schedule(steps, d)
            assert got_n == n and 0 < start_strength <= 1
            assert img2img_start_index(n, start_strength) == n - steps, (steps, d)
    assert img2img_start_index(75, 0.68) == 23 != 75 - 51  # why the strength is not passed as it is


@pytest.mark.parametrize("steps,strength", [(3, 0.35), (2, 0.999), (2, 1.0), (1, 0.5)])
def test_second_pass_runs_upscale_steps_steps(pipe, steps, strength):
    """`upscale_steps` is the steps the second pass runs (A1111's "Hires steps"), whatever the strength; the first
    pass runs its own."""
    calls = []
    count = dict(callback=lambda *a: calls.append(1), width=64, height=64, seed=1)
    result = upscale_generate(pipe, "a lighthouse", factor=1.5, strength=strength, upscale_steps=steps,
                              num_inference_steps=2, **count)  # fmt: skip
    assert len(calls) == 2 + steps
    assert result.passes[1]["steps"] == steps and result.passes[1]["schedule"] == int(steps / min(strength, 0.999))
    calls.clear()  # default: the first pass's steps
    upscale_generate(pipe, "a lighthouse", factor=1, strength=strength, num_inference_steps=3, **count)
    assert len(calls) == 3 + 3


def test_second_pass_schedule_beyond_the_step_limit_fails_before_the_first_pass(pipe):
    calls = []
    with pytest.raises(ValueError, match=r"int\(150 steps / strength 0.1\) = 1500 steps, is over 1000"):
        upscale_generate(pipe, "a lighthouse", factor=1.5, strength=0.1, upscale_steps=150, width=64, height=64,
                         num_inference_steps=2, callback=lambda *a: calls.append(1))  # fmt: skip
    assert calls == []


def test_upscale_prompt_and_nearest_change_only_the_second_pass(pipe):
    """hr_prompt / hr_negative_prompt and A1111's "Nearest" upscaler: the first pass is untouched, the second is an
    img2img of the nearest-neighbour enlargement reading the other prompts."""
    common = dict(factor=1.5, width=64, height=64, num_inference_steps=2, seed=3, strength=0.5, negative_prompt="dim")
    plain = upscale_generate(pipe, "a lighthouse", **common)
    other = upscale_generate(pipe, "a lighthouse", upscaler="nearest", upscale_prompt="a red barn",
                             upscale_negative_prompt="sunny", **common)  # fmt: skip
    assert other.first_pass[0].tobytes() == plain.first_pass[0].tobytes()
    assert other.images[0].tobytes() != plain.images[0].tobytes()
    assert other.passes[1]["upscaler"] == "Nearest"
    up = plain.first_pass[0].resize((96, 96), Image.Resampling.NEAREST)
    want = a1111_img2img(pipe, "a red barn", up, 2, 0.5, width=96, height=96, seed=3, negative_prompt="sunny")
    np.testing.assert_array_equal(np.asarray(other.images[0]), np.asarray(want[0]))
    with pytest.raises(ValueError, match="upscaler must be one of lanczos, nearest, latent"):
        upscale_generate(pipe, "x", upscaler="Latent", **common)


# -- A1111's latent upscalers ------------------------------------------------------------------------------------

TORCH_MODES = [("bilinear", False), ("bilinear", True), ("bicubic", False), ("bicubic", True), ("nearest", False),
               ("nearest-exact", False)]  # fmt: skip


@pytest.mark.parametrize("mode,antialias", TORCH_MODES)
def test_interpolate_equals_torch(mode, antialias):
    """Up and down, odd sizes, exact doubling (torch's nearest shortcut), one side only: as F.interpolate in float32."""
    torch = pytest.importorskip("torch")
    from sd35m_mlx.editing.interpolate import interpolate

    x = np.random.default_rng(0).standard_normal((2, 7, 9, 16)).astype(np.float32)
    for size in [(14, 18), (11, 13), (3, 5), (21, 4), (7, 27), (7, 9), (1, 1)]:
        want = torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode=mode, antialias=antialias
        )
        got = interpolate(x, size, mode, antialias)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-5, err_msg=f"{size}")


def test_latent_img2img_equals_diffusers_fed_latents(pipe, tiny_pipeline):
    """generate(image=latents): img2img from model-space latents without the VAE, as diffusers'
    StableDiffusion3Img2ImgPipeline with a 16-channel tensor as `image` (its prepare_latents)."""
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusion3Img2ImgPipeline

    from tests.parity import assert_close

    latents = np.random.default_rng(1).standard_normal((1, 10, 12, 16)).astype(np.float32)
    kw = dict(num_inference_steps=4, guidance_scale=4.5, strength=0.7, output_type="np")
    ours = pipe.generate("a lighthouse", image=latents, seed=3, **kw)
    assert ours.shape == (1, 80, 96, 3)
    ref = StableDiffusion3Img2ImgPipeline.from_pretrained(tiny_pipeline, dtype=torch.float32)
    want = ref("a lighthouse", image=torch.from_numpy(latents).permute(0, 3, 1, 2), height=80, width=96,
               generator=torch.Generator().manual_seed(3), **kw).images  # fmt: skip
    assert_close(ours, want, atol=2e-3, min_std=1e-2, what="img2img from latents")
    with pytest.raises(ValueError, match="height must be 80"):
        pipe.generate("a lighthouse", image=latents, height=96, **kw)


@pytest.mark.parametrize("upscaler,mode,antialias", [("latent", "bilinear", False),
                                                     ("latent-bicubic-antialiased", "bicubic", True)])  # fmt: skip
def test_latent_upscale_is_first_pass_latents_interpolated_by_torch_then_img2img(pipe, upscaler, mode, antialias):
    """A1111's hires fix with a Latent upscaler: pass 1's latents, F.interpolate to the target's latent size, the
    second pass an img2img from them (no VAE round trip) at the hires strength, same seed."""
    torch = pytest.importorskip("torch")

    common = dict(width=64, height=96, num_inference_steps=3, seed=5, negative_prompt="dim")
    result = upscale_generate(pipe, "a lighthouse", factor=1.5, strength=0.7, upscale_steps=4, upscaler=upscaler,
                              **common)  # fmt: skip
    assert result.passes[1]["upscaler"] == {"latent": "Latent"}.get(upscaler, "Latent (bicubic antialiased)")
    first = pipe.generate("a lighthouse", output_type="latent", **common)
    assert result.first_pass[0].tobytes() == pipe.decode(first)[0].tobytes()
    up = torch.nn.functional.interpolate(
        torch.from_numpy(np.array(first)).permute(0, 3, 1, 2), size=(18, 12), mode=mode, antialias=antialias
    )
    want = a1111_img2img(pipe, "a lighthouse", up.permute(0, 2, 3, 1).numpy(), 4, 0.7, seed=5, negative_prompt="dim")
    assert result.images[0].size == (96, 144)
    got, ref = np.asarray(result.images[0], np.int16), np.asarray(want[0], np.int16)
    assert np.abs(got - ref).max() <= 1  # float32 rounding of the interpolation may move a pixel one 8-bit level
    pixel = upscale_generate(pipe, "a lighthouse", factor=1.5, strength=0.7, upscale_steps=4, **common)
    assert np.abs(np.asarray(pixel.images[0], np.int16) - ref).max() > 8  # the Lanczos path is another picture


def test_cli_latent_upscaler_is_recorded_as_a1111_writes_it(pipe, behind_cli, tmp_path):
    behind_cli(pipe)
    args = ["a red cube", "--model", "model", "--width", "64", "--height", "64", "--steps", "2", "--seed", "7",
            "--upscale", "1.5", "--upscale-strength", "0.7", "--upscaler", "latent-bicubic",
            "-o", "up.png"]  # fmt: skip
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    image = Image.open(tmp_path / "up.png")
    assert "Hires upscaler: Latent (bicubic)" in image.text["parameters"]
    assert json.loads(image.text[JSON_KEY])["upscaler"] == "latent-bicubic"
    want = upscale_generate(pipe, "a red cube", factor=1.5, strength=0.7, upscaler="latent-bicubic", width=64,
                            height=64, num_inference_steps=2, seed=7)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(want.images[0]))
