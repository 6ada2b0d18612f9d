"""--lora / --lora-scale: applied, recorded in the PNG (A1111 tags, hashes, our JSON), re-applied by --from-image."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from lora_writers import save
from PIL import Image

from sd35m_mlx.lora.files import sha256
from sd35m_mlx_cli.main import cli
from sd35m_mlx_cli.metadata import JSON_KEY, parse_parameters


@pytest.fixture
def lora_file(tmp_path):
    rng = np.random.default_rng(0)
    t = {}
    for i in range(4):  # every block's q and the adaLN of block 0 (tiny fixture: width 32)
        t[f"transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight"] = rng.standard_normal((4, 32)) / 6
        t[f"transformer.transformer_blocks.{i}.attn.to_q.lora_B.weight"] = rng.standard_normal((32, 4)) * 0.3
    t["transformer.transformer_blocks.0.norm1.linear.lora_A.weight"] = rng.standard_normal((4, 32)) / 6
    t["transformer.transformer_blocks.0.norm1.linear.lora_B.weight"] = rng.standard_normal((9 * 32, 4)) * 0.3
    return save(tmp_path / "style.safetensors", t)


def _run(tiny_pipeline, *args):
    common = ["--model", str(tiny_pipeline), "--width", "64", "--height", "64", "--steps", "2", "--dtype", "float32"]
    return CliRunner().invoke(cli, ["a red cube", *common, "--seed", "3", *args], catch_exceptions=False)


def test_lora_options_apply_record_and_reapply(tiny_pipeline, lora_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _run(tiny_pipeline, "-o", "plain.png").exit_code == 0
    result = _run(tiny_pipeline, "--lora", str(lora_file), "--lora-scale", "0.7", "-o", "lora.png")
    assert result.exit_code == 0, result.output
    plain, styled = Image.open("plain.png"), Image.open("lora.png")
    assert not np.array_equal(np.asarray(plain), np.asarray(styled)), "the LoRA must change the image"

    short = sha256(lora_file)[:10]
    params = styled.text["parameters"]
    assert (
        params.startswith("a red cube <lora:style:0.7>\n") and f'Lora hashes: "style: {short}"' in params
    )  # quoted, as A1111 writes it
    assert parse_parameters(params)["prompt"] == "a red cube"
    assert json.loads(styled.text[JSON_KEY])["loras"] == [[str(lora_file), 0.7, short]]

    result = CliRunner().invoke(cli, ["--from-image", "lora.png", "-o", "again.png"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open("again.png")), np.asarray(styled))
    result = CliRunner().invoke(cli, ["--from-image", "lora.png", "--lora-scale", "0", "-o", "zero.png"])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open("zero.png")), np.asarray(plain))  # weight 0: exactly no LoRA

    changed = save(
        tmp_path / "changed.safetensors",
        {
            "transformer.proj_out.lora_A.weight": np.ones((1, 32)),
            "transformer.proj_out.lora_B.weight": np.ones((64, 1)),
        },
    )
    original = lora_file.read_bytes()
    lora_file.write_bytes(changed.read_bytes())
    result = CliRunner().invoke(cli, ["--from-image", "lora.png", "-o", "changed.png"], catch_exceptions=False)
    assert result.exit_code == 0 and f"not {short} as recorded in the image" in result.output
    lora_file.write_bytes(original)

    lora_file.rename(tmp_path / "moved.safetensors")
    result = CliRunner().invoke(cli, ["--from-image", "lora.png", "-o", "missing.png"], catch_exceptions=False)
    assert result.exit_code == 0 and f"LoRA {lora_file} (sha256 {short}, scale 0.7)" in result.output
    assert np.array_equal(np.asarray(Image.open("missing.png")), np.asarray(plain))


def test_bad_lora_options_exit_2(tiny_pipeline, lora_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.ckpt").write_bytes(b"x")
    for args, message in (
        (["--lora", "old.ckpt"], "pickle files"),
        (["--lora", "nothing.safetensors"], "no such file"),
        (["--lora", str(lora_file), "--lora-scale", "1", "--lora-scale", "2"], "one scale per LoRA"),
    ):
        result = _run(tiny_pipeline, *args)
        assert result.exit_code == 2 and message in result.output, result.output
