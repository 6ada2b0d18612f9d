"""text_encoding="comfyui": prompts encoded as ComfyUI's CLIPTextEncode encodes them for SD3, against a torch
reference written from ComfyUI's source (tests/comfy_text_reference.py) on the tiny fixture's encoders."""

import math
import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch

from sd35m_mlx.loading.text_encoders import load_text_encoders
from sd35m_mlx.models.prompt_encoder import PromptEncoder
from sd35m_mlx.prompts.comfyui import encode_prompt_comfyui, parse_comfyui
from sd35m_mlx.validation import InvalidInput, validate_generation
from tests.comfy_text_reference import ComfySD3, concat, token_weights

TOL = 1e-4  # float32 on both sides, as tests/test_prompts.py
LONG_T5 = " ".join(["a photo of a cat"] * 45)  # > 256 T5 tokens on the tiny tokenizer (checked below)


@pytest.fixture(scope="module")
def encoder(tiny_pipeline):
    return load_text_encoders(tiny_pipeline, mx.float32)


@pytest.fixture(scope="module")
def comfy(tiny_pipeline, encoder):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    load = CLIPTextModelWithProjection.from_pretrained
    clip = [
        (load(tiny_pipeline / f), CLIPTokenizer.from_pretrained(tiny_pipeline / t))
        for f, t in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    ]
    t5 = T5EncoderModel.from_pretrained(tiny_pipeline / "text_encoder_3")
    tok = T5TokenizerFast.from_pretrained(tiny_pipeline / "tokenizer_3")
    return ComfySD3(*clip[0], *clip[1], t5, tok, encoder.joint_attention_dim)


def close(ours, theirs, tol=TOL):
    ours, theirs = np.asarray(ours), theirs.detach().numpy()
    assert ours.shape == theirs.shape
    scale = max(float(np.abs(theirs).max()), 1.0)
    assert float(np.abs(ours - theirs).max()) <= tol * scale


@pytest.mark.parametrize(
    "prompt",
    [
        "a photo of a cat",
        "",
        "a (cat:1.3) on a ((wooden)) [table], \\(escaped\\)",  # ComfyUI's syntax: [x] is text
        LONG_T5,  # T5 over 256 tokens: never cut
        " ".join(["a"] * 70) + " (a a a a a a:1.2) " + " ".join(["cat"] * 100),  # chunks, the short-word rule
    ],
)
def test_one_prompt_is_comfyuis_cond(encoder, comfy, prompt):
    cond, _, pooled, _ = encode_prompt_comfyui(encoder, prompt, do_classifier_free_guidance=False)
    ref, ref_pooled = comfy.encode(prompt)
    close(cond, ref)
    close(pooled, ref_pooled)


def test_t5_is_at_least_77_tokens_and_uncut(encoder):
    n_t5 = len(encoder.tokenizer_3(LONG_T5).input_ids)
    assert n_t5 > 256
    short, *_ = encode_prompt_comfyui(encoder, "a cat", do_classifier_free_guidance=False)
    long, *_ = encode_prompt_comfyui(encoder, LONG_T5, do_classifier_free_guidance=False)
    assert short.shape[1] == 77 + 77
    assert long.shape[1] == 77 * 3 + n_t5  # three CLIP chunks, then every T5 token


def test_empty_negative_is_comfyuis_uncond(encoder, comfy):
    cond, uncond, pooled, uncond_pooled = encode_prompt_comfyui(encoder, "a (cat:1.2)", "")
    ref = [comfy.encode(p) for p in ("a (cat:1.2)", "")]
    close(cond, ref[0][0])
    close(uncond, ref[1][0])
    close(uncond_pooled, ref[1][1])


def test_contexts_of_different_lengths_repeat_as_comfyui_batches_them(encoder, comfy):
    negative = " ".join(["a"] * 70) + " (a a a a a a:1.2)"  # the short word opens a second CLIP chunk
    ref = [comfy.encode(p)[0] for p in ("a cat", negative)]
    lengths = [r.shape[1] for r in ref]
    assert lengths[0] != lengths[1] and math.lcm(*lengths) // min(lengths) <= 4  # CONDCrossAttn.can_concat
    cond, uncond, _, _ = encode_prompt_comfyui(encoder, "a cat", negative)
    both = concat(ref)
    close(cond, both[:1])
    close(uncond, both[1:])


