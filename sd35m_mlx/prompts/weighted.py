"""Weighted and long prompts for SD3's three encoders: A1111 syntax in front of the same PromptEncoder.

What ComfyUI does (comfy/sd1_clip.py `ClipTokenWeightEncoder.encode_token_weights`, `SDTokenizer`;
comfy/text_encoders/sd3_clip.py `SD3ClipModel`; Comfy-Org/ComfyUI at
a125cd84b054a57729b5eecab930ca9408719832), with A1111's chunking (modules/sd_hijack_clip.py
`tokenize_line`, AUTOMATIC1111/stable-diffusion-webui at 5ad03e65863b0972e133c00692556752016f10c8):

- each prompt is parsed (`syntax.parse_attention`) and every fragment tokenized on its own;
- CLIP: the tokens fill chunks of 75, each chunk encoded as BOS + 75 + EOS (padded as the tokenizer
  pads: EOS for CLIP-L, "!" for CLIP-G) and the chunks concatenated along the sequence. BREAK closes a
  chunk (A1111; no comma backtracking). Pooled outputs come from the first chunk and are not weighted;
- T5 keeps `max_sequence_length` (EOS, then padding; cut as diffusers cuts) and sees the fragments'
  text, without syntax characters or BREAK. ComfyUI weights T5 tokens too (T5XXLModel is an
  SDClipModel), and so do we;
- a token of weight w becomes `z_empty + w * (z - z_empty)`, z_empty the same encoder's output for the
  empty prompt at that position; where every weight is 1 nothing is computed, so a plain prompt under
  77 tokens gives exactly `PromptEncoder.encode_prompt`'s output;
- CLIP-L and CLIP-G, prompt and negative prompt, are padded with empty-prompt chunks to one chunk count
  so CFG batches (ComfyUI cuts L and G to the shorter; padding keeps every token).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import mlx.core as mx
import numpy as np

from ..models.prompt_encoder import PromptEncoder, assemble, hidden_layer
from ..validation import InvalidValue
from .syntax import is_break, parse_attention

MAX_CLIP_CHUNKS = 16  # 1,200 CLIP tokens; the transformer's context grows by 77 tokens a chunk

Parsed = list[tuple[str, float]]
Tokens = tuple[list[int], list[float]]  # ids, one weight per id


def _fragment_ids(tokenizer, parsed: Parsed) -> list[list[int]]:
    texts = [text for text, _ in parsed]
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, verbose=False).input_ids


def clip_chunks(tokenizer, parsed: Parsed, chunk_length: int = 75, word_length: int | None = None) -> list[Tokens]:
    """A parsed prompt as CLIP chunks of `chunk_length` + 2 ids (BOS, tokens, EOS, padding).

    `word_length` (ComfyUI's SDTokenizer `max_word_length`, 8): a fragment of fewer tokens that would straddle a
    chunk boundary starts the next chunk whole; None fills every chunk (A1111 without its comma backtracking)."""
    chunks: list[Tokens] = []
    ids: list[int] = []
    weights: list[float] = []

    def close() -> None:
        nonlocal ids, weights
        pad = chunk_length - len(ids)
        chunks.append(
            (
                [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad,
                [1.0, *weights, 1.0] + [1.0] * pad,
            )
        )
        ids, weights = [], []

    for (text, weight), fragment in zip(parsed, _fragment_ids(tokenizer, parsed), strict=True):
        if is_break(text, weight):
            close()
            continue
        if word_length is not None and len(fragment) < word_length and len(ids) + len(fragment) > chunk_length:
            close()
        for token in fragment:
            if len(ids) == chunk_length:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def t5_tokens(tokenizer, parsed: Parsed, max_length: int) -> tuple[list[int], list[float], list[int]]:
    """(ids, weights, cut ids): the fragments' tokens cut to max_length - 1, EOS, padding to max_length."""
    ids: list[int] = []
    weights: list[float] = []
    for (text, weight), fragment in zip(parsed, _fragment_ids(tokenizer, parsed), strict=True):
        if not is_break(text, weight):
            ids += fragment
            weights += [weight] * len(fragment)
    cut = ids[max_length - 1 :]
    ids, weights = ids[: max_length - 1] + [tokenizer.eos_token_id], weights[: max_length - 1] + [1.0]
    pad = max_length - len(ids)
    return ids + [tokenizer.pad_token_id] * pad, weights + [1.0] * pad, cut


def _apply_weights(z: mx.array, z_empty: mx.array, weights: np.ndarray) -> mx.array:
    """z_empty + w (z - z_empty) where w != 1 (ComfyUI's (z - z_empty) * w + z_empty, in that order)."""
    w = mx.array(weights.astype(np.float32))[..., None]
    return mx.where(w != 1.0, (z - z_empty) * w.astype(z.dtype) + z_empty, z)


def _clip(
    encoder: PromptEncoder,
    index: int,
    per_row: list[list[Tokens]],
    skips: list[int | None],
    n_chunks: int,
    projected: bool = True,
) -> tuple[mx.array, mx.array]:
    """((rows, n_chunks * 77, width) weighted states, (rows, pooled width) first-chunk pooled) of CLIP-L (0) / G (1).

    Rows with fewer than n_chunks chunks are padded with empty-prompt chunks. `projected=False` pools before
    the text projection (ComfyUI's CLIP-L for SD3)."""
    tokenizer = (encoder.tokenizer, encoder.tokenizer_2)[index]
    model = (encoder.text_encoder, encoder.text_encoder_2)[index]
    length = encoder.clip_max_length
    empty = clip_chunks(tokenizer, [("", 1.0)], length - 2)[0]
    per_row = [chunks + [empty] * (n_chunks - len(chunks)) for chunks in per_row]
    rows = len(per_row)
    # chunk-major rows: with one chunk this is exactly encode_prompt's batch (prompts, then negatives)
    tokens = [per_row[r][c] for c in range(n_chunks) for r in range(rows)]
    weights = np.array([w for _, w in tokens], dtype=np.float64)
    weighted = bool((weights != 1.0).any())
    ids = [t for t, _ in tokens] + ([empty[0]] if weighted else [])
    ids = mx.array(np.array(ids, dtype=np.int32))
    out = model(ids)

    row_skips = list(skips) * n_chunks
    states = hidden_layer(out.hidden_states, row_skips)
    if weighted:
        z_empty = mx.stack([out.hidden_states[-((s or 0) + 2)][-1] for s in row_skips])
        states = _apply_weights(states, z_empty, weights)
    states = states.reshape(n_chunks, rows, length, -1).transpose(1, 0, 2, 3).reshape(rows, n_chunks * length, -1)
    if projected:
        pooled = out.text_embeds[:rows]
    else:
        pooled = out.last_hidden_state[mx.arange(rows), model.text_model.pool_positions(ids[:rows])]
    return states.astype(encoder.dtype), pooled.astype(encoder.dtype)


def _t5(encoder: PromptEncoder, parsed: list[Parsed], max_sequence_length: int) -> mx.array:
    if encoder.text_encoder_3 is None:
        return mx.zeros((len(parsed), max_sequence_length, encoder.joint_attention_dim), dtype=encoder.dtype)
    tokenizer = encoder.tokenizer_3
    rows = [t5_tokens(tokenizer, p, max_sequence_length) for p in parsed]
    cut = [tokenizer.decode(c, clean_up_tokenization_spaces=False) for _, _, c in rows if c]
    if cut:
        warnings.warn(
            f"The following part of your input was truncated because `max_sequence_length` is set to "
            f"{max_sequence_length} tokens: " + "; ".join(repr(c) for c in cut),
            stacklevel=3,
        )
    weights = np.array([w for _, w, _ in rows], dtype=np.float64)
    weighted = bool((weights != 1.0).any())
    ids = [t for t, _, _ in rows]
    if weighted:
        ids.append(t5_tokens(tokenizer, [("", 1.0)], max_sequence_length)[0])
    out = encoder.text_encoder_3(mx.array(np.array(ids, dtype=np.int32)))
    if weighted:
        out = _apply_weights(out[: len(rows)], out[-1:], weights)
    return out.astype(encoder.dtype)


def encode_prompt_weighted(
    encoder: PromptEncoder,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = "",
    prompt_2: str | Sequence[str] | None = None,
    prompt_3: str | Sequence[str] | None = None,
    max_sequence_length: int = 256,
    num_images_per_prompt: int = 1,
    do_classifier_free_guidance: bool = True,
    negative_prompt_2: str | Sequence[str] | None = None,
    negative_prompt_3: str | Sequence[str] | None = None,
    clip_skip: int | None = None,
    stage: Callable[[tuple[str, ...]], AbstractContextManager] | None = None,
) -> tuple[mx.array, mx.array | None, mx.array, mx.array | None]:
    """`encoder.encode_prompt` with A1111 prompt syntax and prompts longer than 77 CLIP tokens.

    Same arguments, defaults, checks and outputs as `PromptEncoder.encode_prompt`; the context is
    (B, 77 * chunks + max_sequence_length, joint dim), chunks the same for prompt and negative prompt.
    Raises InvalidValue (a ValueError) for a prompt of more than MAX_CLIP_CHUNKS chunks.
    """
    prompts, batch, skips = encoder.prepare(prompt, negative_prompt, prompt_2, prompt_3, max_sequence_length,
                                            num_images_per_prompt, do_classifier_free_guidance, negative_prompt_2,
                                            negative_prompt_3, clip_skip)  # fmt: skip
    parsed = [[parse_attention(p) for p in texts] for texts in prompts]
    chunk_length = encoder.clip_max_length - 2
    chunks_l = [clip_chunks(encoder.tokenizer, p, chunk_length) for p in parsed[0]]
    chunks_g = [clip_chunks(encoder.tokenizer_2, p, chunk_length) for p in parsed[1]]
    n_chunks = max(len(c) for c in chunks_l + chunks_g)
    if n_chunks > MAX_CLIP_CHUNKS:
        raise InvalidValue(
            f"prompt is {n_chunks} CLIP chunks of {chunk_length} tokens long; at most {MAX_CLIP_CHUNKS} are encoded"
        )

    stage = stage or (lambda names: nullcontext())
    with stage(("text_encoder_3",)):
        t5 = _t5(encoder, parsed[2], max_sequence_length)
        mx.eval(t5)
    with stage(("text_encoder", "text_encoder_2")):
        states_l, pooled_l = _clip(encoder, 0, chunks_l, skips, n_chunks)
        states_g, pooled_g = _clip(encoder, 1, chunks_g, skips, n_chunks)
        mx.eval(states_l, pooled_l, states_g, pooled_g)

    return assemble(
        t5, (states_l, states_g), (pooled_l, pooled_g), batch, num_images_per_prompt, do_classifier_free_guidance
    )
