"""Issue 25's prompt syntax and LoRA tags through generate() and the CLI: prompt_syntax="plain" is diffusers'
encoding bit for bit, "weighted" is prompts/weighted.py's; `<lora:NAME:W>` tags load NAME from --lora-dir
exactly as --lora loads the same file, are recorded as typed, and bad tags exit 2 with one line."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from lora_writers import save
from PIL import Image

from sd35m_mlx import StableDiffusion35
from sd35m_mlx.prompts.weighted import encode_prompt_weighted
from sd35m_mlx_cli.main import cli

SMALL = dict(width=64, height=64, num_inference_steps=2, seed=3, output_type="np")
EMPHASIS = "a (red:1.6) cube on [blue] grass"


def _embeds(e):
    return dict(prompt_embeds=e[0], negative_prompt_embeds=e[1], pooled_prompt_embeds=e[2],
                negative_pooled_prompt_embeds=e[3])  # fmt: skip


def test_plain_is_encode_prompt_and_weighted_is_encode_prompt_weighted(pipe):
    plain = pipe.generate(EMPHASIS, **SMALL)
    assert np.array_equal(plain, pipe.generate(EMPHASIS, prompt_syntax="plain", **SMALL))
    given = pipe.generate(**_embeds(pipe.prompt_encoder.encode_prompt(EMPHASIS)), **SMALL)
    assert np.array_equal(plain, given), "plain must be diffusers' encode_prompt, bit for bit"

    weighted = pipe.generate(EMPHASIS, prompt_syntax="weighted", **SMALL)
    assert not np.array_equal(weighted, plain), "the weights must change the image (and the cache key)"
    given = pipe.generate(**_embeds(encode_prompt_weighted(pipe.prompt_encoder, EMPHASIS)), **SMALL)
    assert np.array_equal(weighted, given)
    assert np.array_equal(plain, pipe.generate(EMPHASIS, **SMALL)), "the prompt cache must not serve the weighted"
    e = pipe.encode_prompt(EMPHASIS, prompt_syntax="weighted")
    assert np.array_equal(np.asarray(e[0]), np.asarray(encode_prompt_weighted(pipe.prompt_encoder, EMPHASIS)[0]))


def test_unknown_prompt_syntax_is_one_line_naming_the_valid_ones(pipe):
    for call in (lambda: pipe.generate("x", prompt_syntax="compel", **SMALL),
                 lambda: pipe.encode_prompt("x", prompt_syntax="compel")):  # fmt: skip
        with pytest.raises(ValueError, match="prompt_syntax 'compel'; choose one of plain, weighted") as e:
            call()
        assert "\n" not in str(e.value)


def test_weighted_works_in_low_memory_stages(tiny_pipeline, pipe):
    staged = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32", low_memory=True)
    assert staged.prompt_encoder is None  # encoders load per stage
    long = EMPHASIS + " BREAK " + ", ".join(["a tall tower"] * 30)  # several CLIP chunks
    want = pipe.generate(long, prompt_syntax="weighted", **SMALL)
    assert np.array_equal(staged.generate(long, prompt_syntax="weighted", **SMALL), want)


# -- the CLI --------------------------------------------------------------------------------------------


@pytest.fixture
def lora_dir(tmp_path):
    rng = np.random.default_rng(0)
    t = {}
    for i in range(4):
        t[f"transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight"] = rng.standard_normal((4, 32)) / 6
        t[f"transformer.transformer_blocks.{i}.attn.to_q.lora_B.weight"] = rng.standard_normal((32, 4)) * 0.3
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    save(folder / "styles" / "ink.safetensors", t, {"ss_output_name": "inky"})
    return folder


def _run(tiny_pipeline, prompt, *args, **kwargs):
    common = ["--model", str(tiny_pipeline), "--width", "64", "--height", "64", "--steps", "2", "--dtype", "float32"]
    return CliRunner().invoke(cli, [prompt, *common, "--seed", "3", *args], catch_exceptions=False, **kwargs)


def test_cli_lora_tag_equals_lora_option_and_replays(tiny_pipeline, lora_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = lora_dir / "styles" / "ink.safetensors"
    result = _run(tiny_pipeline, "a red cube", "--lora", str(path), "--lora-scale", "0.7", "-o", "option.png")
    assert result.exit_code == 0, result.output
    result = _run(tiny_pipeline, "a red cube <lora:styles/ink:0.7>", "--lora-dir", str(lora_dir), "-o", "tag.png")
    assert result.exit_code == 0, result.output
    option, tag = Image.open("option.png"), Image.open("tag.png")
    assert np.array_equal(np.asarray(option), np.asarray(tag))
    assert not np.array_equal(np.asarray(tag), np.asarray(Image.open(_plain(tiny_pipeline))))

    params, stored = tag.text["parameters"], json.loads(tag.text["sd35m-mlx"])
    assert params.startswith("a red cube <lora:styles/ink:0.7>\n"), params  # as typed, not twice
    assert "Lora hashes:" in params and "Prompt syntax: weighted" in params
    assert stored["prompt"] == "a red cube <lora:styles/ink:0.7>" and stored["loras"] == []
    assert stored["lora_tags"][0][:2] == ["styles/ink", 0.7] and len(stored["lora_tags"][0][2]) == 10
    assert stored["prompt_syntax"] == "weighted"

    result = CliRunner().invoke(
        cli, ["--from-image", "tag.png", "-o", "again.png"], env={"SD35M_MLX_LORA_DIR": str(lora_dir)}
    )
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open("again.png")), np.asarray(tag))
    result = CliRunner().invoke(cli, ["--from-image", "tag.png", "-o", "nodir.png"], env={"SD35M_MLX_LORA_DIR": ""})
    assert result.exit_code == 2 and "--lora-dir" in result.output


def _plain(tiny_pipeline) -> str:
    assert _run(tiny_pipeline, "a red cube", "-o", "plain.png").exit_code == 0
    return "plain.png"


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("x <lora:../x>", "'..'"),
        ("x <lora:/etc/passwd>", "not a name in"),
        ("x <lora:a\\b>", "not a name in"),
        ("x <lora:nothing:0.5>", "no LoRA named 'nothing'"),
        ("x <lora:ink:2:3>", "one weight"),
        ("x" + " <lora:ink>" * 1000, "at most 32 <lora:...> tags"),
    ],
)
def test_bad_tags_exit_2_in_one_line(tiny_pipeline, lora_dir, tmp_path, monkeypatch, prompt, message):
    monkeypatch.chdir(tmp_path)
    result = _run(tiny_pipeline, prompt, "--lora-dir", str(lora_dir))
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not list(tmp_path.glob("*.png"))


def test_tags_need_a_folder_and_stay_out_of_the_negative_prompt(tiny_pipeline, lora_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _run(tiny_pipeline, "x <lora:ink>", env={"SD35M_MLX_LORA_DIR": ""})
    assert result.exit_code == 2 and "--lora-dir (or SD35M_MLX_LORA_DIR)" in result.output
    result = _run(tiny_pipeline, "x", "--negative-prompt", "<lora:ink>", "--lora-dir", str(lora_dir))
    assert result.exit_code == 2 and "apply in the prompt only" in result.output
    result = _run(tiny_pipeline, "x", "--prompt-syntax", "compel")
    assert result.exit_code == 2 and "weighted" in result.output


def test_cli_prompt_syntax_default_weighted_and_old_pngs_replay_plain(tiny_pipeline, pipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    want = {s: pipe.generate(EMPHASIS, guidance_scale=4.5, prompt_syntax=s, **{**SMALL, "output_type": "pil"})[0]
            for s in ("plain", "weighted")}  # fmt: skip
    assert _run(tiny_pipeline, EMPHASIS, "--no-slg", "--cfg", "4.5", "-o", "w.png").exit_code == 0
    assert np.array_equal(np.asarray(Image.open("w.png")), np.asarray(want["weighted"]))
    assert (
        _run(tiny_pipeline, EMPHASIS, "--no-slg", "--cfg", "4.5", "--prompt-syntax", "plain", "-o", "p.png").exit_code
        == 0
    )
    assert np.array_equal(np.asarray(Image.open("p.png")), np.asarray(want["plain"]))
    assert "Prompt syntax" not in Image.open("p.png").text["parameters"]

    old = Image.open("w.png")  # a PNG written before --prompt-syntax: no such field
    stored = json.loads(old.text["sd35m-mlx"])
    del stored["prompt_syntax"], stored["lora_tags"]
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("sd35m-mlx", json.dumps(stored))
    old.save("old.png", pnginfo=info)
    result = CliRunner().invoke(cli, ["--from-image", "old.png", "-o", "replay.png"])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open("replay.png")), np.asarray(want["plain"]))


def test_prompts_file_runs_each_line_with_its_options_and_loras(tiny_pipeline, lora_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--model", str(tiny_pipeline), "--width", "64", "--height", "64", "--steps", "2", "--dtype", "float32"]
    assert _run(tiny_pipeline, "a red cube <lora:ink:0.7>", "--lora-dir", str(lora_dir), "-o", "tag.png").exit_code == 0
    ball = ["a blue ball", *common, "--steps", "1", "--cfg", "3", "--seed", "9", "-o", "ball.png"]
    assert CliRunner().invoke(cli, ball).exit_code == 0
    Path("prompts.txt").write_text(
        "# a comment, then a blank line\n\n"
        "a red cube <lora:ink:0.7>\n"
        '--prompt "a blue ball" --steps 1 --seed 9 --cfg_scale 3 --sampler_name Euler\n'
    )
    args = [
        "--prompts-file",
        "prompts.txt",
        *common,
        "--seed",
        "3",
        "--lora-dir",
        str(lora_dir),
        "-o",
        "out-{index}.png",
    ]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open("out-1.png")), np.asarray(Image.open("tag.png")))
    assert np.array_equal(np.asarray(Image.open("out-2.png")), np.asarray(Image.open("ball.png")))  # LoRA off again

    for line, message in (
        ("--prompt x --restore_faces true", "line 1: unknown option '--restore_faces'"),
        ("--prompt x --steps many", "line 1: --steps 'many'"),
        ("--prompt x --sampler_name 'DPM fast'", "unknown sampler 'DPM fast'"),
        ("x <lora:../etc>", "line 1: PROMPT: LoRA name"),
    ):
        Path("bad.txt").write_text(line + "\n")
        result = CliRunner().invoke(cli, ["--prompts-file", "bad.txt", *common, "--lora-dir", str(lora_dir)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_prompts_file_reads_a_bom_refuses_binary_and_stops_at_the_cap(tmp_path):
    from sd35m_mlx_cli.errors import UsageError
    from sd35m_mlx_cli.prompts_file import read

    (tmp_path / "bom.txt").write_bytes("\ufeffa cat\n--prompt dog --seed 3\n".encode())  # Notepad's UTF-8
    assert [p["prompt"] for _, p in read(str(tmp_path / "bom.txt"))] == ["a cat", "dog"]
    (tmp_path / "bin.txt").write_bytes(b"a cat\n\x80\xff")
    with pytest.raises(UsageError, match=r"bin.txt: not UTF-8 text \(byte 0x80 at offset 6\)$"):
        read(str(tmp_path / "bin.txt"))
    with pytest.raises(UsageError, match="cannot read it \\(Is a directory\\)$"):
        read(str(tmp_path))
    if Path("/dev/zero").exists():  # its size says 0 and its read never ends
        with pytest.raises(UsageError, match="larger than 1 MB"):
            read("/dev/zero")


def test_prompts_file_applies_a_hub_id_lora_to_every_line(tiny_pipeline, lora_dir, tmp_path, monkeypatch):
    """--lora owner/repo (from the HF cache, offline) with --prompts-file: every line runs with it, not only the
    first (the later lines switch adapters with use_loras, which must resolve Hub ids as load_lora_weights does)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--someone--ink-lora" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "ink.safetensors").write_bytes((lora_dir / "styles" / "ink.safetensors").read_bytes())
    (cache / "models--someone--ink-lora" / "refs").mkdir()
    (cache / "models--someone--ink-lora" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # conftest keeps HF_HUB_OFFLINE on
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    common = ["--model", str(tiny_pipeline), "--width", "64", "--height", "64", "--steps", "2", "--dtype", "float32"]
    local = ["--lora", str(lora_dir / "styles" / "ink.safetensors"), "--lora-scale", "0.7"]
    for prompt, seed, out in (("a red cube", "3", "cube.png"), ("a blue ball", "9", "ball.png")):
        assert CliRunner().invoke(cli, [prompt, *common, *local, "--seed", seed, "-o", out]).exit_code == 0
    Path("prompts.txt").write_text('a red cube\n--prompt "a blue ball" --seed 9\n')
    args = ["--prompts-file", "prompts.txt", *common, "--seed", "3", "--lora", "someone/ink-lora", "--lora-scale",
            "0.7", "-o", "out-{index}.png"]  # fmt: skip
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open("out-1.png")), np.asarray(Image.open("cube.png")))
    assert np.array_equal(np.asarray(Image.open("out-2.png")), np.asarray(Image.open("ball.png")))
