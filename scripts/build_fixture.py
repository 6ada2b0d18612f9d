"""Build random-weight SD3.5-Medium-shaped pipelines in the exact diffusers layout, offline.

    python scripts/build_fixture.py OUT_DIR                                  # tiny pipeline
    python scripts/build_fixture.py OUT_DIR --full-width-transformer --depth 2

The tiny pipeline is small enough to run in a second on CPU but keeps every branch of the real
model: dual-attention and context-pre-only blocks, RMS qk-norm, a positional table larger than
the test latents, CLIP-L (quick_gelu) + CLIP-G (gelu, pads with "!") whose joint width is smaller
than T5's, and a 4-level VAE. Every weight, including those diffusers initialises to zero
(adaLN, proj_out) and the positional table, is random with O(1) activations throughout.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from sd35m_mlx.loading.tiny_random import CLIP_G, CLIP_L, T5
from sd35m_mlx.loading.tiny_random import TRANSFORMER as TINY_TRANSFORMER
from sd35m_mlx.loading.tiny_tokenizers import CORPUS, train_clip_bpe, write_clip_tokenizer, write_t5_tokenizer

# Sizes: the toy model of sd35m_mlx/loading/tiny_random.py (CLIP-L, CLIP-G, T5 and the transformer's widths),
# with a positional table (24: 384 px) larger than the test latents, so the crop matters.
CLIP_NUM_MERGES = 400  # learned merges (fewer if the corpus runs out of repeated pairs)
T5_SPM_VOCAB = 500  # sentencepiece pieces; T5Tokenizer adds 100 <extra_id_*> after them
TRANSFORMER = dict(
    TINY_TRANSFORMER, sample_size=32, patch_size=2, in_channels=16, out_channels=16, pos_embed_max_size=24
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32), layers_per_block=2, act_fn="silu",
    latent_channels=16, norm_num_groups=8, sample_size=256, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True, force_upcast=True,
)  # fmt: skip
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

# SD3.5 Medium's own sizes, for full-size components (the benchmarks build them at reduced depth).
FULL_WIDTH_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=64,
    caption_projection_dim=1536, joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=384,
    qk_norm="rms_norm",
)  # fmt: skip
FULL_WIDTH_DUAL_ATTENTION_LAYERS = tuple(range(13))
CLIP_L_FULL = dict(CLIP_L, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768)  # fmt: skip
CLIP_G_FULL = dict(CLIP_G, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280)  # fmt: skip
T5_XXL = dict(T5, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24)
CLIP_VOCAB, T5_VOCAB = 49408, 32128  # the real tokenizers' vocabularies
VAE_FULL = dict(VAE, block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024)

MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "_diffusers_version": "0.31.0.dev0",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def tiny_configs() -> dict[str, dict]:
    """The tiny pipeline's component sizes (tokenizer-dependent sizes are read from the built folder)."""
    return {
        "text_encoder": dict(CLIP_L),
        "text_encoder_2": dict(CLIP_G),
        "text_encoder_3": dict(T5),
        "transformer": dict(TRANSFORMER),
        "vae": dict(VAE),
        "scheduler": dict(SCHEDULER),
    }


# ---------------------------------------------------------------------------------------------
# Random weights


def _seeded(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1009 + salt)


def tensor_plan(model: torch.nn.Module) -> list[tuple[str, str, float, torch.Size]]:
    """(state-dict name, kind, std, shape) for every parameter and persistent buffer, tied ones once.

    Works on a meta-device model. std keeps activations O(1): 1/sqrt(fan_in) for linear/conv
    weights (T5 queries also 1/sqrt(d_kv), since T5 does not scale its attention logits).
    """
    plan, seen = [], set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        shape = tensor.shape
        if not isinstance(tensor, torch.nn.Parameter):
            if leaf != "pos_embed":
                continue  # other persistent buffers (none today) keep their computed values
            plan.append((name, "normal", 0.5, shape))  # real table is sin/cos, rms ~0.7
        elif "Norm" in type(owner).__name__:
            plan.append((name, "one_plus" if leaf == "weight" else "normal", 0.1, shape))
        elif isinstance(owner, torch.nn.Embedding):
            plan.append((name, "normal", 1.0, shape))
        elif isinstance(owner, (torch.nn.Linear, torch.nn.Conv2d)):
            if leaf == "bias":
                plan.append((name, "normal", 0.1, shape))
                continue
            std = 1.0 / math.sqrt(math.prod(shape[1:]))
            parent = model.get_submodule(owner_name.rpartition(".")[0])
            if owner_name.endswith(".q") and hasattr(parent, "key_value_proj_dim"):
                std /= math.sqrt(parent.key_value_proj_dim)
            plan.append((name, "normal", std, shape))
        else:
            raise TypeError(f"no random init rule for {name} ({type(owner).__name__})")
    return plan


