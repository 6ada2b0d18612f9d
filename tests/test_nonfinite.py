"""NaN and infinity: a damaged file is refused at load naming file and tensor; a generation whose numbers break
stops with one line naming the likely cause and writes no file (it used to write a black PNG, exit 0)."""

import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from sd35m_mlx import StableDiffusion35
from sd35m_mlx.loading.safetensors_io import WeightsError
from sd35m_mlx.sampling.finite import NonFiniteError
from sd35m_mlx_cli.main import cli

SMALL = dict(height=64, width=64, num_inference_steps=2, seed=0)


def _poison(folder, component: str, key_part: str, value=np.nan) -> str:
    path = next((folder / component).glob("*.safetensors"))
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if key_part in k and tensors[k].dtype.kind == "f")
    tensors[key] = tensors[key].copy()
    tensors[key].flat[3] = value
    save_file(tensors, path)
    return key


@pytest.mark.parametrize("component, part, value", [("transformer", "proj_out.weight", np.nan),
                                                    ("vae", "conv_in.weight", np.inf),
                                                    ("text_encoder_3", "wo.weight", -np.inf)])  # fmt: skip
def test_a_tensor_with_nan_or_inf_is_refused_at_load(tiny_pipeline, tmp_path, component, part, value):
    folder = tmp_path / "m"
    shutil.copytree(tiny_pipeline, folder)
    key = _poison(folder, component, part, value)
    with pytest.raises(WeightsError) as e:
        StableDiffusion35.from_pretrained(folder, dtype="float32")
    message = str(e.value)
    assert "\n" not in message and str(folder / component) in message and "NaN or infinite" in message
    assert key.rsplit(".", 1)[0] in message


def test_a_broken_model_index_names_its_file(tiny_pipeline, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_pipeline, folder)
    (folder / "model_index.json").write_text("{'not': json")
    with pytest.raises(WeightsError, match=r"model_index\.json: invalid JSON"):
        StableDiffusion35.from_pretrained(folder, dtype="float32")


@pytest.fixture
def broken(ours):
    """`ours` whose output layer overflows (as a float16 model or an extreme LoRA would), restored after."""
    layer = ours.transformer.proj_out
    saved = layer.weight
    layer.weight = mx.full(saved.shape, 1e38, dtype=saved.dtype)
    yield ours
    layer.weight = saved


def test_a_generation_that_overflows_stops_with_the_likely_cause(broken):
    with pytest.raises(NonFiniteError, match=r"latents at step 1 of 2 became NaN or infinite; try --dtype float32"):
        broken.generate("a cat", **SMALL)


def test_the_cli_writes_no_file_for_a_broken_generation(broken, behind_cli):
    behind_cli(broken)
    result = CliRunner().invoke(cli, ["a cat", "--model", "model", "--steps", "2", "--width", "64", "--height", "64"])
    assert result.exit_code == 1
    assert "became NaN or infinite" in result.output and "Traceback" not in result.output
    assert not list(Path.cwd().glob("*.png"))


def test_a_healthy_generation_passes_the_check(ours):
    assert np.isfinite(ours.generate("a cat", output_type="np", **SMALL)).all()
