"""Prompts encoded as ComfyUI's CLIPTextEncode encodes them for SD3 (`text_encoding="comfyui"`), so that a
ComfyUI workflow's prompt gives ComfyUI's conditioning, not diffusers'.

Where ComfyUI (Comfy-Org/ComfyUI at a125cd84b054a57729b5eecab930ca9408719832) differs from diffusers'
`encode_prompt` (models/prompt_encoder.py), and what we do:

- T5 length: `comfy/text_encoders/sd3_clip.py` T5XXLTokenizer (min_length=77, max_length=99999999): the tokens,
  EOS, padded with 0 to at least 77 and never cut. diffusers pads and cuts to `max_sequence_length` (256), and
  T5 runs without an attention mask, so even the first tokens' states differ. `max_sequence_length` is unused.
- Prompt syntax: `comfy/sd1_clip.py` `token_weights` (`(x)` x1.1, `(x:w)` replacing the weight, `\\(` escapes;
  `[x]` and BREAK are plain text) on every prompt; `prompt_syntax="plain"` is its `disable_weights`. Weights
  apply to all three encoders as `z_empty + w (z - z_empty)` (prompts/weighted.py, the same rule).
- CLIP chunks (`SDTokenizer.tokenize_with_weights`): 75 tokens between BOS and EOS, padded with EOS (CLIP-L)
  or id 0 (CLIP-G, "!"); a fragment of fewer than 8 tokens that would straddle a boundary starts the next
  chunk. Chunks concatenate on the token axis; CLIP-L and CLIP-G are cut to the shorter (`SD3ClipModel`).
- Pooled: the first chunk's; CLIP-L's before its text projection (`SDClipModel(return_projected_pooled=False)`
  in sd3_clip.py), CLIP-G's projected. diffusers projects both.
- Without T5 the context is the CLIP part alone (sd3_clip.py), not diffusers' zeros of T5's length.
- `clip_skip` (ComfyUI's CLIPSetLastLayer at -(clip_skip + 2)) applies to the negative prompt too, as one
  CLIP object encodes both there; ComfyUI's node also moves T5 to that layer, which we do not.
- Prompt and negative prompt of different lengths: ComfyUI batches them by repeating each context to the
  least common multiple of the lengths when that is at most 4x the shorter (`comfy/conds.py`
  CONDCrossAttn.concat), as we do; otherwise it runs them in separate model calls, which our batched CFG
  cannot: there we pad the shorter (empty CLIP chunks, more T5 padding) and warn.
- Not followed: `embedding:` names (textual inversions) are read as text.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import mlx.core as mx
import numpy as np

from ..models.prompt_encoder import PromptEncoder, split_rows
from .weighted import MAX_CLIP_CHUNKS, Parsed, _apply_weights, _clip, _fragment_ids, clip_chunks, t5_tokens

T5_MIN_LENGTH = 77  # T5XXLTokenizer(min_length=77)
WORD_LENGTH = 8  # SDTokenizer.max_word_length
MAX_REPEAT = 4  # CONDCrossAttn.can_concat: at most 4x the shorter context


def _parentheses(text: str) -> list[str]:
    """ComfyUI's `parse_parentheses`: top-level text and `(...)` groups, in order."""
    result, current, depth = [], "", 0
    for char in text:
        if char == "(":
            if depth == 0 and current:
                result.append(current)
                current = ""
            current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                result.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        result.append(current)
    return result


def _token_weights(text: str, weight: float) -> Parsed:
    out: Parsed = []
    for part in _parentheses(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner, inner_weight = part[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1 :])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _token_weights(inner, inner_weight)
        else:
            out.append((part, weight))
    return out


def parse_comfyui(text: str, weighted: bool = True) -> Parsed:
    """[(fragment, weight)] as ComfyUI's SDTokenizer splits a prompt (`escape_important`, `token_weights`)."""
    text = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
    parsed = _token_weights(text, 1.0) if weighted else [(text, 1.0)]
    return [(t.replace("\0\1", ")").replace("\0\2", "("), w) for t, w in parsed if t]


def _t5_count(tokenizer, parsed: Parsed) -> int:
    return sum(len(ids) for ids in _fragment_ids(tokenizer, parsed)) + 1 if parsed else 1  # + EOS


def _t5(encoder: PromptEncoder, parsed: list[Parsed], lengths: list[int]) -> list[mx.array]:
    """Each row's T5 states at its own length, rows of one length encoded as one batch."""
    tokenizer = encoder.tokenizer_3
    out: list[mx.array | None] = [None] * len(parsed)
    for length in sorted(set(lengths)):
        rows = [r for r, n in enumerate(lengths) if n == length]
        tokens = [t5_tokens(tokenizer, parsed[r], length) for r in rows]
        weights = np.array([w for _, w, _ in tokens], dtype=np.float64)
        weighted = bool((weights != 1.0).any())
        ids = [t for t, _, _ in tokens] + ([t5_tokens(tokenizer, [], length)[0]] if weighted else [])
        states = encoder.text_encoder_3(mx.array(np.array(ids, dtype=np.int32)))
        if weighted:
            states = _apply_weights(states[: len(rows)], states[-1:], weights)
        for i, r in enumerate(rows):
            out[r] = states[i].astype(encoder.dtype)
    return out


