"""Prompt encoding for SD3 / SD3.5, reproducing diffusers' `StableDiffusion3Pipeline.encode_prompt`.

context = [CLIP-L | CLIP-G penultimate states, zero-padded to the T5 width ; T5 states] on the token
axis: (B, 77 + max_sequence_length, joint dim). pooled = [CLIP-L pooled | CLIP-G pooled].
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import mlx.core as mx
import numpy as np

from ..defaults import MAX_SEQUENCE_LENGTH, SEQUENCE_LENGTH
from .clip import CLIPTextModel
from .t5 import T5EncoderModel


def _no_stage(names: tuple[str, ...]) -> AbstractContextManager:
    return nullcontext()


def _as_list(prompt: str | Sequence[str], what: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    prompts = list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{what} must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


class PromptEncoder:
    """The three text encoders and their tokenizers (transformers tokenizers, loaded from the
    checkpoint's tokenizer folders). `text_encoder_3` None means "skip T5": its part of the context
    is zeros of width `joint_attention_dim`, as diffusers does.

    Outputs come in the CLIP encoder's dtype (diffusers casts to `text_encoder.dtype` too).
    """

    def __init__(
        self,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModel,
        tokenizer,
        tokenizer_2,
        text_encoder_3: T5EncoderModel | None = None,
        tokenizer_3=None,
        *,
        joint_attention_dim: int = 4096,
    ):
        if text_encoder_3 is not None and tokenizer_3 is None:
            raise ValueError("text_encoder_3 (T5) needs tokenizer_3")
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.text_encoder_3 = text_encoder_3
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.tokenizer_3 = tokenizer_3
        self.joint_attention_dim = text_encoder_3.config.d_model if text_encoder_3 else joint_attention_dim
        # diffusers: `tokenizer.model_max_length` (77) for both CLIP tokenizers
        self.clip_max_length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)

    @property
    def dtype(self) -> mx.Dtype:
        return self.text_encoder.dtype

    # -- tokenization --------------------------------------------------------------------------

    @staticmethod
    def _tokenize(tokenizer, prompts: list[str], max_length: int, reason: str) -> mx.array:
        """Pad/truncate to exactly `max_length` ids (special tokens kept), warning about what was cut."""
        ids = tokenizer(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
        ).input_ids
        cut = []
        for prompt_ids in tokenizer(prompts, verbose=False).input_ids:  # verbose: we warn ourselves
            if len(prompt_ids) > max_length:
                # the truncated ids keep max_length - 1 leading tokens and the final special token
                cut.append(tokenizer.decode(prompt_ids[max_length - 1 : -1], clean_up_tokenization_spaces=False))
        if cut:
            warnings.warn(
                f"The following part of your input was truncated because {reason} {max_length} tokens: "
                + "; ".join(repr(c) for c in cut),
                stacklevel=4,
            )
        return mx.array(ids.astype(np.int32))

    # -- encoders ------------------------------------------------------------------------------

    def _clip(self, index: int, prompts: list[str], clip_skips: list[int | None]) -> tuple[mx.array, mx.array]:
        """(sequence states (B, 77, width), pooled (B, pooled width)) of CLIP-L (0) or CLIP-G (1).

        `clip_skips[i]` applies to prompts[i]; None takes hidden_states[-2] as diffusers does.
        """
        tokenizer = (self.tokenizer, self.tokenizer_2)[index]
        encoder = (self.text_encoder, self.text_encoder_2)[index]
        ids = self._tokenize(tokenizer, prompts, self.clip_max_length, "CLIP can only handle sequences up to")
        out = encoder(ids)
        states = hidden_layer(out.hidden_states, clip_skips)
        return states.astype(self.dtype), out.text_embeds.astype(self.dtype)

    def _t5(self, prompts: list[str], max_sequence_length: int) -> mx.array:
        if self.text_encoder_3 is None:
            return mx.zeros((len(prompts), max_sequence_length, self.joint_attention_dim), dtype=self.dtype)
        ids = self._tokenize(self.tokenizer_3, prompts, max_sequence_length, "`max_sequence_length` is set to")
        return self.text_encoder_3(ids).astype(self.dtype)

    # -- the pipeline's encode_prompt ----------------------------------------------------------

    def encode_prompt(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = "",
        prompt_2: str | Sequence[str] | None = None,
        prompt_3: str | Sequence[str] | None = None,
        max_sequence_length: int = SEQUENCE_LENGTH,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt_2: str | Sequence[str] | None = None,
        negative_prompt_3: str | Sequence[str] | None = None,
        clip_skip: int | None = None,
        stage: Callable[[tuple[str, ...]], AbstractContextManager] | None = None,
    ) -> tuple[mx.array, mx.array | None, mx.array, mx.array | None]:
        """(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds).

        Same inputs, defaults and outputs as diffusers' `StableDiffusion3Pipeline.encode_prompt`:
        prompt_2 / prompt_3 (CLIP-G / T5) default to `prompt`; the negative prompt defaults to ""
        and is encoded only with classifier-free guidance (else None is returned in its place);
        `clip_skip` applies to the positive prompt only, as in diffusers. The outputs are evaluated.
        `stage(names)`, if given, is entered around the use of the named encoder attributes (T5's, then
        both CLIPs'): a caller short of memory loads them on entry and releases them on exit.
        """
        prompts, batch, skips = self.prepare(prompt, negative_prompt, prompt_2, prompt_3, max_sequence_length,
                                             num_images_per_prompt, do_classifier_free_guidance, negative_prompt_2,
                                             negative_prompt_3, clip_skip)  # fmt: skip

        # prompt and negative prompt run through each encoder as one batch: weights are read once
        # (T5-XXL is 9.5 GB in bfloat16); each row's result does not depend on the others. T5 first,
        # then the CLIPs, each evaluated: with a `stage` that loads and releases the encoders
        # (low_memory), T5 is never resident beside the CLIPs; the results are the same either way.
        stage = stage or _no_stage
        with stage(("text_encoder_3",)):
            t5 = self._t5(prompts[2], max_sequence_length)
            mx.eval(t5)
        with stage(("text_encoder", "text_encoder_2")):
            states_l, pooled_l = self._clip(0, prompts[0], skips)
            states_g, pooled_g = self._clip(1, prompts[1], skips)
            mx.eval(states_l, pooled_l, states_g, pooled_g)

        return assemble(
            t5, (states_l, states_g), (pooled_l, pooled_g), batch, num_images_per_prompt, do_classifier_free_guidance
        )

    def prepare(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None,
        prompt_2: str | Sequence[str] | None,
        prompt_3: str | Sequence[str] | None,
        max_sequence_length: int,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt_2: str | Sequence[str] | None,
        negative_prompt_3: str | Sequence[str] | None,
        clip_skip: int | None,
    ) -> tuple[list[list[str]], int, list[int | None]]:
        """encode_prompt's checks and defaults, shared with prompts/weighted.py: ([CLIP-L, CLIP-G, T5 texts,
        each the prompts then (with CFG) the negative prompts], batch, clip_skip per row)."""
        if not isinstance(max_sequence_length, (int, np.integer)) or not 0 < max_sequence_length:
            raise ValueError(f"max_sequence_length must be a positive integer, got {max_sequence_length!r}")
        if max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise ValueError(
                f"max_sequence_length cannot be greater than {MAX_SEQUENCE_LENGTH}, got {max_sequence_length}"
            )
        if not isinstance(num_images_per_prompt, (int, np.integer)) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        depth = min(e.config.num_hidden_layers for e in (self.text_encoder, self.text_encoder_2))
        if clip_skip is not None and not 0 <= clip_skip < depth:
            raise ValueError(f"clip_skip must be in [0, {depth - 1}] for these CLIP encoders, got {clip_skip}")

        # diffusers uses `or`: an empty prompt_2 / prompt_3 also falls back to `prompt`
        prompts = [_as_list(prompt, "prompt")]
        prompts += [_as_list(p or prompt, name) for p, name in ((prompt_2, "prompt_2"), (prompt_3, "prompt_3"))]
        if do_classifier_free_guidance:
            negative_prompt = negative_prompt or ""
            negatives = [
                negative_prompt,
                negative_prompt_2 or negative_prompt,
                negative_prompt_3 or negative_prompt,
            ]
        batch = len(prompts[0])
        for i, name in enumerate(("prompt", "prompt_2", "prompt_3")):
            if len(prompts[i]) != batch:
                raise ValueError(f"{name} has {len(prompts[i])} entries, but prompt has {batch}")
            if do_classifier_free_guidance:
                neg = negatives[i]
                neg = [neg] * batch if isinstance(neg, str) else _as_list(neg, f"negative_{name}")
                if len(neg) != batch:
                    raise ValueError(f"negative_{name} has {len(neg)} entries, but prompt has {batch}")
                prompts[i] = prompts[i] + neg
        # diffusers applies clip_skip to the prompt only, never to the negative prompt
        skips = [clip_skip] * batch + [None] * (batch if do_classifier_free_guidance else 0)
        return prompts, batch, skips


def hidden_layer(hidden_states: Sequence[mx.array], skips: Sequence[int | None]) -> mx.array:
    """Each row's CLIP states: hidden_states[-2] (diffusers' penultimate layer), clip_skip more layers back."""
    layers = [-((s or 0) + 2) for s in skips]
    if len(set(layers)) == 1:
        return hidden_states[layers[0]][: len(layers)]
    return mx.stack([hidden_states[layer][i] for i, layer in enumerate(layers)])


def assemble(
    t5: mx.array,
    clip_states: tuple[mx.array, mx.array],
    clip_pooled: tuple[mx.array, mx.array],
    batch: int,
    num_images_per_prompt: int,
    do_classifier_free_guidance: bool,
) -> tuple[mx.array, mx.array | None, mx.array, mx.array | None]:
    """encode_prompt's 4-tuple from the encoders' rows (prompts, then negatives): [CLIP-L | CLIP-G zero-padded
    to the T5 width ; T5] on the token axis, pooled [CLIP-L | CLIP-G], each repeated per image; evaluated."""
    clip = mx.concatenate(list(clip_states), axis=-1)
    width = t5.shape[-1]
    if clip.shape[-1] > width:
        raise ValueError(f"CLIP features ({clip.shape[-1]}) are wider than the T5 context ({width})")
    clip = mx.pad(clip, [(0, 0), (0, 0), (0, width - clip.shape[-1])])
    context = mx.concatenate([clip, t5], axis=1)
    pooled = mx.concatenate(list(clip_pooled), axis=-1)
    return split_rows(context, pooled, batch, num_images_per_prompt, do_classifier_free_guidance)


def split_rows(
    context: mx.array, pooled: mx.array, batch: int, num_images_per_prompt: int, do_classifier_free_guidance: bool
) -> tuple[mx.array, mx.array | None, mx.array, mx.array | None]:
    """encode_prompt's 4-tuple from the context and pooled rows (prompts, then negatives), each repeated per
    image; evaluated."""
    if num_images_per_prompt > 1:
        context = mx.repeat(context, num_images_per_prompt, axis=0)
        pooled = mx.repeat(pooled, num_images_per_prompt, axis=0)
    mx.eval(context, pooled)

    n = batch * num_images_per_prompt
    if not do_classifier_free_guidance:
        return context, None, pooled, None
    return context[:n], context[n:], pooled[:n], pooled[n:]
