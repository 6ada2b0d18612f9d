"""Live previews (rgb and the TAESD wiring), decoder="taesd", and the CLI's preview file.

TAESD here is a stand-in with the real decoder's interface (config, decode, unscale_latents), put
behind `sd35m_mlx.loading.taesd.load_taesd`; TAESD3 itself is tested against diffusers in its own tests.
"""

import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sd35m_mlx import StableDiffusion35
from sd35m_mlx.images import decode_latents
from sd35m_mlx.pipeline import stable_diffusion
from sd35m_mlx.sampling.preview import SD3_LATENT_RGB_BIAS, SD3_LATENT_RGB_FACTORS, is_preview_step
from sd35m_mlx.sampling.schedule import img2img_start_index

KW = dict(height=32, width=48, seed=5, output_type="np")


class StandInTAESD(nn.Module):
    """16 latent channels -> RGB per latent pixel, 8x nearest upsampling; scaling as a TAESD config has it."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(scaling_factor=2.0, shift_factor=0.25, latent_channels=16)
        self.proj = nn.Linear(16, 3)

    def unscale_latents(self, z):
        return z / self.config.scaling_factor + self.config.shift_factor

    def scale_latents(self, z):
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, z):
        rgb = mx.tanh(self.proj(z))
        b, h, w, c = rgb.shape
        return mx.broadcast_to(rgb[:, :, None, :, None], (b, h, 8, w, 8, c)).reshape(b, h * 8, w * 8, c)


class Loads(list):
    decoder = None


@pytest.fixture
def taesd_loads(monkeypatch):
    """The sources load_taesd was asked for; each load returns the same stand-in weights."""
    loads = Loads()
    mx.random.seed(0)
    decoder = StandInTAESD()
    mx.eval(decoder.parameters())

    def load_taesd(source, dtype):
        loads.append(str(source))
        return decoder

    monkeypatch.setattr(stable_diffusion, "load_taesd", load_taesd)
    loads.decoder = decoder
    return loads


def collect():
    got = []
    return got, lambda step, total, image: got.append((step, total, image))


def test_preview_every_n_steps_and_always_the_last(pipe):
    got, on_preview = collect()
    pipe.generate("a red cube", num_inference_steps=5, preview="rgb", preview_every=2, on_preview=on_preview, **KW)
    assert [(s, t) for s, t, _ in got] == [(2, 5), (4, 5), (5, 5)]
    assert all(im.size == (48 // 8, 32 // 8) and im.mode == "RGB" for _, _, im in got)  # latent resolution
    got, on_preview = collect()
    pipe.generate("a red cube", num_inference_steps=3, preview="rgb", on_preview=on_preview, **KW)
    assert [s for s, _, _ in got] == [1, 2, 3]


def test_img2img_previews_count_from_its_first_step(pipe):
    image = np.random.default_rng(0).random((32, 48, 3)).astype(np.float32)
    total = 10 - img2img_start_index(10, 0.55)
    got, on_preview = collect()
    pipe.generate("a red cube", image=image, strength=0.55, num_inference_steps=10, preview="rgb",
                  preview_every=3, on_preview=on_preview, **KW)  # fmt: skip
    assert 0 < total < 10
    assert [(s, t) for s, t, _ in got] == [(s, total) for s in range(1, total + 1) if is_preview_step(s, total, 3)]


def test_rgb_preview_is_comfyui_latent_rgb_of_the_samplers_x0(pipe):
    """x0 recomputed from the Euler trajectory alone (v = dx / dsigma, x0 = x - sigma v), mapped with
    ComfyUI's SD3 factors in numpy; 8-bit rounding of float32 values may differ by one level."""
    n = 4
    noise = np.random.default_rng(1).standard_normal((1, 4, 6, 16)).astype(np.float32)
    trajectory = [noise]
    got, on_preview = collect()
    pipe.generate("a red cube", num_inference_steps=n, latents=noise, preview="rgb", on_preview=on_preview,
                  callback=lambda step, total, x: trajectory.append(np.array(x)), **KW)  # fmt: skip
    sigmas = [float(s) for s in pipe.schedule.sigmas(n)]
    factors, bias = np.array(SD3_LATENT_RGB_FACTORS), np.array(SD3_LATENT_RGB_BIAS)
    assert factors.shape == (16, 3)
    for k, (step, _, image) in enumerate(got):
        x, x_next = trajectory[k], trajectory[k + 1]
        v = (x_next - x) / (sigmas[k + 1] - sigmas[k])
        x0 = x - sigmas[k] * v
        expected = np.clip((x0[0] @ factors + bias + 1) / 2, 0, 1) * 255
        assert step == k + 1
        assert np.abs(np.asarray(image, dtype=np.float64) - expected).max() <= 1.0
    noisy = np.clip((trajectory[1][0] @ factors + bias + 1) / 2, 0, 1) * 255  # not the noisy latents
    assert np.abs(np.asarray(got[0][2], dtype=np.float64) - noisy).max() > 2


