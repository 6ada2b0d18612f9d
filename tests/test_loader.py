"""Loader errors name the problem, the key and the file."""

import json
import shutil

import mlx.core as mx
import pytest
from safetensors.numpy import load_file, save_file

from sd35m_mlx.loading.safetensors_io import WeightsError, load_safetensors
from sd35m_mlx.loading.transformer import load_transformer


@pytest.fixture
def transformer_copy(tiny_pipeline, tmp_path):
    dst = tmp_path / "transformer"
    shutil.copytree(tiny_pipeline / "transformer", dst)
    return dst


def _weights_file(folder):
    return folder / "diffusion_pytorch_model.safetensors"


def _edit_weights(folder, edit) -> None:
    """Rewrite the folder's weights file with `edit(tensors)` applied to its tensors in place."""
    path = _weights_file(folder)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_loads_lazily_with_requested_dtype(tiny_pipeline):
    weights, origin = load_safetensors(tiny_pipeline / "transformer", mx.bfloat16)
    assert all(v.dtype == mx.bfloat16 for v in weights.values())
    assert set(origin) == set(weights)


def test_truncated_file_is_reported(transformer_copy):
    path = _weights_file(transformer_copy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match="truncated"):
        load_transformer(transformer_copy)


def test_garbage_file_is_reported(transformer_copy):
    _weights_file(transformer_copy).write_bytes(b"\x00" * 4)
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_transformer(transformer_copy)


def test_missing_key_is_named(transformer_copy):
    _edit_weights(transformer_copy, lambda tensors: tensors.pop("transformer_blocks.1.attn.to_k.bias"))
    with pytest.raises(WeightsError, match=r"missing key transformer_blocks\.1\.attn\.to_k\.bias.*transformer"):
        load_transformer(transformer_copy)


def test_unexpected_key_is_named(transformer_copy):
    def add_extra(tensors):
        tensors["transformer_blocks.0.extra.weight"] = tensors["proj_out.bias"]

    _edit_weights(transformer_copy, add_extra)
    with pytest.raises(WeightsError, match=r"unexpected key transformer_blocks\.0\.extra\.weight.*safetensors"):
        load_transformer(transformer_copy)


def test_wrong_shape_is_named(transformer_copy):
    def crop(tensors):
        tensors["context_embedder.weight"] = tensors["context_embedder.weight"][:, :-1].copy()

    _edit_weights(transformer_copy, crop)
    with pytest.raises(WeightsError, match=r"wrong shape for context_embedder\.weight"):
        load_transformer(transformer_copy)


def test_sharded_checkpoint_loads_like_single_file(transformer_copy):
    path = _weights_file(transformer_copy)
    tensors = load_file(path)
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = {
        "model-00001-of-00002.safetensors": keys[:half],
        "model-00002-of-00002.safetensors": keys[half:],
    }
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, transformer_copy / name)
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (transformer_copy / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    path.unlink()
    sharded, origin = load_safetensors(transformer_copy)
    assert len({p.name for p in origin.values()}) == 2
    assert set(sharded) == set(tensors)
    for k in keys:
        assert (mx.array(tensors[k]) == sharded[k]).all().item()


def test_missing_shard_is_reported(transformer_copy):
    index = {"weight_map": {"proj_out.weight": "model-00002-of-00002.safetensors"}}
    (transformer_copy / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="shard model-00002-of-00002.safetensors is missing"):
        load_transformer(transformer_copy)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match="pickle checkpoints are never loaded"):
        load_safetensors(tmp_path)


def test_materialize_casts_one_tensor_at_a_time(tmp_path):
    """float32 file loaded as bfloat16: reading tensor by tensor keeps at most one float32 source alive."""
    import mlx.nn as nn
    import numpy as np

    from sd35m_mlx.loading.safetensors_io import materialize

    n, shape = 12, (1024, 1024)  # 4 MiB float32 each
    save_file({f"w{i}": np.full(shape, i, np.float32) for i in range(n)}, tmp_path / "w.safetensors")

    def lazy_module():
        weights, _ = load_safetensors(tmp_path / "w.safetensors", mx.bfloat16)
        module = nn.Module()
        for k, v in weights.items():
            setattr(module, k, v)
        return module

    final = n * shape[0] * shape[1] * 2
    one_source = shape[0] * shape[1] * 4
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    module = lazy_module()
    materialize(module)
    streamed = mx.get_peak_memory() - base
    assert all(v.dtype == mx.bfloat16 for v in module.parameters().values())
    assert streamed <= final + 2 * one_source, f"{streamed / 2**20:.1f} MiB for {final / 2**20:.1f} MiB of weights"
    del module
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    together = lazy_module()
    mx.eval(together.parameters())
    assert mx.get_peak_memory() - base > streamed  # what materialize avoids
