"""The sd35m-mlx command: option parsing, errors, files and metadata (fake pipeline), then one real run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sd35m_mlx.record import parameters_text
from sd35m_mlx_cli import output
from sd35m_mlx_cli.main import cli
from sd35m_mlx_cli.metadata import JSON_KEY, parse_parameters
from sd35m_mlx_cli.settings import SAMPLERS, Settings


class FakePipeline:
    """Records generate() calls; returns a flat image whose colour encodes the seed."""

    def __init__(self, fail: BaseException | None = None, fail_at_step: int = 1):
        self.calls = []
        self.fail = fail
        self.fail_at_step = fail_at_step

    def generate(self, prompt, *, callback=None, **kwargs):
        self.calls.append({"prompt": prompt, **kwargs})
        steps = kwargs["num_inference_steps"]
        for i in range(1, steps + 1):
            if self.fail is not None and i == self.fail_at_step:
                raise self.fail
            if callback is not None:
                callback(i, steps, None)
        seed = kwargs["seed"]
        colour = (seed % 256, (seed // 256) % 256, 7)
        return [Image.new("RGB", (kwargs["width"], kwargs["height"]), colour)]


@pytest.fixture
def fake(behind_cli):
    """A fake pipeline behind load_pipeline; the current folder is a fresh tmp folder with a model folder."""
    pipe = FakePipeline()
    loads = []

    def load(folder, dtype, load_t5, **options):
        loads.append((Path(folder), dtype, load_t5))
        pipe.load_options = options
        return pipe

    behind_cli(pipe, load=load)
    pipe.loads = loads
    return pipe


def invoke(*args):
    return CliRunner().invoke(cli, ["--model", "model", *args], catch_exceptions=False)


def pngs(folder="."):
    return sorted(p.name for p in Path(folder).iterdir() if p.suffix == ".png")


def no_leftovers(folder="."):
    return not [p for p in Path(folder).iterdir() if p.name.startswith(".")]


def test_help_shows_every_default():
    result = CliRunner().invoke(cli, ["--help"], prog_name="sd35m-mlx", terminal_width=100)
    out = " ".join(result.output.split())
    for text in (
        "Usage: sd35m-mlx [OPTIONS] [PROMPT]",
        "stabilityai/stable-diffusion-3.5-medium",
        "[default: 1024;",
        "SD3.5 Medium 40 steps, guidance 4.5, SLG on",
        "SD3.5 Large Turbo 4 steps, guidance 0, SLG off",
        "[default: 2.8]",
        "[default: euler]",
        "[default: 256]",
        "[default: 0.6]",
        "[default: sd35m-{seed}.png]",
        "[default: random, always printed]",
        "bfloat16 matmul is slow on MLX's CPU backend",
    ):
        assert text in out, text


def test_prompt_alone_uses_model_card_defaults(fake):
    result = invoke("a capybara", "--seed", "3")
    assert result.exit_code == 0, result.output
    (call,) = fake.calls
    assert call["prompt"] == "a capybara"
    assert (call["width"], call["height"], call["num_inference_steps"]) == (1024, 1024, 40)
    assert call["guidance_scale"] == 4.5 and call["sampler"] == "euler" and call["seed"] == 3
    assert call["skip_guidance_layers"] == [7, 8, 9]
    assert (call["skip_layer_guidance_scale"], call["skip_layer_guidance_start"]) == (2.8, 0.01)
    assert call["skip_layer_guidance_stop"] == 0.2
    assert call["num_images_per_prompt"] == 1 and "image" not in call
    assert fake.loads == [(Path("model"), "float32", True)]  # CPU: auto -> float32
    assert result.stdout == "sd35m-3.png\n"
    assert pngs() == ["sd35m-3.png"] and no_leftovers()


def test_options_reach_generate(fake):
    result = invoke(
        "p", "--negative-prompt", "blurry", "--width", "512", "--height", "768", "--steps", "3",
        "--cfg", "7", "--sampler", "dpmpp_2m", "--slg-scale", "3.5", "--max-sequence-length", "77",
        "--no-t5", "--dtype", "bfloat16", "--seed", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (call,) = fake.calls
    assert call["negative_prompt"] == "blurry" and (call["width"], call["height"]) == (512, 768)
    assert call["num_inference_steps"] == 3 and call["guidance_scale"] == 7 and call["sampler"] == "dpmpp_2m"
    assert call["skip_layer_guidance_scale"] == 3.5 and call["max_sequence_length"] == 77
    assert fake.loads == [(Path("model"), "bfloat16", False)]


def test_no_slg_turns_skip_layer_guidance_off(fake):
    assert invoke("p", "--no-slg", "--steps", "1").exit_code == 0
    assert fake.calls[0]["skip_guidance_layers"] is None


def test_one_generate_call_per_seed(fake):
    result = invoke("p", "--steps", "1", "--seed", "5", "--seed", "9", "-n", "3")
    assert result.exit_code == 0, result.output
    assert [c["seed"] for c in fake.calls] == [5, 9, 10]
    assert all(c["num_images_per_prompt"] == 1 for c in fake.calls)
    assert result.stdout.split() == ["sd35m-5.png", "sd35m-9.png", "sd35m-10.png"]
    for seed in (5, 9, 10):
        assert f"(seed {seed})" in result.stderr


def test_random_seed_is_printed_and_recorded(fake):
    result = invoke("p", "--steps", "1", "-n", "2")
    assert result.exit_code == 0, result.output
    seeds = [c["seed"] for c in fake.calls]
    for seed in seeds:
        assert f"seed {seed}" in result.stderr
        assert json.loads(Image.open(f"sd35m-{seed}.png").text[JSON_KEY])["seed"] == seed


def test_progress_on_stderr_paths_on_stdout(fake):
    result = invoke("p", "--steps", "2", "--seed", "1")
    assert result.stdout == "sd35m-1.png\n"
    for text in ("Loading ", "encoding prompt", "denoising", "2/2", "s/step", "decoding", "peak memory"):
        assert text in result.stderr, text


def test_library_warnings_are_one_line_and_quiet_hides_them(fake, monkeypatch):
    import warnings

    def generate(prompt, **kwargs):
        warnings.warn("prompt truncated to 77 tokens", UserWarning, stacklevel=1)
        return FakePipeline.generate(fake, prompt, **kwargs)

    monkeypatch.setattr(fake, "generate", generate)
    result = invoke("p", "--steps", "1", "--seed", "1")
    assert "Warning: prompt truncated to 77 tokens\n" in result.stderr
    result = invoke("p", "--steps", "1", "--seed", "1", "-q", "--overwrite")
    assert result.stderr == ""


def test_quiet_prints_only_paths(fake):
    result = invoke("p", "--steps", "2", "--seed", "1", "-q")
    assert result.exit_code == 0
    assert result.stdout == "sd35m-1.png\n" and result.stderr == ""


def test_output_template_and_index(fake):
    Path("out").mkdir()
    result = invoke("p", "--steps", "1", "--seed", "4", "-n", "2", "-o", "out/cat-{index}-{seed}")
    assert result.exit_code == 0, result.output
    assert pngs("out") == ["cat-1-4.png", "cat-2-5.png"]
    result = invoke("p", "--steps", "1", "--seed", "4", "-n", "2", "-o", "dog.png")
    assert pngs() == ["dog-1.png", "dog-2.png"]
    result = invoke("p", "--steps", "1", "--seed", "4", "-o", "out/")
    assert (Path("out") / "sd35m-4.png").exists()


def test_existing_file_is_never_overwritten_silently(fake):
    Path("sd35m-1.png").write_bytes(b"precious")
    result = invoke("p", "--steps", "1", "--seed", "1")
    assert result.exit_code == 0
    assert Path("sd35m-1.png").read_bytes() == b"precious"
    assert result.stdout == "sd35m-1-1.png\n" and "exists; wrote sd35m-1-1.png" in result.stderr
    assert invoke("p", "--steps", "1", "--seed", "1").stdout == "sd35m-1-2.png\n"
    assert invoke("p", "--steps", "1", "--seed", "1", "--overwrite").stdout == "sd35m-1.png\n"
    assert Image.open("sd35m-1.png").size == (1024, 1024)


def test_same_seed_twice_in_one_run_keeps_both_even_with_overwrite(fake):
    result = invoke("p", "--steps", "1", "--seed", "1", "--seed", "1", "--overwrite")
    assert result.stdout.split() == ["sd35m-1.png", "sd35m-1-1.png"]


def test_png_metadata_a1111_parameters_and_json(fake):
    result = invoke("a cat, on a mat", "--negative-prompt", "dogs", "--steps", "3", "--seed", "42")
    assert result.exit_code == 0
    text = Image.open("sd35m-42.png").text
    prompt, negative, kv = text["parameters"].split("\n")
    assert prompt == "a cat, on a mat" and negative == "Negative prompt: dogs"
    assert kv.startswith(
        "Steps: 3, Sampler: Euler, Schedule type: Normal, CFG scale: 4.5, Seed: 42, Size: 1024x1024, Model: model, "
        "RNG: CPU"
    )
    stored = json.loads(text[JSON_KEY])
    assert stored["prompt"] == "a cat, on a mat" and stored["seed"] == 42
    assert stored["slg_layers"] == [7, 8, 9] and stored["slg"] is True
    assert stored["dtype"] == "float32" and stored["model"] == "model"


def test_parameters_text_round_trips():
    s = Settings(prompt='say "hi", then\nleave', negative_prompt="ugly", width=512, height=768, steps=12,
                 cfg=3.5, seed=99, sampler="dpmpp_2m", image="in.png", strength=0.4)  # fmt: skip
    got = parse_parameters(parameters_text(s, "sd35m-mlx test"))
    want = dict(prompt=s.prompt, negative_prompt="ugly", width=512, height=768, steps=12, cfg=3.5,
                seed=99, sampler="dpmpp_2m", strength=0.4, slg_scale=2.8, scheduler="normal", rng="cpu")  # fmt: skip
    assert got == want


def test_from_image_reruns_stored_settings_and_command_line_wins(fake):
    result = invoke("a fox", "--steps", "3", "--cfg", "6", "--seed", "11", "--no-slg", "--width", "512")
    assert result.exit_code == 0
    result = CliRunner().invoke(cli, ["--from-image", "sd35m-11.png", "--steps", "5", "-o", "again.png"])
    assert result.exit_code == 0, result.output
    first, again = fake.calls
    assert again == {**first, "num_inference_steps": 5}
    assert fake.loads[-1] == (Path("model"), "float32", True)


def test_from_image_reads_a1111_parameters(fake):
    Image.new("RGB", (64, 64)).save("a1111.png", pnginfo=_pnginfo(
        "parameters", "a tree\nNegative prompt: fog\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 123, "
        "Size: 512x640, Model: sd3.5_medium"))  # fmt: skip
    assert invoke("--from-image", "a1111.png").exit_code == 0
    (call,) = fake.calls
    assert (call["prompt"], call["negative_prompt"], call["seed"]) == ("a tree", "fog", 123)
    assert (call["sampler"], call["num_inference_steps"], call["guidance_scale"]) == ("dpmpp_2m", 20, 7)
    assert (call["width"], call["height"]) == (512, 640)


def _pnginfo(key, value):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(key, value)
    return info


def test_img2img_takes_size_from_image(fake):
    Image.new("RGB", (330, 260), "red").save("in.png")
    result = invoke("p", "--image", "in.png", "--strength", "0.3", "--steps", "2", "--seed", "1")
    assert result.exit_code == 0, result.output
    (call,) = fake.calls
    assert (call["image"], call["strength"], call["width"], call["height"]) == ("in.png", 0.3, 320, 256)
    assert "Denoising strength: 0.3" in Image.open("sd35m-1.png").text["parameters"]


def test_img2img_size_rules():
    from sd35m_mlx.record import size_for_image

    assert size_for_image(330, 260, None, None) == (320, 256)  # in the trained range: rounded down
    assert size_for_image(4032, 3024, None, None) == (1184, 880)  # a phone photo: about 1 MP, same aspect
    assert size_for_image(4032, 3024, 512, None) == (512, 384)  # one side given: the other keeps the aspect
    assert size_for_image(4032, 3024, 512, 512) == (512, 512)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", "1000"], "--width must be a multiple of 16, got 1000 (try 1008)"),
        (["--height", "777"], "--height must be a multiple of 16, got 777 (try 784)"),
        (["--width", "8192"], "--width must be between 64 and 6144 px, got 8192"),
        (["--height", "32"], "--height must be between 64 and 6144 px, got 32"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["-n", "0"], "--num-images must be at least 1, got 0"),
        (["--image", "in.png", "--strength", "0"], "--strength must be in (0, 1], got 0.0"),
        (["--image", "in.png", "--strength", "1.5"], "--strength must be in (0, 1], got 1.5"),
        (["--strength", "0.5"], "--strength only applies with --image"),
        (["--image", "missing.png"], "--image missing.png: cannot read it as an image"),
        (["--image", "notes.txt"], "--image notes.txt: cannot read it as an image"),
        (["-o", "nowhere/x.png"], "output folder nowhere does not exist"),
        (["-o", "notes.txt/x.png"], "output folder notes.txt is not a folder"),
        (["-o", "x.gif"], "--output must be a .png, .jpg, .jpeg or .webp file"),
        (["-o", "x-{size}.png"], "--output: unknown placeholder {size}"),
        (["-o", "a" * 250 + ".png"], "--output: the file name aaaaaaaaaaaaaaaaaaaaaaaa... is too long for its folder"),
        (["-n", "2", "-o", "é" * 120 + "-{seed}.png"], "bytes before the suffix; at most"),
        (["--max-sequence-length", "600"], "--max-sequence-length must be between 1 and 512"),
        (["--model", "no/such/folder"], "--model no/such/folder: no such folder"),
    ],
)
def test_bad_values_fail_in_one_line_before_loading(fake, args, message):
    Image.new("RGB", (64, 64)).save("in.png")
    Path("notes.txt").write_text("not an image")
    result = invoke("p", *args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1
    assert fake.loads == [] and pngs() == ["in.png"] and no_leftovers()


def test_the_longest_output_name_the_folder_takes_is_written(fake):
    import os

    stem = "a" * (os.pathconf(".", "PC_NAME_MAX") - len("..12345678.part"))  # write_image's temporary name fits
    result = invoke("p", "--steps", "2", "-o", f"{stem}.png")
    assert result.exit_code == 0, result.output
    assert pngs() == [f"{stem}.png"] and no_leftovers()


def test_missing_prompt_is_a_usage_error(fake):
    result = invoke()
    assert result.exit_code == 2 and "missing PROMPT" in result.stderr


def test_no_arguments_show_help_and_version_works():
    result = CliRunner().invoke(cli, [], prog_name="sd35m-mlx")
    assert result.exit_code == 0 and result.stdout.startswith("Usage: sd35m-mlx [OPTIONS] [PROMPT]")
    result = CliRunner().invoke(cli, ["--version"], prog_name="sd35m-mlx")
    assert result.exit_code == 0 and result.stdout.startswith("sd35m-mlx, version ")


def test_help_word_shows_help_like_git_and_pip_but_longer_prompts_stay_prompts(fake):
    runner = CliRunner()
    result = runner.invoke(cli, ["help"], prog_name="sd35m-mlx")
    assert result.exit_code == 0 and result.stdout.startswith("Usage: sd35m-mlx [OPTIONS] [PROMPT]")
    result = runner.invoke(cli, ["help", "serve"], prog_name="sd35m-mlx")
    assert result.exit_code == 0 and result.stdout.startswith("Usage: sd35m-mlx serve [OPTIONS]")
    assert fake.calls == []
    assert runner.invoke(cli, ["help", "me", "draw", "a", "cat", "--model", "model", "--steps", "1"]).exit_code == 0
    assert [c["prompt"] for c in fake.calls] == ["help me draw a cat"]


def test_unwritable_output_folder(fake, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    Path("ro").mkdir()
    monkeypatch.setattr(output.tempfile, "mkstemp", denied)  # chmod does not stop root, who runs CI here
    result = invoke("p", "-o", "ro/x.png")
    assert result.exit_code == 2
    assert result.stderr == "Error: cannot write to output folder ro: Permission denied\n"


def test_runtime_failure_is_one_line_exit_1_traceback_only_with_verbose(fake):
    fake.fail = RuntimeError("out of memory\nmore detail")
    result = invoke("p", "--steps", "2", "--seed", "1")
    assert result.exit_code == 1
    last = result.stderr.splitlines()[-1]
    assert last == "Error: RuntimeError: out of memory (--verbose shows the traceback)"
    assert "Traceback" not in result.stderr and pngs() == []
    result = invoke("p", "--steps", "2", "--seed", "1", "--verbose")
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_ctrl_c_exits_130_without_traceback_or_partial_file(fake):
    fake.fail, fake.fail_at_step = KeyboardInterrupt(), 2
    result = invoke("p", "--steps", "3", "--seed", "1", "--seed", "2")
    assert result.exit_code == 130
    assert "Interrupted" in result.stderr and "Traceback" not in result.stderr
    assert pngs() == [] and no_leftovers()


def test_ctrl_c_while_writing_leaves_no_partial_file(fake, monkeypatch):
    def save_half_then_interrupt(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save_half_then_interrupt)
    result = invoke("p", "--steps", "1", "--seed", "1")
    assert result.exit_code == 130 and pngs() == [] and no_leftovers()


def test_a_prompt_starting_with_a_command_like_word_is_still_a_prompt(fake):
    assert invoke("convert my photo", "--steps", "1").exit_code == 0
    result = CliRunner().invoke(cli, ["generate", "--model", "model", "generate", "--steps", "1"])
    assert result.exit_code == 0
    assert [c["prompt"] for c in fake.calls] == ["convert my photo", "generate"]


def test_unquoted_words_are_one_prompt_and_subcommands_still_dispatch(fake):
    runner = CliRunner()
    result = runner.invoke(cli, ["a", "cat", "in", "a", "hat", "--model", "model", "--steps", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["a", "--steps", "1", "cat", "--model", "model"])  # options between words
    assert result.exit_code == 0, result.output
    assert runner.invoke(cli, ["serve me tea", "--model", "model", "--steps", "1"]).exit_code == 0  # quoted
    assert [c["prompt"] for c in fake.calls] == ["a cat in a hat", "a cat", "serve me tea"]
    result = runner.invoke(cli, ["doctor", "--help"])  # a bare command word still selects the command
    assert result.exit_code == 0 and "doctor" in result.stdout.lower()


def test_subcommands_can_join_without_taking_prompts(fake):
    from sd35m_mlx_cli.generate import generate
    from sd35m_mlx_cli.group import DefaultGroup

    @click.command("convert")
    @click.argument("src")
    def convert(src):
        """Convert a checkpoint."""
        click.echo(f"converted {src}")

    group = DefaultGroup("sd35m-mlx", default="generate", commands=[generate, convert])
    runner = CliRunner()
    assert runner.invoke(group, ["convert", "a.safetensors"]).stdout == "converted a.safetensors\n"
    assert runner.invoke(group, ["convert my photo", "--model", "model", "--steps", "1"]).exit_code == 0
    assert fake.calls[0]["prompt"] == "convert my photo"
    help_text = runner.invoke(group, ["--help"], prog_name="sd35m-mlx").stdout
    assert "Other commands" in help_text and "Convert a checkpoint." in help_text


def test_cli_samplers_match_the_pipeline():
    from sd35m_mlx.sampling.samplers import SAMPLERS as PIPELINE_SAMPLERS

    assert SAMPLERS == PIPELINE_SAMPLERS


@pytest.mark.parametrize("name,fmt", [("x.jpg", "JPEG"), ("x.JPEG", "JPEG"), ("x.webp", "WEBP")])
def test_jpeg_and_webp_carry_a1111_exif_and_read_back(fake, name, fmt):
    result = invoke("a fox, at dusk: \u00e9t\u00e9", "--steps", "2", "--seed", "5", "-o", name, "--cfg", "3")
    assert result.exit_code == 0, result.output
    with Image.open(name) as im:
        assert im.format == fmt
        comment = im.getexif().get_ifd(0x8769)[0x9286]  # Exif UserComment, as A1111 writes it with piexif
    assert comment.startswith(b"UNICODE\0")
    text = comment[8:].decode("utf-16-be")
    assert text.startswith("a fox, at dusk: \u00e9t\u00e9\nSteps: 2") and "CFG scale: 3" in text
    assert no_leftovers()
    result = invoke("--from-image", name, "-o", "again.png")  # our JSON (Exif MakerNote) restores everything
    assert result.exit_code == 0, result.output
    first, again = fake.calls
    assert again == first


def test_quality_changes_a_jpeg_and_the_settings_survive_without_our_json(fake, tmp_path):
    from sd35m_mlx.record import JSON_KEY as KEY
    from sd35m_mlx.record import stored_text

    assert invoke("p", "--steps", "1", "--seed", "9", "-o", "lo.jpg", "--quality", "5").exit_code == 0
    assert invoke("p", "--steps", "1", "--seed", "9", "-o", "hi.jpg").exit_code == 0  # 95
    assert Path("lo.jpg").stat().st_size < Path("hi.jpg").stat().st_size
    with Image.open("hi.jpg") as im:  # an A1111 JPEG: the UserComment alone
        text = stored_text(im)
        parameters = text["parameters"]
        assert KEY in text
        exif = im.getexif()
        exif.get_ifd(0x8769).pop(0x927C)
        im.convert("RGB").save("a1111.jpg", exif=exif)
    with Image.open("a1111.jpg") as im:
        assert stored_text(im) == {"parameters": parameters}
    result = invoke("--from-image", "a1111.jpg", "-o", "from-text.png")
    assert result.exit_code == 0, result.output
    assert fake.calls[-1]["seed"] == 9 and fake.calls[-1]["num_inference_steps"] == 1


def test_plan_paths_adds_png_suffix():
    assert output.plan_paths("render", [1]) == [Path("render.png")]


# ---------------------------------------------------------------------------------------------------
# The installed console script on the tiny random-weight pipeline


def run_script(*args, cwd):
    exe = shutil.which("sd35m-mlx") or str(Path(sys.executable).with_name("sd35m-mlx"))
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_console_script_writes_reproducible_png_with_metadata(tiny_pipeline, tmp_path):
    common = ["a red cube", "--model", str(tiny_pipeline), "--width", "64", "--height", "96",
              "--steps", "2", "--dtype", "float32", "--seed", "7"]  # fmt: skip
    first = run_script(*common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "sd35m-7.png\n"
    assert "peak memory" in first.stderr and "(seed 7)" in first.stderr
    again = run_script(*common, "-o", "again.png", cwd=tmp_path)
    assert again.returncode == 0, again.stderr

    a, b = Image.open(tmp_path / "sd35m-7.png"), Image.open(tmp_path / "again.png")
    assert a.size == (64, 96) and a.mode == "RGB"
    start = "a red cube\nSteps: 2, Sampler: Euler, Schedule type: Normal, CFG scale: 4.5, Seed: 7, "
    assert a.text["parameters"].startswith(start)
    assert "Size: 64x96" in a.text["parameters"]
    stored = json.loads(a.text[JSON_KEY])
    assert (stored["width"], stored["height"], stored["steps"], stored["seed"]) == (64, 96, 2, 7)
    # Same seed, same settings, same process-independent RNG: identical pixels (exact, no tolerance).
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_quantization_and_low_memory_reach_the_loader_and_the_png(fake):
    result = invoke("p", "--quantize", "8", "--t5-quantize", "4", "--low-memory", "--seed", "1", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert fake.load_options == {"quantize": 8, "t5_quantize": "4", "low_memory": True}
    result = invoke("--from-image", "sd35m-1.png", "--seed", "2", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert fake.load_options == {"quantize": 8, "t5_quantize": "4", "low_memory": None}
