"""Full-size random-weight SD3.5 Medium components in the real diffusers layout, for the memory benchmark.

Every safetensors file is written tensor by tensor from a model built on PyTorch's meta device, so
building a component never holds more than one of its tensors in memory (T5-XXL is 19 GB in float32).
The random values follow scripts/build_fixture.py (`_tensor_plan`): O(1) activations throughout.

- transformer: SD3.5 Medium width (1536, 24 heads, 384^2 positional table) at reduced depth
  (as scripts/build_fixture.py `build_full_width_transformer`: dual attention in blocks 0..12);
- text_encoder, text_encoder_2: full CLIP-L/14 and OpenCLIP-G/14 text towers (with projections);
- text_encoder_3: T5 v1.1 XXL width (d_model 4096, d_ff 10240, 64 heads, vocab 32128), `layers` layers;
- vae: SD3's AutoencoderKL at full size;
- tokenizers, scheduler and model_index.json from the tiny fixture (real tokenizers need the gated repo;
  the tiny vocabularies index the full-size embedding tables).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from scripts.build_fixture import (
    FULL_WIDTH_DUAL_ATTENTION_LAYERS,
    FULL_WIDTH_TRANSFORMER,
    VAE,
    _random_tensors,
    _stream_transformer,
    _tensor_plan,
    build_tiny_pipeline,
)


@dataclass(frozen=True)
class Sizes:
    """Component sizes: `FULL` is SD3.5 Medium's (transformer depth and T5 layers chosen per build),
    `TOY` keeps every kind of layer at a few MB, for `bench_memory.py --quick`."""

    clip_l: dict
    clip_g: dict
    t5: dict
    vae: dict
    transformer: dict


FULL = Sizes(
    clip_l=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
    ),
    clip_g=dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280
    ),
    t5=dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, vocab_size=32128),
    vae=dict(VAE, block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024),
    transformer=dict(FULL_WIDTH_TRANSFORMER),
)
# widths are multiples of 64 so the quantization policy applies as at full size
TOY = Sizes(
    clip_l=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, projection_dim=64),
    clip_g=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2, projection_dim=128),
    t5=dict(d_model=256, d_ff=640, d_kv=64, num_heads=4, vocab_size=32128),
    vae=dict(VAE, block_out_channels=(32, 64, 64, 64), norm_num_groups=32, sample_size=256),
    transformer=dict(
        FULL_WIDTH_TRANSFORMER,
        num_attention_heads=2,
        caption_projection_dim=128,
        joint_attention_dim=256,
        pooled_projection_dim=192,
        pos_embed_max_size=32,
    ),
)

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def write_random_safetensors(model: torch.nn.Module, path: Path, seed: int, salt: int, dtype: torch.dtype) -> int:
    """Write `model`'s state dict (a meta-device model: shapes only) as random tensors, one at a time.

    Returns the file's tensor bytes.
    """
    plan = _tensor_plan(model)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, _, _, shape in plan:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = dict(dtype=_SAFETENSORS_DTYPES[dtype], shape=list(shape), data_offsets=[offset, offset + nbytes])
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, tensor in _random_tensors(model, seed, salt):
            # numpy has no bfloat16: write the raw bits through a same-width integer view
            f.write(tensor.to(dtype).view(_SAME_WIDTH_INT[dtype]).numpy().data)
            del tensor
    return offset


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def build_clip(folder: Path, sizes: dict, act: str, ids: dict, *, seed: int = 0, salt: int = 20, dtype=torch.float32):
    """A `text_encoder/` folder: CLIPTextModelWithProjection at `sizes`, token ids `ids` (bos/eos/pad)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act=act, **ids, **sizes)
    config.architectures = ["CLIPTextModelWithProjection"]
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    folder = _fresh(Path(folder))
    config.to_json_file(folder / "config.json")
    write_random_safetensors(model, folder / "model.safetensors", seed, salt, dtype)
    return folder


def build_t5(
    folder: Path, layers: int, *, sizes: Sizes = FULL, seed: int = 0, salt: int = 22, dtype=torch.float32
) -> Path:
    """A `text_encoder_3/` folder: T5 v1.1 encoder (XXL width at FULL sizes) with `layers` layers."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        **sizes.t5,
        num_layers=layers,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
    )
    config.architectures = ["T5EncoderModel"]
    with torch.device("meta"):
        model = T5EncoderModel(config)
    folder = _fresh(Path(folder))
    config.to_json_file(folder / "config.json")
    write_random_safetensors(model, folder / "model.safetensors", seed, salt, dtype)
    return folder


def build_vae(folder: Path, *, sizes: Sizes = FULL, seed: int = 0, salt: int = 23, dtype=torch.float32) -> Path:
    """A `vae/` folder: SD3's AutoencoderKL (FULL: 128, 256, 512, 512 channels; 16 latent channels)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL(**sizes.vae)
    folder = _fresh(Path(folder))
    model.save_config(folder)
    write_random_safetensors(model, folder / "diffusion_pytorch_model.safetensors", seed, salt, dtype)
    return folder


def build_transformer(folder: Path, depth: int, *, sizes: Sizes = FULL, seed: int = 0, dtype=torch.float32) -> Path:
    """A `transformer/` folder (SD3.5 Medium width at FULL sizes) with `depth` blocks, streamed;
    dual attention in blocks 0..12 as in SD3.5 Medium, the last block context-pre-only."""
    dual = tuple(i for i in FULL_WIDTH_DUAL_ATTENTION_LAYERS if i < depth)
    config = dict(sizes.transformer, num_layers=depth, dual_attention_layers=dual)
    return _stream_transformer(_fresh(Path(folder)), config, seed, dtype)


def build_pipeline(
    out_dir: Path, *, depth: int, t5_layers: int, sizes: Sizes = FULL, seed: int = 0, dtype=torch.float32
) -> Path:
    """A diffusers-layout pipeline folder: full CLIP-L, CLIP-G and VAE, T5-XXL width with `t5_layers`
    layers, the SD3.5 Medium transformer width with `depth` blocks (all at `sizes`). Loads with
    `StableDiffusion35.from_pretrained`."""
    out_dir = Path(out_dir)
    folder = build_tiny_pipeline(out_dir, seed=seed)  # tokenizers, scheduler, model_index.json
    for salt, (sub, dims, act) in enumerate(
        [("text_encoder", sizes.clip_l, "quick_gelu"), ("text_encoder_2", sizes.clip_g, "gelu")], start=20
    ):
        tiny = json.loads((folder / sub / "config.json").read_text())
        ids = {k: tiny[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}  # the tokenizer's
        build_clip(folder / sub, dims, act, ids, seed=seed, salt=salt, dtype=dtype)
    build_t5(folder / "text_encoder_3", t5_layers, sizes=sizes, seed=seed, dtype=dtype)
    build_vae(folder / "vae", sizes=sizes, seed=seed, dtype=dtype)
    build_transformer(folder / "transformer", depth, sizes=sizes, seed=seed, dtype=dtype)
    return folder