def test_taesd_preview_loads_the_default_decoder_once_when_needed(pipe, taesd_loads):
    pipe.taesd = None
    got, on_preview = collect()
    pipe.generate("a red cube", num_inference_steps=2, preview="rgb", on_preview=on_preview, **KW)
    assert taesd_loads == []  # rgb previews need no TAESD
    noise = np.random.default_rng(2).standard_normal((1, 4, 6, 16)).astype(np.float32)
    trajectory = [noise]
    pipe.generate("a red cube", num_inference_steps=2, latents=noise, preview="taesd", on_preview=on_preview,
                  callback=lambda step, total, x: trajectory.append(np.array(x)), **KW)  # fmt: skip
    pipe.generate("a red cube", num_inference_steps=2, preview="taesd", on_preview=on_preview, **KW)
    assert taesd_loads == ["madebyollin/taesd3"]
    (_, _, first), (_, _, last) = got[2], got[3]
    assert first.size == (48, 32) and last.size == (48, 32)  # full resolution
    x0 = mx.array(trajectory[-1])  # the last step's x0 is the final latents (sigma_next = 0)
    d = taesd_loads.decoder
    expected = np.clip(np.array(d.decode(d.unscale_latents(x0)))[0] / 2 + 0.5, 0, 1) * 255
    assert np.abs(np.asarray(last, dtype=np.float64) - expected).max() <= 1.0
    pipe.taesd = None


def test_decoder_taesd_decodes_the_final_latents_with_taesd(tiny_pipeline, taesd_loads):
    pipe = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32", taesd="some/local-taesd3")
    assert taesd_loads == ["some/local-taesd3"]
    latents = pipe.generate("a red cube", num_inference_steps=2, **dict(KW, output_type="latent"))
    draft = pipe.generate("a red cube", num_inference_steps=2, decoder="taesd", **KW)
    d = taesd_loads.decoder
    expected = np.clip(np.array(d.decode(d.unscale_latents(latents))) / 2 + 0.5, 0, 1)
    assert draft.shape == (1, 32, 48, 3)
    np.testing.assert_allclose(draft, expected, atol=1e-6)  # the same float32 ops on the same latents
    full = pipe.generate("a red cube", num_inference_steps=2, **KW)
    assert np.abs(full - draft).max() > 0.05  # and not the VAE's decode
    assert taesd_loads == ["some/local-taesd3"]  # given at load: never the default