def test_contexts_comfyui_runs_apart_are_padded_with_a_warning(encoder):
    with pytest.warns(UserWarning, match="separate model calls"):
        cond, uncond, _, _ = encode_prompt_comfyui(encoder, LONG_T5, "")
    assert cond.shape == uncond.shape


def test_without_t5_the_context_is_the_clip_part_alone(encoder, comfy):
    no_t5 = PromptEncoder(encoder.text_encoder, encoder.text_encoder_2, encoder.tokenizer, encoder.tokenizer_2,
                          joint_attention_dim=encoder.joint_attention_dim)  # fmt: skip
    cond, _, pooled, _ = encode_prompt_comfyui(no_t5, "a photo of a cat", do_classifier_free_guidance=False)
    comfy_no_t5 = ComfySD3(comfy.clip_l, comfy.tok_l, comfy.clip_g, comfy.tok_g, None, None, comfy.width)
    ref, ref_pooled = comfy_no_t5.encode("a photo of a cat")
    assert cond.shape[1] == 77
    close(cond, ref)
    close(pooled, ref_pooled)


def test_plain_syntax_is_comfyuis_disable_weights(encoder, comfy):
    cond, _, _, _ = encode_prompt_comfyui(encoder, "a (cat:1.5)", weighted=False, do_classifier_free_guidance=False)
    close(cond, comfy.encode("a (cat:1.5)", weights=False)[0])


@pytest.mark.parametrize("text", ["a (b:1.2) c", "((x)) (y:0.5) z", "\\(a\\) (b (c:2)) d", "(a:x)", "x) (y", ""])
def test_parser_is_comfyuis_token_weights(text):
    escaped = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
    ref = [(t.replace("\0\1", ")").replace("\0\2", "("), w) for t, w in token_weights(escaped, 1.0) if t]
    assert parse_comfyui(text) == ref


def test_clip_l_pools_before_its_projection(encoder, comfy):
    """The one CLIP difference from diffusers that shows on a short prompt (the tiny projection is random)."""
    _, _, pooled, _ = encode_prompt_comfyui(encoder, "a cat", do_classifier_free_guidance=False)
    _, _, diffusers_pooled, _ = encoder.encode_prompt("a cat", do_classifier_free_guidance=False)
    width_l = encoder.text_encoder.pooled_dim
    assert not np.allclose(np.asarray(pooled[:, :width_l]), np.asarray(diffusers_pooled[:, :width_l]), atol=1e-3)
    np.testing.assert_allclose(np.asarray(pooled[:, width_l:]), np.asarray(diffusers_pooled[:, width_l:]), atol=1e-5)


def test_text_encoding_is_checked_in_one_line():
    with pytest.raises(InvalidInput, match="unknown text_encoding 'comfy'; choose one of diffusers, comfyui"):
        validate_generation(prompt="x", text_encoding="comfy")


def test_generate_encodes_with_comfyui(pipe):
    kwargs = dict(prompt="a (cat:1.2)", height=64, width=64, num_inference_steps=2, seed=1, output_type="np")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = pipe.generate(**kwargs, text_encoding="comfyui", prompt_syntax="weighted")
    embeds = pipe.encode_prompt("a (cat:1.2)", text_encoding="comfyui", prompt_syntax="weighted")
    given = pipe.generate(
        **{k: v for k, v in kwargs.items() if k != "prompt"},
        prompt_embeds=embeds[0],
        negative_prompt_embeds=embeds[1],
        pooled_prompt_embeds=embeds[2],
        negative_pooled_prompt_embeds=embeds[3],
    )
    np.testing.assert_array_equal(image, given)
    assert not np.array_equal(image, pipe.generate(**kwargs, prompt_syntax="weighted"))


def test_reference_pools_where_comfyui_does(comfy):
    """Guard for the reference: the tiny vocabulary's end token is its last id, as 49407 is CLIP's."""
    assert comfy.tok_l.eos_token_id == len(comfy.tok_l) - 1
    assert torch.is_tensor(comfy.encode("")[0])
