"""PromptEncoder.encode_prompt reproduces diffusers' StableDiffusion3Pipeline.encode_prompt."""

import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch
from parity import assert_close

from sd35m_mlx.loading.text_encoders import load_text_encoders

# Both sides compute in float32; what remains is summation order (~2e-5 of the output std here).
TOL = 1e-4
LONG = "a photo of a cat sitting on a wooden table next to a window " * 8 + "under the golden moon"
NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")

CASES = {
    "short": dict(prompt="a photo of a cat"),
    "empty": dict(prompt=""),
    "over_77_clip_tokens": dict(prompt=LONG),
    "max_sequence_length_77": dict(prompt=LONG, max_sequence_length=77),
    "max_sequence_length_512": dict(prompt="a dog running on the beach", max_sequence_length=512),
    "batch_of_two": dict(prompt=["a red sports car in the city", "a bowl of fresh fruit"]),
    "prompt_2_and_3": dict(
        prompt="a cat",
        prompt_2="a medieval castle on a hill",
        prompt_3="a watercolor painting of a river",
        negative_prompt="blurry, low quality",
    ),
    "two_images_per_prompt": dict(prompt=["a cat", "a dog"], negative_prompt="blurry", num_images_per_prompt=2),
    "no_guidance": dict(prompt="a cat", do_classifier_free_guidance=False),
    "clip_skip": dict(prompt="a cat", clip_skip=1),
}


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_pipeline):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(
        tiny_pipeline,
    )


@pytest.fixture(scope="module")
def prompt_encoder(tiny_pipeline):
    return load_text_encoders(tiny_pipeline, mx.float32)


def diffusers_encode(pipe, kwargs):
    kwargs = dict(kwargs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe.encode_prompt(
            kwargs.pop("prompt"), kwargs.pop("prompt_2", None), kwargs.pop("prompt_3", None), **kwargs
        )


def assert_matches(ours, expected):
    for name, a, b in zip(NAMES, ours, expected, strict=True):
        if b is None:
            assert a is None, name
            continue
        assert_close(a, b, rtol_of_std=TOL, min_std=0.1, what=name)


@pytest.mark.parametrize("case", list(CASES))
def test_encode_prompt_matches_diffusers(prompt_encoder, diffusers_pipe, case):
    kwargs = CASES[case]
    expected = diffusers_encode(diffusers_pipe, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = prompt_encoder.encode_prompt(**kwargs)

    assert_matches(ours, expected)
    seq = 77 + kwargs.get("max_sequence_length", 256)
    assert ours[0].shape[1] == seq and ours[0].dtype == mx.float32
    if kwargs.get("do_classifier_free_guidance", True) and kwargs["prompt"]:
        # the negative prompt is really encoded: it differs from the prompt
        assert np.abs(np.array(ours[0]) - np.array(ours[1])).max() > 0.1


def test_batch_rows_are_the_single_prompt_encodings(prompt_encoder):
    """Batching (and joining prompt with negative prompt) changes nothing per row."""
    prompts = CASES["batch_of_two"]["prompt"]
    batch = prompt_encoder.encode_prompt(prompts)
    for i, p in enumerate(prompts):
        single = prompt_encoder.encode_prompt(p)
        for a, b in zip(batch, single, strict=True):
            np.testing.assert_allclose(np.array(a[i]), np.array(b[0]), atol=1e-5)
    assert np.abs(np.array(batch[0][0] - batch[0][1])).max() > 0.1


def test_without_t5_the_t5_part_is_zeros(tiny_pipeline, diffusers_pipe):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**{**diffusers_pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    ours_encoder = load_text_encoders(tiny_pipeline, mx.float32, load_t5=False)
    assert ours_encoder.text_encoder_3 is None
    kwargs = dict(prompt=["a cat", "a small house in the forest"], negative_prompt="blurry")

    ours = ours_encoder.encode_prompt(**kwargs)

    assert_matches(ours, diffusers_encode(pipe, kwargs))
    assert not np.array(ours[0][:, 77:]).any()
    assert ours[0].shape == (2, 77 + 256, diffusers_pipe.transformer.config.joint_attention_dim)


def test_over_long_prompts_warn_with_what_was_cut(prompt_encoder):
    with pytest.warns(UserWarning) as record:
        prompt_encoder.encode_prompt(LONG, max_sequence_length=77)
    messages = [str(w.message) for w in record]
    clip = [m for m in messages if "CLIP can only handle sequences up to 77 tokens" in m]
    t5 = [m for m in messages if "`max_sequence_length` is set to 77 tokens" in m]
    assert len(clip) == 2 and len(t5) == 1, messages  # CLIP-L, CLIP-G, T5
    assert all("golden moon" in m for m in clip + t5)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits gives no warning
        prompt_encoder.encode_prompt("a photo of a cat", max_sequence_length=77)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt="a cat", max_sequence_length=513), "cannot be greater than 512"),
        (dict(prompt="a cat", max_sequence_length=0), "positive"),
        (dict(prompt=["a", "b"], negative_prompt=["c"]), "negative_prompt has 1 entries"),
        (dict(prompt=["a", "b"], prompt_3=["c"]), "prompt_3 has 1 entries"),
        (dict(prompt="a cat", clip_skip=2), "clip_skip must be in"),  # the tiny CLIP-L has 2 layers
    ],
)
def test_encode_prompt_rejects_bad_arguments(prompt_encoder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prompt_encoder.encode_prompt(**kwargs)