def test_a_failing_preview_callback_surfaces_and_the_pipeline_stays_usable(pipe):
    reference = pipe.generate("a red cube", num_inference_steps=3, **KW)
    pipe.work_budget = 1 << 30
    limit = mx.get_memory_limit()

    def broken(step, total, image):
        raise KeyError("preview sink gone")

    with pytest.raises(KeyError, match="preview sink gone"):
        pipe.generate("a red cube", num_inference_steps=3, preview="rgb", on_preview=broken, **KW)
    assert mx.get_memory_limit() == limit
    assert np.array_equal(pipe.generate("a red cube", num_inference_steps=3, **KW), reference)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(preview="jpeg", on_preview=print), ValueError, "unknown preview 'jpeg'; choose one of rgb, taesd"),
        (dict(preview="rgb"), TypeError, "needs on_preview"),
        (dict(preview="rgb", on_preview=print, preview_every=0), ValueError, "preview_every must be at least 1"),
        (dict(decoder="tiny"), ValueError, "unknown decoder 'tiny'; choose one of vae, taesd"),
        (dict(on_preview=print), ValueError, "on_preview needs preview='rgb' or preview='taesd'"),
    ],
)
def test_bad_preview_arguments_fail_in_one_line(pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipe.generate("a red cube", num_inference_steps=1, **KW, **kwargs)


def test_cli_preview_file_is_rewritten_atomically_as_png(tiny_pipeline, tmp_path, monkeypatch):
    from sd35m_mlx_cli import output
    from sd35m_mlx_cli.main import cli

    monkeypatch.chdir(tmp_path)
    writes = []
    real_replace = output.os.replace

    def replace(src, dst):
        if str(dst).endswith("live.png"):
            with Image.open(src) as im:  # complete and valid before it takes the name
                im.load()
                writes.append((str(src), im.size, im.format))
        real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", replace)
    args = ["a red cube", "--model", str(tiny_pipeline), "--width", "64", "--height", "96", "--steps", "5",
            "--dtype", "float32", "--seed", "1", "--preview", "live.png", "--preview-every", "2"]  # fmt: skip
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(writes) == 3  # steps 2, 4 and the last
    assert all(size == (64, 96) and fmt == "PNG" for _, size, fmt in writes)
    assert all(src.startswith(str(tmp_path)) and not src.endswith("live.png") for src, _, _ in writes)
    with Image.open(tmp_path / "live.png") as im:
        assert im.format == "PNG" and im.size == (64, 96)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.png", "sd35m-1.png"]  # no temp files left


class RecordingPipeline:
    def __init__(self):
        self.calls, self.load_options = [], None

    def generate(self, prompt, *, callback=None, **kwargs):
        self.calls.append(kwargs)
        return [Image.new("RGB", (kwargs["width"], kwargs["height"]))]


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    from sd35m_mlx_cli import model as model_io

    pipe = RecordingPipeline()

    def load(folder, dtype, load_t5, **options):
        pipe.load_options = options
        return pipe

    monkeypatch.setattr(model_io, "load_pipeline", load)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    return pipe


def cli_run(*args):
    from sd35m_mlx_cli.main import cli

    return CliRunner().invoke(cli, ["p", "--model", "model", "--seed", "1", "--steps", "2", *args])


def test_cli_draft_and_taesd_previews_reach_the_loader_and_generate(recorded):
    assert cli_run().exit_code == 0
    assert "taesd" not in recorded.load_options and "decoder" not in recorded.calls[-1]  # nothing loaded unasked
    assert cli_run("--draft").exit_code == 0
    assert recorded.load_options["taesd"] == "madebyollin/taesd3" and recorded.calls[-1]["decoder"] == "taesd"
    result = cli_run("--preview", "p.png", "--preview-method", "taesd", "--preview-every", "3", "--taesd", "t3")
    assert result.exit_code == 0, result.output
    assert recorded.load_options["taesd"] == "t3"
    assert (recorded.calls[-1]["preview"], recorded.calls[-1]["preview_every"]) == ("taesd", 3)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--preview", "live.jpg"), "--preview must be a .png file"),
        (("--preview", "missing/live.png"), "does not exist"),
        (("--preview", "p.png", "--preview-every", "0"), "--preview-every must be at least 1"),
        (("--preview-method", "taesd"), "--preview-method only applies with --preview"),
    ],
)
def test_cli_bad_preview_options_fail_in_one_line_before_loading(recorded, args, message):
    result = cli_run(*args)
    assert result.exit_code == 2 and message in result.output
    assert recorded.load_options is None


def test_bench_preview_runs_on_the_tiny_transformer(tiny_pipeline):
    from benchmarks import bench_preview
    from sd35m_mlx.loading.transformer import load_transformer

    model = load_transformer(tiny_pipeline / "transformer")
    row = bench_preview.bench(64, model, None, mx.float32, 1)
    assert row["size"] == 64 and row["step_s"] > 0 and row["rgb_s"] > 0 and row["rgb_cli_s"] > 0


def test_decoder_taesd_with_real_taesd3_weights_equals_the_checked_taesd_decode(tiny_pipeline, tmp_path):
    """With the taesd branch's TAESD3 (its decode_latents is checked against diffusers'
    AutoencoderTiny there): generate(decoder="taesd") is that decode of the final latents, exactly."""
    build_fixture = pytest.importorskip("scripts.build_fixture")
    if not hasattr(build_fixture, "build_taesd"):
        pytest.skip("no TAESD fixture builder yet")
    folder = build_fixture.build_taesd(tmp_path / "taesd3")
    pipe = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32", taesd=folder)
    kw = dict(height=64, width=64, num_inference_steps=2, seed=2)
    latents = pipe.generate("a red cube", output_type="latent", **kw)
    draft = pipe.generate("a red cube", output_type="np", decoder="taesd", **kw)
    assert np.array_equal(draft, np.array(decode_latents(pipe.taesd, latents, pipe.taesd.dtype)))