def _lengths(clip_counts: list[int], t5_counts: list[int] | None, clip_length: int) -> tuple[list[int], list[int]]:
    """(CLIP chunks, T5 length) per row such that the rows batch: ComfyUI's own lengths when they are equal or
    repeat into one (conds.py), else the longest of each, with a warning."""
    t5 = [max(T5_MIN_LENGTH, n) for n in t5_counts] if t5_counts is not None else [0] * len(clip_counts)
    totals = [c * clip_length + t for c, t in zip(clip_counts, t5, strict=True)]
    if max(totals) == min(totals) or math.lcm(*totals) // min(totals) <= MAX_REPEAT:
        return clip_counts, t5
    warnings.warn(
        f"ComfyUI runs contexts of {min(totals)} and {max(totals)} tokens in separate model calls; batched here, "
        "the shorter is padded and the image differs from ComfyUI's",
        stacklevel=3,
    )
    return [max(clip_counts)] * len(totals), [max(t5)] * len(totals)


def encode_prompt_comfyui(
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
    *,
    weighted: bool = True,
) -> tuple[mx.array, mx.array | None, mx.array, mx.array | None]:
    """`encoder.encode_prompt`'s arguments and 4-tuple, encoded as ComfyUI encodes SD3 prompts (module doc).

    The context is (B, 77 * chunks + T5 length, joint dim), the T5 length at least 77 and uncut, each row
    repeated as ComfyUI batches rows of different lengths. `weighted=False` reads no syntax. Raises ValueError
    for a prompt of more than MAX_CLIP_CHUNKS chunks.
    """
    prompts, batch, skips = encoder.prepare(prompt, negative_prompt, prompt_2, prompt_3, max_sequence_length,
                                            num_images_per_prompt, do_classifier_free_guidance, negative_prompt_2,
                                            negative_prompt_3, clip_skip)  # fmt: skip
    skips = [clip_skip] * len(skips)  # one CLIP object encodes every prompt in ComfyUI
    parsed = [[parse_comfyui(p, weighted) for p in texts] for texts in prompts]
    length = encoder.clip_max_length
    chunks_l = [clip_chunks(encoder.tokenizer, p, length - 2, WORD_LENGTH) for p in parsed[0]]
    chunks_g = [clip_chunks(encoder.tokenizer_2, p, length - 2, WORD_LENGTH) for p in parsed[1]]
    counts = [min(len(a), len(b)) for a, b in zip(chunks_l, chunks_g, strict=True)]
    if max(counts) > MAX_CLIP_CHUNKS:
        raise ValueError(
            f"prompt is {max(counts)} CLIP chunks of {length - 2} tokens long; at most {MAX_CLIP_CHUNKS} are encoded"
        )
    has_t5 = encoder.text_encoder_3 is not None
    t5_counts = [_t5_count(encoder.tokenizer_3, p) for p in parsed[2]] if has_t5 else None
    counts, t5_lengths = _lengths(counts, t5_counts, length)
    n_chunks = max(counts)

    stage = stage or (lambda names: nullcontext())
    t5: list[mx.array] = []
    if has_t5:
        with stage(("text_encoder_3",)):
            t5 = _t5(encoder, parsed[2], t5_lengths)
            mx.eval(t5)
    with stage(("text_encoder", "text_encoder_2")):
        states_l, pooled_l = _clip(encoder, 0, chunks_l, skips, n_chunks, projected=False)
        states_g, pooled_g = _clip(encoder, 1, chunks_g, skips, n_chunks)
        mx.eval(states_l, pooled_l, states_g, pooled_g)

    width = encoder.joint_attention_dim
    rows = []
    for r, chunks in enumerate(counts):
        clip = mx.concatenate([states_l[r, : chunks * length], states_g[r, : chunks * length]], axis=-1)
        if clip.shape[-1] > width:
            raise ValueError(f"CLIP features ({clip.shape[-1]}) are wider than the T5 context ({width})")
        row = mx.pad(clip, [(0, 0), (0, width - clip.shape[-1])])
        rows.append(mx.concatenate([row, t5[r]]) if has_t5 else row)
    total = math.lcm(*(row.shape[0] for row in rows))
    context = mx.stack([mx.tile(row, (total // row.shape[0], 1)) for row in rows])
    pooled = mx.concatenate([pooled_l, pooled_g], axis=-1)
    return split_rows(context, pooled, batch, num_images_per_prompt, do_classifier_free_guidance)
