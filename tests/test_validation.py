"""Bad input fails before any work with a one-line ValueError/TypeError naming the argument (generate()),
or exit 2 and one line (the CLI); untrusted PNG metadata is capped, parsed in linear work and checked."""

import inspect
import json
import math
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sd35m_mlx import StableDiffusion35
from sd35m_mlx import validation as v
from sd35m_mlx.prompts.infotext import KeyValueLine
from sd35m_mlx.record import parameters_text, png_info
from sd35m_mlx.validation import InvalidInput, InvalidType, InvalidValue, validate_generation
from sd35m_mlx_cli import model as model_io
from sd35m_mlx_cli import settings as cli_settings
from sd35m_mlx_cli.main import cli
from sd35m_mlx_cli.metadata import (
    JSON_KEY,
    MAX_FIELD_CHARS,
    parse_parameters,
    parse_parameters_noting,
)

H = W = 32  # latents 4 x 4: the fixture's size multiple is 16


def _noise(shape=(1, H // 8, W // 8, 16)):
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def _with(arr, index, value):
    arr = arr.copy()
    arr[index] = value
    return arr


NAN, INF = float("nan"), float("inf")
IMG = np.full((H, W, 3), 0.5, np.float32)

BAD = [
    # (arguments, exception, message fragment): the cases first
    (dict(guidance_scale=NAN), ValueError, "guidance_scale must be in [0, 100], got nan"),
    (dict(guidance_scale=INF), ValueError, "guidance_scale must be in [0, 100], got inf"),
    (dict(guidance_scale=-1), ValueError, "guidance_scale must be in [0, 100]"),
    (dict(guidance_scale=1e9), ValueError, "guidance_scale must be in [0, 100]"),
    (dict(guidance_scale=True), TypeError, "guidance_scale must be a number"),
    (dict(guidance_scale="4.5"), TypeError, "guidance_scale must be a number"),
    (dict(skip_layer_guidance_scale=NAN), ValueError, "skip_layer_guidance_scale must be in [0, 100], got nan"),
    (dict(skip_layer_guidance_start=NAN), ValueError, "skip_layer_guidance_start must be in [0, 1]"),
    (dict(skip_layer_guidance_stop=1.5), ValueError, "skip_layer_guidance_stop must be in [0, 1]"),
    (dict(skip_layer_guidance_start=0.5, skip_layer_guidance_stop=0.2), ValueError, "must not exceed"),
    (dict(seed=-1), ValueError, "seed must be at least 0, got -1"),
    (dict(seed=1.5), TypeError, "seed must be an integer, got 1.5 (float)"),
    (dict(seed=2**64), ValueError, "seed must be between 0 and 18446744073709551615"),
    (dict(seed=True), TypeError, "seed must be an integer"),
    (dict(latents=_with(_noise(), (0, 1, 1, 3), NAN)), ValueError, "latents must hold only finite numbers"),
    (dict(latents=_with(_noise(), (0, 0, 0, 0), -INF)), ValueError, "latents must hold only finite numbers"),
    (dict(latents=_noise() * 1e6), ValueError, "latents values must be within +-10000"),
    (dict(latents=_noise((1, 8, 8, 16))), ValueError, "latents must have shape (1, 4, 4, 16)"),
    (dict(latents=[["a"]]), TypeError, "latents must hold real numbers"),
    (dict(latents=[[1.0], [1.0, 2.0]]), TypeError, "latents must be an array of numbers"),
    (dict(skip_guidance_layers=[99]), ValueError, "skip_guidance_layers must be block indices in 0..3 for this model"),
    (dict(skip_guidance_layers=[-1]), ValueError, "skip_guidance_layers entries must be at least 0"),
    (dict(skip_guidance_layers="7"), TypeError, "skip_guidance_layers must be a list of block indices"),
    (dict(skip_guidance_layers=[1.0]), TypeError, "skip_guidance_layers entries must be an integer"),
    (dict(skip_guidance_layers=[True]), TypeError, "skip_guidance_layers entries must be an integer"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be at least 1"),
    (dict(num_inference_steps=1001), ValueError, "num_inference_steps must be between 1 and 1000"),
    (dict(num_inference_steps=2.0), TypeError, "num_inference_steps must be an integer"),
    (dict(height=0), ValueError, "height must be at least 1"),
    (dict(height=True), TypeError, "height must be an integer"),
    (dict(width=16.0), TypeError, "width must be an integer"),
    (dict(width=40), ValueError, "width must be a positive multiple of 16, got 40 (try 32)"),
    (dict(height=400), ValueError, "height must be at most 384 for this model, got 400"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt must be at least 1"),
    (dict(num_images_per_prompt=65), ValueError, "num_images_per_prompt must be between 1 and 64"),
    (dict(prompt=["a"] * 40, num_images_per_prompt=2), ValueError, "gives 80 images; at most 64 per call"),
    (dict(prompt="x" * 10_001), ValueError, "prompt is 10,001 characters long; at most 10,000 are accepted"),
    (dict(prompt="a \ud800 b"), ValueError, "prompt holds a character that is not valid Unicode at position 2"),
    (dict(prompt=["a", 3]), TypeError, "prompt[1] must be a string"),
    (dict(prompt=[]), TypeError, "prompt must be a string or a non-empty list of strings"),
    (dict(prompt=None), ValueError, "give a prompt"),
    (dict(prompt=["a", "b"], negative_prompt=["c"]), ValueError, "negative_prompt has 1 entries, but prompt has 2"),
    (dict(negative_prompt="n" * 10_001), ValueError, "negative_prompt is 10,001 characters long"),
    (dict(prompt_3=["a", "b"]), ValueError, "prompt_3 has 2 entries, but prompt has 1"),
    (dict(sampler="euler_a"), ValueError, "unknown sampler 'euler_a'; choose one of euler, euler_ancestral, heun"),
    (dict(sampler=None), ValueError, "unknown sampler None"),
    (dict(output_type="tensor"), ValueError, "unknown output_type 'tensor'; choose one of pil, np, latent"),
    (dict(max_sequence_length=0), ValueError, "max_sequence_length must be at least 1"),
    (dict(max_sequence_length=513), ValueError, "max_sequence_length must be between 1 and 512"),
    (dict(max_sequence_length=256.0), TypeError, "max_sequence_length must be an integer"),
    (dict(callback=5), TypeError, "callback must be callable"),
    (dict(image=IMG, strength=NAN), ValueError, "strength must be in (0, 1], got nan"),
    (dict(image=IMG, strength=0.0), ValueError, "strength must be in (0, 1], got 0.0"),
    (dict(image=IMG, strength=1e-320), ValueError, "strength 1e-320 is too small: no step would run (at least 1e-15)"),
    (dict(image=_with(IMG, (0, 0, 0), NAN)), ValueError, "image must hold only finite numbers"),
    (dict(image=IMG * 255), ValueError, "image array must hold values in [0, 1] (or uint8)"),
    (dict(image=IMG[..., :2]), ValueError, "image array must be (H, W, 3) or (B, H, W, 3) RGB"),
    (dict(image=np.zeros((8, 8, 3), np.uint8), height=None, width=None), ValueError, "image is too small: 8x8"),
    (dict(image="no-such-file.png"), ValueError, "image 'no-such-file.png': cannot read it as an image"),
    (dict(image=np.stack([IMG] * 2), prompt=["a", "b", "c"]), ValueError, "cannot spread 2 input images over 3"),
    (dict(prompt=None, prompt_embeds=np.full((1, 5, 128), NAN, np.float32)), ValueError, "prompt_embeds must hold"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_arguments_fail_before_any_work_with_one_line(pipe, monkeypatch, kwargs, error, message):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(pipe, "_encode_cached", no_work)
    monkeypatch.setattr(pipe, "_component", no_work)
    kw = dict(prompt="a cat", height=H, width=W, num_inference_steps=1) | kwargs
    with pytest.raises(error) as info:
        pipe.generate(**kw)
    assert isinstance(info.value, InvalidInput)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_generation_settings_defaults_are_generate_defaults():
    params = inspect.signature(StableDiffusion35.generate).parameters
    for name in v.ARGUMENTS:
        assert v.GenerationSettings.__dataclass_fields__[name].default == params[name].default, name
    assert set(v.ARGUMENTS) == set(params) - {"self"}, "a generate() argument the validator does not know"


def test_normalises_numpy_scalars_and_empty_layer_list():
    s = validate_generation(
        prompt="a",
        height=np.int64(32),
        width=32,
        seed=np.uint64(2**64 - 1),
        guidance_scale=np.float32(3),
        skip_guidance_layers=[],
        num_inference_steps=np.int32(2),
    )
    assert (type(s.height), type(s.seed), type(s.guidance_scale), type(s.num_inference_steps)) == (int,) * 2 + (
        float,
        int,
    )
    assert s.seed == 2**64 - 1 and s.skip_guidance_layers is None
    with pytest.raises(InvalidType, match="unknown generation argument 'cfg'"):
        validate_generation(prompt="a", cfg=3)


def test_largest_seed_and_numpy_arguments_run(pipe):
    out = pipe.generate(
        "a cat",
        height=H,
        width=W,
        num_inference_steps=1,
        seed=2**64 - 1,
        guidance_scale=np.float32(2),
        output_type="np",
    )
    assert np.isfinite(out).all()


@pytest.mark.parametrize(
    "image, kwargs, size",
    [
        (np.full((40, 50, 3), 0.5, np.float32), {}, (32, 48)),  # cropped to the multiple
        (np.full((40, 50, 3), 0.5, np.float32), dict(height=32), (32, 48)),  # one side given: the other rounded
        (Image.new("RGB", (70, 33)), {}, (32, 64)),
        (Image.new("RGB", (70, 33)), dict(width=32), (32, 32)),
    ],
)
def test_img2img_size_is_checked_as_it_resolves(pipe, image, kwargs, size):
    assert (validate_generation(pipe.limits, prompt="a", image=image, **kwargs).height,) == (size[0],)
    out = pipe.generate("a", image=image, num_inference_steps=2, strength=0.5, output_type="np", seed=1, **kwargs)
    assert out.shape[1:3] == size


# -- CLI ------------------------------------------------------------------------------------------------


class _Recorder:
    """A pipeline double for checks that fail before generating: records calls, returns nothing."""

    def __init__(self):
        self.calls = []

    def generate(self, prompt, **kwargs):
        self.calls.append({"prompt": prompt, **kwargs})
        return [Image.new("RGB", (kwargs["width"], kwargs["height"]))]


@pytest.fixture
def fake(behind_cli):
    return behind_cli(_Recorder())


@pytest.fixture
def real(behind_cli, pipe):
    """The tiny pipeline behind the CLI (loaded once per module)."""
    return behind_cli(pipe)


def invoke(*args):
    return CliRunner().invoke(cli, ["--model", "model", *args], catch_exceptions=False)


def pngs():
    return sorted(p.name for p in Path(".").iterdir() if p.suffix == ".png")


def assert_usage_error(result, message, *, loaded=False):
    """Exit 2 and one `Error:` line on stderr (after the loading progress lines if the model was loaded)."""
    assert result.exit_code == 2, result.output
    error = result.stderr.splitlines()[-1] if loaded else result.stderr.rstrip("\n")
    assert error.startswith("Error: ") and message in error and "\n" not in error, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cfg", "nan"], "--cfg must be in [0, 100], got nan"),
        (["--cfg", "inf"], "--cfg must be in [0, 100], got inf"),
        (["--slg-scale", "nan"], "--slg-scale must be in [0, 100], got nan"),
        (["--seed", "-1"], "--seed must be at least 0, got -1"),
        (["--seed", str(2**64)], "--seed must be between 0 and 18446744073709551615"),
        (["--steps", "1001"], "--steps must be between 1 and 1000, got 1001"),
        (["--max-sequence-length", "0"], "--max-sequence-length must be at least 1"),
        (["--negative-prompt", "n" * 10_001], "--negative-prompt is 10,001 characters long"),
    ],
)
def test_cli_bad_values_exit_2_in_one_line_before_loading(fake, args, message):
    result = invoke("p", *args)
    assert_usage_error(result, message)
    assert fake.calls == [] and pngs() == []


def test_cli_overlong_prompt_exits_2(fake):
    assert_usage_error(invoke("x" * 10_001), "PROMPT is 10,001 characters long; at most 10,000 are accepted")


def test_cli_default_slg_layers_fit_the_model_with_a_note(real):
    result = invoke("a cat", "--width", "64", "--height", "64", "--steps", "1", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert (
        "Note: this model has 4 transformer blocks; the default SLG layer(s) 7, 8, 9 are not among them, so SLG is off"
        in result.stderr
    )
    stored = json.loads(Image.open("sd35m-3.png").text[JSON_KEY])
    assert stored["slg"] is False  # the PNG records what ran


def test_cli_size_beyond_the_model_exits_2_after_loading_without_a_file(real):
    result = invoke("a cat", "--width", "400", "--height", "64", "--steps", "1", "--seed", "3")
    assert_usage_error(result, "Error: --width must be at most 384 for this model, got 400", loaded=True)
    assert pngs() == []


def _png_with(name, **chunks):
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value, zip=key.endswith("_z"))
    Image.new("RGB", (64, 64)).save(name, pnginfo=info)


def test_from_image_ignores_and_reports_invalid_stored_values(fake):
    stored = '{"prompt": "a fox", "cfg": NaN, "steps": 2, "seed": -5, "width": 64, "height": 64, "slg": "yes"}'
    _png_with("in.png", **{JSON_KEY: stored})
    result = invoke("--from-image", "in.png", "--seed", "1")
    assert result.exit_code == 0, result.output
    (call,) = fake.calls
    assert call["guidance_scale"] == 4.5 and call["num_inference_steps"] == 2  # cfg fell back to its default
    assert "Note: --from-image in.png: ignored a stored value (seed must be at least 0, got -5)" in result.stderr
    assert "(slg must be true or false, got 'yes' (str))" in result.stderr
    assert "(cfg must be in [0, 100], got nan)" in result.stderr


def test_from_image_stored_layers_outside_the_model_exit_2(real):
    stored = {"prompt": "a fox", "steps": 1, "seed": 1, "width": 64, "height": 64, "slg_layers": [2, 99]}
    _png_with("in.png", **{JSON_KEY: json.dumps(stored)})
    result = invoke("--from-image", "in.png")
    message = "the --from-image PNG's SLG layers must be block indices in 0..3 for this model (4 transformer blocks)"
    assert_usage_error(result, message, loaded=True)
    assert pngs() == ["in.png"]


def test_png_json_is_strict_json():
    bad = cli_settings.Settings(prompt="p", cfg=NAN)
    with pytest.raises(ValueError):
        png_info(bad, "test")


@pytest.mark.parametrize("key", [JSON_KEY, "parameters"])
@pytest.mark.parametrize("repeats", [MAX_FIELD_CHARS // 3 + 1, 1_000_000 // 3])  # just over the cap; a 1 MB chunk
def test_from_image_caps_what_it_reads(fake, key, repeats):
    _png_with("big.png", **{key: "a, " * repeats})
    result = invoke("--from-image", "big.png")
    size = f"{3 * repeats:,}"
    assert_usage_error(result, f"--from-image: big.png's '{key}' text is {size} characters; at most 65,536 are read")


def test_from_image_long_parameters_lines(fake):
    """The issue's case: one 80,000-character line (33 s for the old regex) is over the cap, a clear error;
    a 60,000-character line under it parses in one pass (and a prompt over 10,000 characters is left out)."""
    _png_with("long.png", parameters="a tree\n" + "lorem ipsum " * 6_667)
    assert_usage_error(invoke("--from-image", "long.png"), "'parameters' text is 80,011 characters")
    _png_with("long.png", parameters="a tree\nSteps: 2, Seed: 5, Size: 64x64, " + "Junk: x, " * 6_600)
    result = invoke("--from-image", "long.png")
    assert result.exit_code == 0, result.output
    assert fake.calls[0]["seed"] == 5 and fake.calls[0]["prompt"] == "a tree"
    _png_with("long.png", parameters="lorem ipsum " * 5_000 + "\nSteps: 2, Seed: 5, Size: 64x64")
    message = "missing PROMPT (or --from-image PNG); its stored prompt is unusable (prompt is 59,999 characters long"
    assert_usage_error(invoke("--from-image", "long.png"), message)


def test_from_image_survives_hostile_chunks(fake):
    _png_with("nested.png", **{JSON_KEY: "[" * 60_000, "parameters": "a tree\nSteps: 2, Seed: 4, Size: 64x64"})
    result = invoke("--from-image", "nested.png")  # JSON nested past the recursion limit: the text is used
    assert result.exit_code == 0, result.output
    assert fake.calls[0]["seed"] == 4 and fake.calls[0]["num_inference_steps"] == 2
    bomb = PngInfo()  # a compressed chunk inflating past Pillow's 1 MB limit
    bomb.add_text("parameters", "x" * 2_000_000, zip=True)
    Image.new("RGB", (64, 64)).save("bomb.png", pnginfo=bomb)
    assert zlib.compress(b"x" * 2_000_000)  # (small on disk)
    result = invoke("--from-image", "bomb.png")
    assert result.exit_code == 2 and result.stderr.startswith("Error: --from-image: ")
    assert result.stderr.count("\n") == 1


# -- the A1111 `parameters` parser ----------------------------------------------------------------------

A1111 = (
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x640, "
    'Model hash: 0a1b2c, Model: sd3.5_medium, Lora hashes: "lora1: abc, lora2: def", '
    'TI: "say \\"hi\\", \\\\ ok", Version: v1.10.1'
)


def test_parser_reads_a1111_lines_as_a1111_does():
    items = dict(KeyValueLine(A1111).items)
    assert items["Lora hashes"] == "lora1: abc, lora2: def" and items["TI"] == 'say "hi", \\ ok'
    assert (items["Steps"], items["Schedule type"], items["Version"]) == ("20", "Karras", "v1.10.1")
    assert parse_parameters("a tree\nNegative prompt: fog\n" + A1111) == dict(
        prompt="a tree",
        negative_prompt="fog",
        sampler="dpmpp_2m",
        steps=20,
        cfg=7.0,
        seed=123,
        width=512,
        height=640,
        scheduler="karras",
        rng="nv",  # A1111 writes RNG only when it is not its GPU default
    )


def test_parser_leaves_out_and_reports_invalid_values():
    fields, invalid = parse_parameters_noting("p\nSteps: 9999, CFG scale: nan, Seed: 1" + "0" * 5000 + ", Size: 9x9")
    assert fields == {"prompt": "p", "negative_prompt": "", "rng": "nv"}  # not ours: A1111's default noise
    assert sorted(invalid) == ["cfg", "height", "seed", "steps", "width"]
    assert invalid["cfg"] == "cfg must be in [0, 100], got nan"
    assert invalid["seed"].startswith("Seed '10000") and invalid["seed"].endswith("is not a number")  # > 4,300 digits


@given(st.dictionaries(st.from_regex(r"[A-Za-z][A-Za-z ]{0,10}[A-Za-z]", fullmatch=True), st.text(max_size=30)))
@settings(max_examples=100, deadline=None)
def test_parser_inverts_the_writer(d):
    """Any dict written as our writer (and A1111's) writes it reads back exactly."""
    from sd35m_mlx.record import _quote

    line = ", ".join(f"{k}: {_quote(val.strip())}" for k, val in d.items())
    assert dict(KeyValueLine(line).items) == {k: val.strip() for k, val in d.items()}


N = 200_000  # long enough to show a quadratic parser (A1111's regex: hours), short enough to run in a blink
HOSTILE = {
    "long line": "a" * N,
    "commas": "," * N,
    "colons": ":" * N,
    "quotes": '"' * N,
    "open quotes": 'k: "a, ' * (N // 7),
    "quote then junk": 'k: "a" b, ' * (N // 10),
    "backslashes": 'k: "' + "\\" * N,
    "A1111 worst case": "Steps" * (N // 5),
    "words then a comma": ("lorem ipsum " * 1000 + ",") * (N // 12_000),
    "keys": "k: v, " * (N // 6),
}


@pytest.mark.parametrize("line", HOSTILE.values(), ids=HOSTILE.keys())
def test_parser_work_is_linear_on_hostile_lines(line):
    scan = KeyValueLine(line)
    assert scan.steps <= 2 * len(line), f"{scan.steps:,} steps for {len(line):,} characters"
    parse_parameters("prompt\n" + line)  # and the whole text parses (to whatever it holds) without error


@given(st.text(alphabet=st.sampled_from(' ,:"\\ab\n\t'), max_size=400))
@settings(max_examples=300, deadline=None)
def test_parser_never_fails_and_stays_linear(text):
    for line in text.split("\n"):
        assert KeyValueLine(line).steps <= 2 * len(line)
    parse_parameters(text)


_numeric = st.text(st.characters(categories=["N"]), min_size=1, max_size=4)  # digits, but also "²", "½", "Ⅻ"
_a1111_value = st.one_of(
    st.text(st.characters(exclude_characters=",\n"), max_size=12),
    _numeric,
    st.builds("{}x{}".format, _numeric, _numeric),
)


@given(st.text(max_size=60), st.lists(st.tuples(st.sampled_from(["Steps", "Seed", "Size", "CFG scale", "Sampler",
       "Denoising strength", "SLG scale"]), _a1111_value), max_size=6))  # fmt: skip
@settings(max_examples=200, deadline=None)
def test_parser_takes_any_values_without_failing(prompt, items):
    """Any Unicode in prompts and values: fields parse, are left out with a reason, or are absent; never an error."""
    fields, invalid = parse_parameters_noting(prompt + "\n" + ", ".join(f"{k}: {val}" for k, val in items))
    assert set(fields).isdisjoint(invalid)


# -- properties: every drawn combination runs to finite pixels or fails with our one-line error ---------


_bad_numbers = st.one_of(st.floats(), st.integers(-(2**70), 2**70), st.booleans(), st.none(), st.text(max_size=3))
_bad_image = st.sampled_from([IMG * 2, _with(IMG, (0, 0, 0), NAN), np.zeros((8, 24, 3), np.uint8), "nope.png"])

# argument: (valid values, invalid values); each draw spoils none, one or two arguments
GENERATE_ARGUMENTS = {
    "prompt": (st.text(max_size=40), st.one_of(st.none(), st.lists(st.text(max_size=9), max_size=3))),
    "negative_prompt": (st.text(max_size=20), st.lists(st.text(max_size=5), min_size=2, max_size=2)),
    "height": (st.just(H), st.sampled_from([0, -16, 20, 16.0, True, 4096, None])),
    "width": (st.just(W), st.sampled_from([1, 24, 4096, "32"])),
    "num_inference_steps": (st.sampled_from([1, 2]), st.sampled_from([0, -1, 1.0, 10**6, True])),
    "guidance_scale": (st.floats(0, 12), _bad_numbers),
    "seed": (st.integers(0, 2**64 - 1), st.one_of(st.integers(-(2**65), -1), st.integers(2**64, 2**65), st.floats())),
    "num_images_per_prompt": (st.sampled_from([1, 2]), st.sampled_from([0, 100, 1.0, True])),
    "max_sequence_length": (st.sampled_from([8, 77, 256]), st.sampled_from([0, 513, 8.0])),
    "sampler": (st.sampled_from(["euler", "dpmpp_2m"]), st.sampled_from(["euler_a", None, 0])),
    "skip_guidance_layers": (
        st.one_of(st.none(), st.lists(st.integers(0, 3), max_size=3)),
        st.sampled_from(["12", [1.5], [4], [-1]]),
    ),
    "skip_layer_guidance_scale": (st.floats(0, 5), _bad_numbers),
    "skip_layer_guidance_start": (st.floats(0, 0.3), _bad_numbers),
    "skip_layer_guidance_stop": (st.floats(0.3, 1), _bad_numbers),
    "output_type": (st.sampled_from(["np", "pil", "latent"]), st.just("tensor")),
    "latents": (st.sampled_from(["none", "right"]), st.sampled_from(["wrong shape", "nan", "big", "list"])),
    "image": (
        st.sampled_from([None, IMG, (IMG * 255).astype(np.uint8), Image.new("RGB", (W, H), "red")]),
        _bad_image,
    ),
    "strength": (st.floats(0.3, 1), _bad_numbers),
}


def _latents(draw, kind, batch):
    if kind == "none":
        return None
    if kind == "list":
        return draw(st.lists(st.floats(), max_size=3))
    x = _noise((batch, H // 8, W // 8, 16) if kind != "wrong shape" else (1, 3, 3, 16))
    if kind == "nan":
        x[0, 0, 0, 0] = draw(st.sampled_from([NAN, INF, -INF]))
    if kind == "big":
        x *= draw(st.sampled_from([1e5, 1e30]))
    return x


@st.composite
def generate_arguments(draw):
    spoilt = draw(st.sets(st.sampled_from(sorted(GENERATE_ARGUMENTS)), max_size=2))
    kw = {name: draw(strategies[name in spoilt]) for name, strategies in GENERATE_ARGUMENTS.items()}
    prompt, n = kw["prompt"], kw["num_images_per_prompt"]
    batch = (1 if isinstance(prompt, str) or not prompt else len(prompt)) * (n if type(n) is int and n < 3 else 1)
    kw["latents"] = _latents(draw, kw["latents"], batch)
    return kw


def _finite(out):
    if isinstance(out, list):
        out = np.stack([np.asarray(im, dtype=np.float32) for im in out])
    return bool(np.isfinite(np.asarray(out)).all())


def test_generate_property_finite_pixels_or_our_one_line_error(pipe):
    outcomes = []

    @given(kw=generate_arguments())
    @settings(max_examples=40, deadline=None, database=None)
    def check(kw):
        try:
            out = pipe.generate(**kw)
        except InvalidInput as e:  # anything else (from MLX, NumPy, Pillow) fails the test
            assert isinstance(e, (ValueError, TypeError)) and str(e) and "\n" not in str(e)
            outcomes.append("error")
            return
        assert _finite(out), "NaN or infinity in the output"
        outcomes.append("pixels")

    check()
    assert outcomes.count("pixels") >= 4 and outcomes.count("error") >= 4, outcomes  # both branches exercised


_cli_numbers = st.sampled_from(["nan", "inf", "-inf", "-1", "1e400", "abc", "101", "1e-320"])

# option: (valid values, invalid values); --width, --height and --steps are always given (the CLI's default
# size is beyond the tiny model, and 40 steps is slow); each draw spoils none, one or two options
CLI_OPTIONS = {
    "PROMPT": (st.text(min_size=1, max_size=30), st.sampled_from(["x" * 10_001, ""])),
    "--width": (st.sampled_from(["64", "80"]), st.sampled_from(["63", "0", "-64", "4096", "400", "wide"])),
    "--height": (st.sampled_from(["64", "96"]), st.sampled_from(["72", "32"])),
    "--steps": (st.sampled_from(["1", "2"]), st.sampled_from(["0", "-3", "1001", "1.5"])),
    "--cfg": (st.floats(0, 10).map(str), _cli_numbers),
    "--slg-scale": (st.floats(0, 5).map(str), _cli_numbers),
    "--seed": (st.integers(0, 2**64 - 1).map(str), st.sampled_from(["-1", str(2**64), "1.5"])),
    "--max-sequence-length": (st.sampled_from(["8", "77"]), st.sampled_from(["0", "600"])),
    "--sampler": (st.sampled_from(["euler", "dpmpp_2m"]), st.just("euler_a")),
    "--negative-prompt": (st.text(max_size=10), st.just("n" * 10_001)),
    "--strength": (st.floats(0.1, 1).map(str), _cli_numbers),
    "-n": (st.sampled_from(["1", "2"]), st.just("0")),
}


@st.composite
def cli_arguments(draw):
    spoilt = draw(st.sets(st.sampled_from(sorted(CLI_OPTIONS)), max_size=2))
    args = []
    for option, strategies in CLI_OPTIONS.items():
        value = draw(strategies[option in spoilt])
        if option == "PROMPT":
            args.append(value)
        elif option in spoilt or option in ("--width", "--height", "--steps") or draw(st.booleans()):
            args += [option, value]
    if "--strength" in args or draw(st.booleans()):
        args += ["--image", "in.png"]
    return args


def test_cli_property_png_or_exit_2_in_one_line(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "load_pipeline", lambda *a, **k: pipe)
    outcomes = []

    @given(args=cli_arguments())
    @settings(max_examples=30, deadline=None, database=None)
    def check(args):
        folder = Path(tempfile.mkdtemp(dir=tmp_path))
        monkeypatch.chdir(folder)
        (folder / "model").mkdir()
        Image.new("RGB", (64, 64), "red").save("in.png")
        result = CliRunner().invoke(cli, ["--model", "model", *args], catch_exceptions=False)
        written = sorted(p for p in folder.iterdir() if p.suffix == ".png" and p.name != "in.png")
        if result.exit_code == 0:
            assert written, result.output
            for png in written:
                stored = json.loads(Image.open(png).text[JSON_KEY], parse_constant=_no_constants)
                assert all(not isinstance(x, float) or math.isfinite(x) for x in stored.values())
            outcomes.append("png")
            return
        assert result.exit_code == 2, result.output  # never 1 (an internal failure) for any drawn input
        assert result.stderr.splitlines()[-1].startswith("Error: ")  # click's own parse errors add a usage block
        assert written == [] and not [p for p in folder.iterdir() if p.name.startswith(".")]
        outcomes.append("error")

    check()
    assert outcomes.count("png") >= 3 and outcomes.count("error") >= 3, outcomes


def _no_constants(name):
    raise AssertionError(f"{name} in stored JSON")


def test_round_trip_still_exact():
    s = cli_settings.Settings(prompt='say "hi", then\nleave', negative_prompt="ugly", cfg=3.5, seed=99)
    got = parse_parameters(parameters_text(s, "v"))
    assert (got["prompt"], got["cfg"], got["seed"]) == (s.prompt, 3.5, 99)


def test_invalid_value_and_type_are_value_and_type_errors():
    assert issubclass(InvalidValue, ValueError) and issubclass(InvalidType, TypeError)


def test_seed_plan_runs_on_from_the_last_seed_and_wraps():
    from sd35m_mlx.record import plan_seeds

    assert plan_seeds((5, 9), 4) == [5, 9, 10, 11]
    assert plan_seeds((3,), 1) == [3] and plan_seeds((1, 2, 3), 2) == [1, 2, 3]  # given seeds are all kept
    assert plan_seeds((v.MAX_SEED,), 2) == [v.MAX_SEED, 0]  # mx.random.key's range
    first, *rest = plan_seeds((), 3)
    assert 0 <= first < 2**32 and rest == [first + 1, first + 2]  # random start, then +1 as A1111 does


def test_fit_slg_keeps_the_default_layers_the_model_has():
    s = cli_settings.Settings(prompt="p")
    assert s.fit_slg(24) is s
    assert s.fit_slg(9).slg_layers == (7, 8) and s.fit_slg(9).slg
    assert not s.fit_slg(4).slg and s.fit_slg(4).slg_layers == s.slg_layers
    chosen = cli_settings.Settings(prompt="p", slg_layers=(3, 30))  # restored from a PNG: the validator's to refuse
    assert chosen.fit_slg(4) is chosen
