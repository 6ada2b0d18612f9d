"""Outpainting helper, control image preprocessing, and the editing options of the CLI (fake pipeline)."""

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sd35m_mlx.editing.outpaint import outpaint, parse_margins
from sd35m_mlx.editing.preprocess import canny
from sd35m_mlx_cli.main import cli


def _picture(w=80, h=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_outpaint_canvas_mask_and_feathered_composite():
    im = _picture()
    job = outpaint(im, (16, 0, 32, 8), fill="edge", feather=8)
    assert job.image.size == job.mask.size == (80 + 48, 48 + 8)
    canvas, mask = np.asarray(job.image), np.asarray(job.mask)
    assert np.array_equal(canvas[:48, 16:96], np.asarray(im))  # the original, untouched
    assert np.array_equal(canvas[:48, 0], np.asarray(im)[:, 0]) and np.array_equal(canvas[50, 20], canvas[47, 20])
    # mask: the margins plus `feather` px of the picture along extended sides (top was not extended)
    assert (mask[:, :24] == 255).all() and (mask[:, 88:] == 255).all() and (mask[40:] == 255).all()
    assert (mask[:40, 24:88] == 0).all()
    black = Image.new("RGB", job.image.size)
    out = np.asarray(job.composite([black])[0]).astype(int)
    inner = np.asarray(im).astype(int)[:40, 8:72]
    assert np.array_equal(out[:40, 24:88], inner)  # the original beyond the feather band
    assert (out[:, :16] == 0).all() and (out[:, 96:] == 0).all()  # the generated margins
    # over a black result the composite is alpha * original: alpha ramps (k + 0.5) / 8 across the band
    band, orig = out[:40, 16:24], np.asarray(im).astype(int)[:40, 0:8]
    expected = orig * ((np.arange(8) + 0.5) / 8)[None, :, None]
    assert np.abs(band - expected).max() <= 1.5
    blur = outpaint(im, "16,0,32,8", fill="blur", feather=0)
    assert np.array_equal(np.asarray(blur.image)[:48, 16:96], np.asarray(im))
    assert (np.asarray(blur.mask)[:48, 16:96] == 0).all()


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d", "0,0,0,0", "-1,0,0,4"])
def test_bad_outpaint_margins(text):
    with pytest.raises(ValueError, match="LEFT,TOP,RIGHT,BOTTOM"):
        parse_margins(text)


def test_canny_gives_a_white_on_black_edge_map_and_says_how_to_install_opencv(monkeypatch):
    a = np.zeros((64, 64, 3), np.uint8)
    a[16:48, 16:48] = 255
    edges = np.asarray(canny(Image.fromarray(a)))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[16:48, 15:17].any() and not edges[24:40, 24:40].any()
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match=r"sd35m-mlx\[control\]"):
        canny(Image.fromarray(a))


class FakePipeline:
    def __init__(self):
        self.calls, self.controlnets = [], []

    def load_controlnet(self, source, quantize=None):
        self.controlnets.append((source, quantize))

    def generate(self, prompt, *, callback=None, **kwargs):
        self.calls.append(kwargs)
        return [Image.new("RGB", (kwargs["width"], kwargs["height"]), (1, 2, 3))]


@pytest.fixture
def fake(behind_cli):
    pipe = behind_cli(FakePipeline())
    _picture(320, 256).save("in.png")
    mask = np.zeros((256, 320), np.uint8)
    mask[30:60, 40:90] = 255
    Image.fromarray(mask).save("mask.png")
    Image.fromarray(mask[:128, :160]).save("small-mask.png")
    Image.new("L", (320, 256)).save("black.png")
    _picture(384, 256, seed=1).save("edges.png")
    return pipe


def invoke(*args):
    return CliRunner().invoke(cli, ["--model", "model", "p", "--seed", "1", "--steps", "2", *args])


def test_mask_reaches_generate_and_another_size_warns(fake):
    result = invoke("--image", "in.png", "--mask", "small-mask.png", "--padding-mask-crop", "8")
    assert result.exit_code == 0, result.output
    (call,) = fake.calls
    assert call["mask_image"].size == (320, 256) and call["padding_mask_crop"] == 8 and call["strength"] == 0.6
    assert "--mask is 160x128, --image 320x256: mask resized" in result.stderr


