"""Where LoRA files come from: local files and folders, Hub ids through the HF cache (offline here), never pickles."""

import numpy as np
import pytest
from lora_writers import save

from sd35m_mlx.lora import LoraError
from sd35m_mlx.lora.files import resolve


def test_local_files_and_folders(tmp_path):
    (tmp_path / "a").mkdir()
    one = save(tmp_path / "a" / "x.safetensors", {"k": np.ones(2)})
    assert resolve(one) == one
    assert resolve(tmp_path / "a") == one  # a folder with one LoRA file
    save(tmp_path / "a" / "pytorch_lora_weights.safetensors", {"k": np.ones(2)})
    assert resolve(tmp_path / "a").name == "pytorch_lora_weights.safetensors"  # diffusers' name wins
    save(tmp_path / "a" / "y.safetensors", {"k": np.ones(2)})
    assert resolve(tmp_path / "a", weight_name="y.safetensors").name == "y.safetensors"


@pytest.mark.parametrize("source", ["model.ckpt", "lora.pt", "weights.bin"])
def test_pickles_are_refused(source, tmp_path):
    (tmp_path / source).write_bytes(b"\x80\x04")
    with pytest.raises(LoraError, match="pickle"):
        resolve(tmp_path / source)
    with pytest.raises(LoraError, match="pickle"):
        resolve("owner/repo", weight_name=source)


def test_hub_ids_offline_say_what_to_do():
    with pytest.raises(LoraError, match="HF_HUB_OFFLINE"):
        resolve("someone/sd35-style-lora")
    with pytest.raises(LoraError, match="offline|HF_HUB_OFFLINE|cache"):
        resolve("someone/sd35-style-lora/style.safetensors")
    with pytest.raises(LoraError, match="no such file"):
        resolve("not-a-file.safetensors")