def random_tensors(model: torch.nn.Module, seed: int, salt: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of `tensor_plan`, one at a time, from a generator seeded by (seed, salt)."""
    gen = _seeded(seed, salt)
    for name, kind, std, shape in tensor_plan(model):
        t = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std)
        yield name, (t.add_(1.0) if kind == "one_plus" else t)


@torch.no_grad()
def randomise_(model: torch.nn.Module, seed: int, salt: int) -> torch.nn.Module:
    """Overwrite `model`'s weights in place with `random_tensors`."""
    state = model.state_dict(keep_vars=True)
    for name, value in random_tensors(model, seed, salt):
        state[name].copy_(value)
    return model


_randomise_ = randomise_  # the name tests/test_controlnet.py imports

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def write_random_safetensors(model: torch.nn.Module, path: Path, seed: int, salt: int, dtype: torch.dtype) -> int:
    """Write `model`'s state dict (a meta-device model: shapes only) as random tensors, one at a time,
    so a component never needs more memory than its largest tensor (T5-XXL is 19 GB in float32).
    Returns the file's tensor bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, _, _, shape in tensor_plan(model):
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = dict(dtype=_SAFETENSORS_DTYPES[dtype], shape=list(shape), data_offsets=[offset, offset + nbytes])
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, tensor in random_tensors(model, seed, salt):
            # numpy has no bfloat16: write the raw bits through a same-width integer view
            f.write(tensor.to(dtype).view(_SAME_WIDTH_INT[dtype]).numpy().data)
            del tensor
    return offset


def stream_component(
    folder: str | Path, make: Callable[[], torch.nn.Module], *, seed: int, salt: int, dtype: torch.dtype
) -> Path:
    """A component folder (config.json + safetensors) of the model `make()` builds, built on the meta
    device and written by `write_random_safetensors`: for components too large to hold in memory."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with torch.device("meta"):
        model = make()
    if hasattr(model, "save_config"):  # diffusers
        model.save_config(folder)
        weights = "diffusion_pytorch_model.safetensors"
    else:  # transformers
        model.config.architectures = [type(model).__name__]
        model.config.to_json_file(folder / "config.json")
        weights = "model.safetensors"
    write_random_safetensors(model, folder / weights, seed, salt, dtype)
    return folder


# ---------------------------------------------------------------------------------------------
# Transformer


def transformer_config(**overrides) -> dict:
    cfg = {**TRANSFORMER, **overrides}
    cfg["dual_attention_layers"] = tuple(cfg["dual_attention_layers"])
    return cfg


_transformer_config = transformer_config  # the name tests/test_fixture.py imports


def build_transformer(out_dir: str | Path, *, seed: int = 0, **config_overrides) -> Path:
    """Write a random SD3Transformer2DModel folder (config.json + safetensors) with save_pretrained."""
    from diffusers import SD3Transformer2DModel

    out_dir = Path(out_dir)
    model = SD3Transformer2DModel(**transformer_config(**config_overrides))
    randomise_(model, seed, salt=1).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def stream_transformer(out_dir: Path, config: dict, seed: int, dtype: torch.dtype, model_class=None) -> Path:
    """Like build_transformer (same values), but one tensor in memory at a time (`stream_component`)."""
    from diffusers import SD3Transformer2DModel

    return stream_component(out_dir, lambda: (model_class or SD3Transformer2DModel)(**config), seed=seed, salt=1,
                            dtype=dtype)  # fmt: skip


_stream_transformer = stream_transformer  # the name tests/test_fixture.py imports


def build_full_width_transformer(
    out_dir: str | Path,
    *,
    depth: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    dual_attention_layers: tuple[int, ...] | None = None,
    width: dict = FULL_WIDTH_TRANSFORMER,
    model_class=None,
) -> Path:
    """The real SD3.5 Medium transformer width (1536, 24 heads, 384^2 table) at reduced depth, streamed;
    dual attention in blocks 0..12 unless given; `width` replaces the sizes (the benchmarks' toy runs)."""
    if dual_attention_layers is None:  # SD3.5 Medium's: blocks 0..12
        dual_attention_layers = tuple(i for i in FULL_WIDTH_DUAL_ATTENTION_LAYERS if i < depth)
    config = dict(width, num_layers=depth, dual_attention_layers=tuple(dual_attention_layers))
    return stream_transformer(Path(out_dir), config, seed, dtype, model_class)


# ---------------------------------------------------------------------------------------------
# Text encoders and VAE at any size, streamed


def build_clip(folder: str | Path, sizes: dict, token_ids: dict, *, seed: int = 0, salt: int = 20,
               dtype: torch.dtype = torch.float32) -> Path:  # fmt: skip
    """A `text_encoder/` folder: CLIPTextModelWithProjection at `sizes` (CLIP_L_FULL, CLIP_G_FULL, ...) with
    the real vocabulary and `token_ids` (bos/eos/pad_token_id)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=CLIP_VOCAB, max_position_embeddings=77, **token_ids, **sizes)
    return stream_component(folder, lambda: CLIPTextModelWithProjection(config), seed=seed, salt=salt, dtype=dtype)


def build_t5(folder: str | Path, layers: int, *, sizes: dict = T5_XXL, seed: int = 0, salt: int = 22,
             dtype: torch.dtype = torch.float32) -> Path:  # fmt: skip
    """A `text_encoder_3/` folder: a T5 v1.1 encoder (XXL width by default) with `layers` layers."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**dict(sizes, num_layers=layers), vocab_size=T5_VOCAB, is_encoder_decoder=False, use_cache=False)
    return stream_component(folder, lambda: T5EncoderModel(config), seed=seed, salt=salt, dtype=dtype)


def build_vae(folder: str | Path, *, sizes: dict = VAE_FULL, seed: int = 0, salt: int = 23,
              dtype: torch.dtype = torch.float32) -> Path:  # fmt: skip
    """A `vae/` folder: SD3's AutoencoderKL (full size by default: 128, 256, 512, 512 channels)."""
    from diffusers import AutoencoderKL

    return stream_component(folder, lambda: AutoencoderKL(**sizes), seed=seed, salt=salt, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# ControlNets

# In the tiny transformer's shapes. SD3.5M-style (tensorart SD3.5M ControlNets: dual attention, RMS qk-norm, the
# transformer's table size, pooled text used) with 3 blocks for the 4-block transformer, so the residual interval
# 4/3 is exercised; InstantX-style (SD3 Medium ControlNets: plain blocks, zero pooled text, no VAE shift).
CONTROLNET_SD35M = dict(
    {k: v for k, v in TRANSFORMER.items() if k != "out_channels"},
    num_layers=3,
    dual_attention_layers=(0, 1),
    force_zeros_for_pooled_projection=False,
)
CONTROLNET_INSTANTX = dict(
    CONTROLNET_SD35M,
    num_layers=2,
    dual_attention_layers=(),
    qk_norm=None,
    pos_embed_max_size=16,
    force_zeros_for_pooled_projection=True,
)
FULL_WIDTH_CONTROLNET = dict(
    {k: v for k, v in FULL_WIDTH_TRANSFORMER.items() if k != "out_channels"},
    force_zeros_for_pooled_projection=False,
)


def build_controlnet(out_dir: str | Path, *, seed: int = 0, style: str = "sd35m", **config_overrides) -> Path:
    """A random SD3ControlNetModel folder; every weight random, the zero-initialised controlnet_blocks and
    pos_embed_input included, so the residuals are O(1)."""
    from diffusers import SD3ControlNetModel

    config = {**(CONTROLNET_SD35M if style == "sd35m" else CONTROLNET_INSTANTX), **config_overrides}
    config["dual_attention_layers"] = tuple(config["dual_attention_layers"])
    model = SD3ControlNetModel(**config)
    randomise_(model, seed, salt=6).save_pretrained(Path(out_dir), safe_serialization=True)
    return Path(out_dir)


def build_full_width_controlnet(out_dir: str | Path, **kwargs) -> Path:
    """A ControlNet of SD3.5 Medium's width (tensorart SD3.5M layout: dual attention in 0-12 unless given) at
    reduced depth, streamed; the keywords of `build_full_width_transformer`."""
    from diffusers import SD3ControlNetModel

    return build_full_width_transformer(out_dir, width=FULL_WIDTH_CONTROLNET, model_class=SD3ControlNetModel, **kwargs)


# ---------------------------------------------------------------------------------------------
# TAESD3

# madebyollin/taesd3's config.json (diffusers AutoencoderTiny). TAESD decodes the latents the
# transformer sees, so its scaling_factor is 1.0 and shift_factor 0.0, not the SD3 VAE's.
TAESD3 = dict(
    in_channels=3,
    out_channels=3,
    encoder_block_out_channels=(64, 64, 64, 64),
    decoder_block_out_channels=(64, 64, 64, 64),
    act_fn="relu",
    upsample_fn="nearest",
    latent_channels=16,
    upsampling_scaling_factor=2,
    num_encoder_blocks=(1, 3, 3, 3),
    num_decoder_blocks=(3, 3, 3, 1),
    latent_magnitude=3,
    latent_shift=0.5,
    force_upcast=False,
    scaling_factor=1.0,
    shift_factor=0.0,
)


def build_taesd(out_dir: str | Path, *, seed: int = 0, **config_overrides) -> Path:
    """A random-weight diffusers AutoencoderTiny (TAESD3's config unless overridden) saved as safetensors."""
    from diffusers import AutoencoderTiny

    out_dir = Path(out_dir)
    model = randomise_(AutoencoderTiny(**{**TAESD3, **config_overrides}), seed, salt=7)
    with torch.no_grad():  # pixels are the last conv's output: centre them in [0, 1], as a trained TAESD's
        model.decoder.layers[-1].weight.mul_(0.5)
        model.decoder.layers[-1].bias.add_(0.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Pipeline


def build_tiny_pipeline(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a complete tiny StableDiffusion3Pipeline folder; loads with `from_pretrained(out_dir)`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # constructors' own init, overwritten anyway

    vocab, merges = train_clip_bpe(CORPUS, CLIP_NUM_MERGES)
    write_clip_tokenizer(out_dir / "tokenizer", vocab, merges, pad_token="<|endoftext|>")
    write_clip_tokenizer(out_dir / "tokenizer_2", vocab, merges, pad_token="!")
    write_t5_tokenizer(out_dir / "tokenizer_3", CORPUS, T5_SPM_VOCAB)
    t5_vocab = len(json.loads((out_dir / "tokenizer_3" / "tokenizer.json").read_text())["model"]["vocab"])

    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    for salt, (folder, sizes, pad) in enumerate(
        [("text_encoder", CLIP_L, eos), ("text_encoder_2", CLIP_G, vocab["!"])], start=2
    ):
        config = CLIPTextConfig(
            vocab_size=len(vocab),
            max_position_embeddings=77,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
            **sizes,
        )
        model = CLIPTextModelWithProjection(config)
        randomise_(model, seed, salt).save_pretrained(out_dir / folder, safe_serialization=True)

    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab, is_encoder_decoder=False, use_cache=False, **T5))
    randomise_(t5, seed, salt=4).save_pretrained(out_dir / "text_encoder_3", safe_serialization=True)

    vae = AutoencoderKL(**VAE)
    randomise_(vae, seed, salt=5).save_pretrained(out_dir / "vae", safe_serialization=True)

    build_transformer(out_dir / "transformer", seed=seed)
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(out_dir / "scheduler")
    (out_dir / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--full-width-transformer", action="store_true", help="only a full-width transformer/")
    p.add_argument("--depth", type=int, default=2, help="blocks of the full-width transformer (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        print(f"{args.out_dir} exists and is not empty", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.full_width_transformer:
        build_full_width_transformer(args.out_dir, depth=args.depth, seed=args.seed)
    else:
        build_tiny_pipeline(args.out_dir, seed=args.seed)
    print(f"built {args.out_dir} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