def test_outpaint_extends_the_canvas_with_strength_one(fake):
    result = invoke("--image", "in.png", "--outpaint", "32,0,32,16")
    assert result.exit_code == 0, result.output
    (call,) = fake.calls
    assert (call["width"], call["height"]) == (384, 272) and call["strength"] == 1.0
    assert call["image"].size == call["mask_image"].size == (384, 272)
    out = np.asarray(Image.open("sd35m-1.png"))
    assert out.shape == (272, 384, 3) and np.array_equal(out[40, 100], np.asarray(Image.open("in.png"))[40, 68])
    assert "Denoising strength: 1.0" in Image.open("sd35m-1.png").text["parameters"]


def test_controlnets_load_and_reach_generate(fake):
    result = invoke(
        "--controlnet", "a/cn", "--control-image", "edges.png", "--controlnet", "b", "--control-image", "edges.png",
        "--control-scale", "0.5", "--control-end", "0.8", "--control-preprocess", "canny", "--quantize", "8",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert fake.controlnets == [("a/cn", 8), ("b", 8)]
    (call,) = fake.calls
    assert (call["width"], call["height"]) == (384, 256)  # the control image's size
    assert call["controlnet_conditioning_scale"] == [0.5, 0.5] and call["control_guidance_end"] == 0.8
    assert len(call["control_image"]) == 2 and set(np.unique(np.asarray(call["control_image"][0]))) <= {0, 255}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mask", "mask.png"], "--mask needs --image"),
        (["--image", "in.png", "--mask", "black.png"], "all black: nothing to repaint"),
        (["--image", "in.png", "--mask", "nope.png"], "--mask nope.png: cannot read it as an image"),
        (["--image", "in.png", "--outpaint", "1,2"], "--outpaint margins must be LEFT,TOP,RIGHT,BOTTOM"),
        (["--image", "in.png", "--mask", "mask.png", "--outpaint", "8,8,8,8"], "cannot be combined"),
        (["--image", "in.png", "--padding-mask-crop", "8"], "--padding-mask-crop only applies with --mask"),
        (["--controlnet", "x"], "one --control-image per --controlnet"),
        (["--controlnet", "x", "--control-image", "edges.png", "--control-scale", "1", "--control-scale", "2"],
         "one per --controlnet"),
        (["--controlnet", "x", "--control-image", "edges.png", "--control-start", "0.9", "--control-end", "0.5"],
         "--control-start/--control-end"),
        (["--control-scale", "1"], "need --controlnet and --control-image"),
    ],
)  # fmt: skip
def test_bad_editing_options_fail_in_one_line_before_loading(fake, args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and message in result.stderr and result.stderr.count("\n") == 1
    assert fake.calls == [] and not Path("sd35m-1.png").exists()


def test_missing_opencv_is_a_usage_error_that_says_how_to_install(fake, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    result = invoke("--controlnet", "x", "--control-image", "edges.png", "--control-preprocess", "canny")
    assert result.exit_code == 2 and 'pip install "sd35m-mlx[control]"' in result.stderr


def _same(a, b) -> bool:
    if isinstance(a, Image.Image):
        return isinstance(b, Image.Image) and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@pytest.mark.parametrize(
    "args, text",
    [
        (["--image", "in.png", "--mask", "mask.png", "--padding-mask-crop", "8"],
         "Inpaint mask: mask.png, Inpaint padding: 8"),
        (["--image", "in.png", "--outpaint", "32,0,32,16", "--outpaint-fill", "blur", "--outpaint-feather", "8"],
         'Outpaint: "32,0,32,16", Outpaint fill: blur, Outpaint feather: 8'),
        (["--controlnet", "a/cn", "--control-image", "edges.png", "--control-scale", "0.5", "--control-end", "0.8"],
         'ControlNet 0: "Module: none, Model: a/cn, Image: edges.png, Weight: 0.5, Guidance Start: 0.0, '
         'Guidance End: 0.8"'),
    ],
)  # fmt: skip
def test_editing_inputs_are_stored_and_replayed_by_from_image(fake, args, text):
    result = invoke(*args, "-o", "first.png")
    assert result.exit_code == 0, result.output
    assert text in Image.open("first.png").text["parameters"]
    (first,), nets = fake.calls, list(fake.controlnets)
    fake.calls.clear()
    fake.controlnets.clear()
    result = CliRunner().invoke(cli, ["--from-image", "first.png", "-o", "again.png"])
    assert result.exit_code == 0, result.output
    (again,) = fake.calls
    assert fake.controlnets == nets
    assert set(again) == set(first) and all(_same(first[k], again[k]) for k in first), "the replay differs"
    assert np.array_equal(np.asarray(Image.open("first.png")), np.asarray(Image.open("again.png")))
