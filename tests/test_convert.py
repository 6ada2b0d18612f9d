"""`sd35m-mlx convert`: converted folders load with no conversion and give the very same images.

float32 throughout, so equality is exact (np.array_equal): a converted folder holds the same numbers
(or the same quantized numbers) in our own layout, and the same code runs on them.
"""

import json
import os
import stat
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

from sd35m_mlx import StableDiffusion35
from sd35m_mlx.convert import convert
from sd35m_mlx.loading import mlx_format
from sd35m_mlx.loading.mlx_format import is_converted_folder, load_converted
from sd35m_mlx.loading.safetensors_io import WeightsError
from sd35m_mlx.loading.sources import load_pipeline_parts
from sd35m_mlx.quantize import Quantization, quantization_of, quantize_parts
from sd35m_mlx_cli.main import cli

GROUP = 32  # the tiny fixture is 32 wide (see tests/test_quantize.py)
KW = dict(height=64, width=96, num_inference_steps=3, seed=11, guidance_scale=4.5, output_type="np")
PROMPT = "a lighthouse on a cliff at dusk"


def _pipe(parts):
    return StableDiffusion35(parts.transformer, parts.vae, parts.prompt_encoder, parts.schedule, mx.float32)


@pytest.fixture(scope="module")
def converted(tiny_pipeline, tmp_path_factory):
    return convert(tiny_pipeline, tmp_path_factory.mktemp("convert") / "f32", dtype=mx.float32)


@pytest.fixture(scope="module")
def converted_q8(tiny_pipeline, tmp_path_factory):
    dst = tmp_path_factory.mktemp("convert") / "q8"
    return convert(tiny_pipeline, dst, dtype=mx.float32, transformer_bits=8, t5_bits=8, group_size=GROUP)


def test_converted_folder_gives_identical_images(tiny_pipeline, converted):
    source = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32")
    ours = StableDiffusion35.from_pretrained(converted, dtype="float32")
    a, b = source.generate(PROMPT, **KW), ours.generate(PROMPT, **KW)
    assert a.std() > 0.02
    assert np.array_equal(a, b)


def test_8bit_converted_folder_equals_quantizing_the_source_in_memory(tiny_pipeline, converted_q8):
    in_memory = quantize_parts(
        load_pipeline_parts(tiny_pipeline, mx.float32), transformer_bits=8, t5_bits=8, group_size=GROUP
    )
    loaded = load_converted(converted_q8, mx.float32)
    a = _pipe(in_memory).generate(PROMPT, **KW)
    b = _pipe(loaded).generate(PROMPT, **KW)
    assert np.isfinite(b).all() and b.std() > 0.02
    assert np.array_equal(a, b)

    blocks = loaded.transformer.transformer_blocks
    assert isinstance(blocks[0].attn.to_q, nn.QuantizedLinear) and blocks[0].attn.to_q.bits == 8
    assert isinstance(blocks[0].ff.net[2], nn.QuantizedLinear)
    assert blocks[0].norm1.linear.bits == 8  # adaLN: quantized, never below 8 bits
    assert type(loaded.transformer.context_embedder) is nn.Linear and type(loaded.transformer.proj_out) is nn.Linear
    t5 = loaded.prompt_encoder.text_encoder_3
    assert isinstance(t5.encoder.block[1].layer[1].DenseReluDense.wo, nn.QuantizedLinear)
    assert type(t5.shared) is nn.Embedding
    assert quantization_of(loaded.prompt_encoder.text_encoder) is None


def test_4bit_conversion_records_the_8_bit_adaln_layers_per_layer(tiny_pipeline, tmp_path):
    dst = convert(tiny_pipeline, tmp_path / "q4", dtype=mx.float32, transformer_bits=4, load_t5=False, group_size=GROUP)
    config = json.loads((dst / "transformer" / "config.json").read_text())["quantization"]
    assert config["bits"] == 4 and config["norm_out.linear"] == {"group_size": GROUP, "bits": 8}
    assert config["transformer_blocks.3.norm1_context.linear"] == {"group_size": GROUP, "bits": 8}
    loaded = load_converted(dst, mx.float32, load_t5=False)
    blocks = loaded.transformer.transformer_blocks
    assert (blocks[0].norm1.linear.bits, blocks[0].attn.to_q.bits) == (8, 4)
    in_memory = quantize_parts(load_pipeline_parts(tiny_pipeline, mx.float32, load_t5=False), transformer_bits=4,
                               group_size=GROUP)  # fmt: skip
    assert np.array_equal(_pipe(in_memory).generate(PROMPT, **KW), _pipe(loaded).generate(PROMPT, **KW))


