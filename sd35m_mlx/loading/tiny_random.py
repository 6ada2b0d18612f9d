"""`tiny-random`: an SD3.5-Medium-shaped pipeline with random weights, built in memory with MLX alone.

For trying every command offline (`sd35m-mlx "a cat" --model tiny-random`) and for `sd35m-mlx doctor`'s
self-test: no download, no torch. It keeps the real model's branches (dual-attention and context-pre-only
blocks, RMS qk-norm, CLIP-L + CLIP-G + T5, a 4-level VAE) at toy widths, so its images are noise.
Weights come from fixed keys, so every build (and every low_memory reload) is the same model.
"""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..models.clip import CLIPTextConfig, CLIPTextModel
from ..models.mmdit import MMDiTConfig, SD3Transformer2DModel
from ..models.prompt_encoder import PromptEncoder
from ..models.t5 import T5Config, T5EncoderModel
from ..models.vae import AutoencoderKL, VAEConfig
from ..sampling.schedule import FlowMatchSchedule
from .parts import PipelineParts
from .tiny_tokenizers import CORPUS, train_clip_bpe, write_clip_tokenizer, write_t5_tokenizer

NAME = "tiny-random"

# The same toy sizes as the test fixtures (scripts/build_fixture.py imports these). CLIP-L + CLIP-G width
# (32 + 64) < T5 width (128), so the zero padding of the CLIP features up to T5's width is exercised.
CLIP_L = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
              hidden_act="quick_gelu")  # fmt: skip
CLIP_G = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, projection_dim=64,
              hidden_act="gelu")  # fmt: skip
T5 = dict(
    d_model=128, d_ff=96, d_kv=16, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
)  # fmt: skip
TRANSFORMER = dict(
    num_layers=4,
    num_attention_heads=2,
    attention_head_dim=16,
    caption_projection_dim=32,
    joint_attention_dim=T5["d_model"],
    pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
    pos_embed_max_size=128,  # up to 2048 px, so the real model's default sizes work
    dual_attention_layers=(0, 1),
    qk_norm="rms_norm",
)
VAE = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)


def is_tiny_random(source: object) -> bool:
    return isinstance(source, str) and source == NAME


@functools.lru_cache(maxsize=1)
def _tokenizer_folder() -> Path:
    """CLIP BPE and T5 sentencepiece tokenizers learned from a small corpus (about a second, once a process)."""
    folder = Path(tempfile.mkdtemp(prefix="sd35m-mlx-tiny-tokenizers-"))
    vocab, merges = train_clip_bpe(CORPUS, num_merges=400)
    write_clip_tokenizer(folder / "tokenizer", vocab, merges, pad_token="<|endoftext|>")
    write_clip_tokenizer(folder / "tokenizer_2", vocab, merges, pad_token="!")
    write_t5_tokenizer(folder / "tokenizer_3", CORPUS, vocab_size=500)
    return folder


def _randomized(module: nn.Module, seed: int, dtype: mx.Dtype) -> nn.Module:
    """Every parameter random with O(1) activations: matrices and kernels N(0, 1/fan_in), scales near 1,
    biases and tables small; drawn from keys derived from `seed`, never the global generator."""
    params = tree_flatten(module.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    out = []
    for (name, p), key in zip(params, keys, strict=True):
        z = mx.random.normal(p.shape, key=key)
        if p.ndim >= 2 and not name.endswith("pos_embed"):
            value = z / math.sqrt(math.prod(p.shape[1:]))
        elif name.endswith("weight") or name.endswith("scale"):  # norm scales
            value = 1.0 + 0.1 * z
        else:
            value = 0.1 * z
        out.append((name, value.astype(dtype)))
    module.update(tree_unflatten(out))
    return module


def build_parts(dtype: mx.Dtype = mx.float32, *, load_t5: bool = True) -> PipelineParts:
    """The tiny pipeline's components, evaluated lazily like loaded weights."""
    from .text_encoders import load_tokenizer

    tokenizers = _tokenizer_folder()
    tok = load_tokenizer(tokenizers / "tokenizer", "CLIPTokenizer")
    tok_2 = load_tokenizer(tokenizers / "tokenizer_2", "CLIPTokenizer")
    clip_ids = dict(vocab_size=len(tok.get_vocab()), eos_token_id=tok.eos_token_id)
    clip_l = CLIPTextModel(CLIPTextConfig.from_dict({**CLIP_L, **clip_ids}))
    clip_g = CLIPTextModel(CLIPTextConfig.from_dict({**CLIP_G, **clip_ids}))
    t5 = tok_3 = None
    if load_t5:
        tok_3 = load_tokenizer(tokenizers / "tokenizer_3", "T5TokenizerFast")
        t5 = _randomized(T5EncoderModel(T5Config.from_dict({**T5, "vocab_size": len(tok_3)})), 3, dtype)
    encoder = PromptEncoder(
        _randomized(clip_l, 1, dtype),
        _randomized(clip_g, 2, dtype),
        tok,
        tok_2,
        t5,
        tok_3,
        joint_attention_dim=T5["d_model"],
    )
    transformer = SD3Transformer2DModel(MMDiTConfig.from_dict(TRANSFORMER))
    vae = AutoencoderKL(VAEConfig.from_dict(VAE))
    return PipelineParts(
        transformer=_randomized(transformer, 4, dtype),
        vae=_randomized(vae, 5, dtype),
        prompt_encoder=encoder,
        schedule=FlowMatchSchedule(shift=3.0),
    )