def test_layout_follows_mlx_lm_conventions(converted_q8):
    index = json.loads((converted_q8 / "model_index.json").read_text())
    assert index["sd35m_mlx"] == {"format": 1, "dtype": "float32"} and is_converted_folder(converted_q8)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        folder = converted_q8 / name
        config = json.loads((folder / "config.json").read_text())
        quantized = name in ("transformer", "text_encoder_3")
        assert config.get("quantization") == ({"group_size": GROUP, "bits": 8} if quantized else None), name
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(weight_map.values()) == {"model.safetensors"}
        assert ("transformer_blocks.0.attn.to_q.scales" in weight_map) == (name == "transformer")
    transformer = json.loads((converted_q8 / "transformer" / "config.json").read_text())
    assert transformer["num_layers"] == 4 and transformer["dual_attention_layers"] == [0, 1]
    header = mx.load(str(converted_q8 / "transformer" / "model.safetensors"))
    assert header["pos_embed.proj.weight"].shape == (32, 2, 2, 16)  # already OHWI: no work at load
    for folder in ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"):
        assert any((converted_q8 / folder).iterdir()), folder


def test_large_components_are_sharded_with_an_index(tiny_pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr(mlx_format, "MAX_SHARD_BYTES", 200_000)
    dst = convert(tiny_pipeline, tmp_path / "sharded", dtype=mx.float32, load_t5=False)
    files = sorted(p.name for p in (dst / "transformer").glob("*.safetensors"))
    assert len(files) >= 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((dst / "transformer" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    assert all((dst / "transformer" / f).stat().st_size <= 200_000 + 4096 for f in files)
    source = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32", load_t5=False)
    ours = StableDiffusion35.from_pretrained(dst, dtype="float32", load_t5=False)
    assert np.array_equal(source.generate(PROMPT, **KW), ours.generate(PROMPT, **KW))


def test_tokenizer_files_are_copied_from_the_source(tiny_pipeline, converted):
    for slot in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        names = {p.name for p in (tiny_pipeline / slot).iterdir()}
        assert names == {p.name for p in (converted / slot).iterdir()}, slot
        for name in names:
            assert (tiny_pipeline / slot / name).read_bytes() == (converted / slot / name).read_bytes()


def test_existing_empty_destination_is_filled(tiny_pipeline, tmp_path):
    (tmp_path / "empty").mkdir()
    dst = convert(tiny_pipeline, tmp_path / "empty", dtype=mx.float32, load_t5=False)
    assert is_converted_folder(dst) and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_without_t5(tiny_pipeline, tmp_path):
    dst = convert(tiny_pipeline, tmp_path / "no-t5", dtype=mx.float32, load_t5=False)
    assert not (dst / "text_encoder_3").exists() and not (dst / "tokenizer_3").exists()
    with pytest.raises(WeightsError, match="converted without T5.*load_t5=False"):
        load_pipeline_parts(dst, mx.float32)
    parts = load_pipeline_parts(dst, mx.float32, load_t5=False)
    assert parts.prompt_encoder.text_encoder_3 is None


def test_stored_dtype_is_cast_to_the_compute_dtype(tiny_pipeline, tmp_path):
    dst = convert(tiny_pipeline, tmp_path / "bf16", transformer_bits=8, group_size=GROUP)  # default bfloat16
    stored = mx.load(str(dst / "transformer" / "model.safetensors"))
    assert stored["proj_out.weight"].dtype == mx.bfloat16
    assert stored["transformer_blocks.0.attn.to_q.scales"].dtype == mx.bfloat16
    parts = load_converted(dst, mx.float32, load_t5=False)
    assert parts.transformer.proj_out.weight.dtype == mx.float32
    assert parts.transformer.transformer_blocks[0].attn.to_q.scales.dtype == mx.float32
    out = _pipe(parts).generate(PROMPT, **KW)
    assert np.isfinite(out).all()


def test_unknown_format_version_is_refused(converted, tmp_path):
    index = json.loads((converted / "model_index.json").read_text())
    folder = tmp_path / "future"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({**index, "sd35m_mlx": {"format": 2}}))
    with pytest.raises(WeightsError, match="format 2 is not supported"):
        load_pipeline_parts(folder, mx.float32)


def test_failure_while_writing_leaves_nothing(tiny_pipeline, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mlx_format, "_save_sharded", fail)
    with pytest.raises(OSError, match="No space left"):
        convert(tiny_pipeline, tmp_path / "out", dtype=mx.float32)
    assert list(tmp_path.iterdir()) == []


# -- the command --------------------------------------------------------------------------------


def _invoke(*args):
    return CliRunner().invoke(cli, ["convert", *map(str, args)], catch_exceptions=False)


def test_cli_convert_writes_a_loadable_quantized_folder(tiny_pipeline, tmp_path):
    dst = tmp_path / "models" / "q8"
    result = _invoke(tiny_pipeline, dst, "--quantize", "8", "--t5-quantize", "4", "--group-size", "32")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{dst}\n"
    assert "Quantizing the transformer to 8 bits" in result.stderr and "Wrote transformer/" in result.stderr
    parts = load_pipeline_parts(dst, mx.float32)
    assert quantization_of(parts.transformer) == Quantization(8, GROUP)
    assert quantization_of(parts.prompt_encoder.text_encoder_3) == Quantization(4, GROUP)
    assert [p.name for p in dst.parent.iterdir()] == ["q8"]  # no temporary folder left beside it


@pytest.mark.parametrize(
    "make_args, code, message",
    [
        (lambda src, tmp: [src, tmp / "full"], 2, "exists and is not empty"),
        (lambda src, tmp: [tmp / "missing", tmp / "out"], 1, "no such model folder or file"),
        (lambda src, tmp: [tmp / "full", tmp / "out"], 1, "not a diffusers-layout model folder"),
        (lambda src, tmp: [src, tmp / "out", "--quantize", "3"], 2, "'3' is not one of '4', '8'"),
    ],
)
def test_cli_convert_rejects_bad_input_in_one_line(tiny_pipeline, tmp_path, make_args, code, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    result = _invoke(*make_args(tiny_pipeline, tmp_path))
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert message in result.stderr
    errors = [line for line in result.stderr.splitlines() if "Error" in line]
    assert len(errors) == 1 and errors[0] == result.stderr.splitlines()[-1]  # progress lines may come first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing written, nothing half-written
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_a_prompt_starting_with_convert_still_generates():
    result = CliRunner().invoke(cli, ["convert this photo", "--help"])
    assert result.exit_code == 0 and "Generate images from PROMPT" in result.stdout


def test_convert_help_explains_every_option():
    result = CliRunner().invoke(cli, ["convert", "--help"], terminal_width=100)
    assert result.exit_code == 0
    for option in ("--quantize", "--t5-quantize", "--dtype", "--group-size", "--no-t5"):
        assert option in result.stdout
    assert "[default: bfloat16]" in result.stdout and "[default: 64]" in result.stdout


def test_converted_folder_is_detected_only_by_its_marker(tiny_pipeline, converted):
    assert is_converted_folder(converted) and not is_converted_folder(tiny_pipeline)
    assert not is_converted_folder(Path("/nonexistent"))


def test_the_converted_folder_honours_the_umask(tiny_pipeline, tmp_path):
    """A service user (another account) must be able to read a model converted with the usual umask 022."""
    old = os.umask(0o022)
    try:
        dst = convert(tiny_pipeline, tmp_path / "shared", dtype=mx.float32, load_t5=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o755
    for f in dst.rglob("*"):
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f
