"""encode_prompt_weighted: A1111 syntax and long prompts on SD3's three encoders, as ComfyUI weights them.

The reference is computed here with transformers' CLIP and T5 on the same weights, from the rule itself:
fragments tokenized one by one, CLIP chunks of BOS + 75 + EOS (padded as each tokenizer pads),
`z_empty + w * (z - z_empty)` per token with z_empty the empty prompt's output at that position.
"""

import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch

from sd35m_mlx.loading.text_encoders import load_text_encoders
from sd35m_mlx.prompts.weighted import MAX_CLIP_CHUNKS, clip_chunks, encode_prompt_weighted

TOL = 1e-4  # float32 on both sides; what remains is summation order (as tests/test_encode_prompt.py)
WORDS = "a photo of a cat sitting on a wooden table next to a window with soft morning light".split()


@pytest.fixture(scope="module")
def encoder(tiny_pipeline):
    return load_text_encoders(tiny_pipeline, mx.float32)


@pytest.fixture(scope="module")
def reference(tiny_pipeline):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    return Reference(
        [
            (
                CLIPTextModelWithProjection.from_pretrained(tiny_pipeline / f),
                CLIPTokenizer.from_pretrained(tiny_pipeline / t),
            )
            for f, t in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
        ],
        T5EncoderModel.from_pretrained(tiny_pipeline / "text_encoder_3"),
        T5TokenizerFast.from_pretrained(tiny_pipeline / "tokenizer_3"),
    )


def weigh(z, z_empty, weights):
    w = torch.tensor(weights, dtype=z.dtype)[:, None]
    return z_empty + w * (z - z_empty)


class Reference:
    """The rule, written out with transformers models. A prompt is a list of sections (BREAK between
    them), a section a list of (text, weight) fragments."""

    def __init__(self, clips, t5, t5_tokenizer):
        self.clips, self.t5, self.t5_tokenizer = clips, t5, t5_tokenizer

    def clip(self, index, sections, n_chunks, layer=-2):
        model, tok = self.clips[index]
        chunks = []
        for section in sections:
            ids, weights = [], []
            for text, w in section:
                fragment = tok(text, add_special_tokens=False).input_ids
                ids, weights = ids + fragment, weights + [w] * len(fragment)
            chunks += [(ids[i : i + 75], weights[i : i + 75]) for i in range(0, max(len(ids), 1), 75)]
        chunks += [([], [])] * (n_chunks - len(chunks))

        def row(ids):
            return [tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(ids))

        with torch.no_grad():
            out = model(torch.tensor([row(ids) for ids, _ in chunks] + [row([])]), output_hidden_states=True)
        states, z_empty = out.hidden_states[layer][:-1], out.hidden_states[layer][-1]
        states = [
            weigh(z, z_empty, [1.0, *w] + [1.0] * (76 - len(w))) for z, (_, w) in zip(states, chunks, strict=True)
        ]
        return torch.cat(states), out.text_embeds[0]

    def t5_states(self, sections, length):
        tok = self.t5_tokenizer
        ids, weights = [], []
        for text, w in (f for section in sections for f in section):
            fragment = tok(text, add_special_tokens=False).input_ids
            ids, weights = ids + fragment, weights + [w] * len(fragment)
        ids, weights = ids[: length - 1] + [tok.eos_token_id], weights[: length - 1] + [1.0]
        pad = length - len(ids)
        rows = [ids + [tok.pad_token_id] * pad, [tok.eos_token_id] + [tok.pad_token_id] * (length - 1)]
        with torch.no_grad():
            out = self.t5(torch.tensor(rows)).last_hidden_state
        return weigh(out[0], out[1], weights + [1.0] * pad)

    def encode(self, sections, n_chunks, length=256, layer=-2):
        """(context (n_chunks * 77 + length, width), pooled) of one prompt."""
        (l_states, l_pooled), (g_states, g_pooled) = (self.clip(i, sections, n_chunks, layer) for i in (0, 1))
        t5 = self.t5_states(sections, length)
        clip = torch.cat([l_states, g_states], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5]).numpy(), torch.cat([l_pooled, g_pooled]).numpy()


def assert_close(ours, expected, what):
    ours = np.array(ours)
    assert ours.shape == expected.shape, f"{what}: {ours.shape} != {expected.shape}"
    scale = expected.std()
    err = np.abs(ours - expected).max()
    assert err <= TOL * scale, f"{what}: max abs error {err:.3g} > {TOL} x std {scale:.3g}"


def check(encoder, reference, prompt, negative, sections, negative_sections, n_chunks, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = encode_prompt_weighted(encoder, prompt, negative_prompt=negative, **kwargs)
    for i, (secs, name) in enumerate(((sections, "prompt"), (negative_sections, "negative"))):
        layer = -2 - (kwargs.get("clip_skip") or 0) if i == 0 else -2  # clip_skip: the prompt only, as diffusers
        context, pooled = reference.encode(secs, n_chunks, kwargs.get("max_sequence_length", 256), layer)
        assert_close(ours[i][0], context, f"{name} context")
        assert_close(ours[2 + i][0], pooled, f"{name} pooled")
    return ours


PLAIN_CASES = {
    "short": dict(prompt="a photo of a cat"),
    "empty": dict(prompt=""),
    "batch_and_images": dict(
        prompt=["a red sports car", "a bowl of fruit"], negative_prompt="blurry", num_images_per_prompt=2
    ),
    "prompt_2_and_3": dict(prompt="a cat", prompt_2="a castle on a hill", prompt_3="a river", negative_prompt="low"),
    "no_guidance": dict(prompt="a cat", do_classifier_free_guidance=False),
    "clip_skip": dict(prompt="a cat", clip_skip=1),
    "max_sequence_length_77": dict(prompt="a dog running on the beach", max_sequence_length=77),
}


@pytest.mark.parametrize("case", list(PLAIN_CASES))
def test_plain_prompt_is_encode_prompt_bit_for_bit(encoder, case):
    kwargs = PLAIN_CASES[case]
    expected = encoder.encode_prompt(**kwargs)
    ours = encode_prompt_weighted(encoder, **kwargs)
    for a, b in zip(ours, expected, strict=True):
        if b is None:
            assert a is None
        else:
            assert a.shape == b.shape and np.array_equal(np.array(a), np.array(b))


def test_weighted_prompt_matches_the_rule_on_every_encoder(encoder, reference):
    check(
        encoder,
        reference,
        "a photo of a (red:1.5) cat on a [wooden] table",
        "(blurry:1.3), low quality",
        [[("a photo of a ", 1.0), ("red", 1.5), (" cat on a ", 1.0), ("wooden", 1 / 1.1), (" table", 1.0)]],
        [[("blurry", 1.3), (", low quality", 1.0)]],
        n_chunks=1,
    )


def test_weights_are_applied(encoder):
    """Weights change the CLIP and the T5 parts (not the pooled outputs); weight 1 changes nothing."""
    plain = encode_prompt_weighted(encoder, "a cat on a table", do_classifier_free_guidance=False)
    heavy = encode_prompt_weighted(encoder, "a (cat:1.8) on a table", do_classifier_free_guidance=False)
    unit = encode_prompt_weighted(encoder, "a (cat:1.0) on a table", do_classifier_free_guidance=False)
    plain, heavy, unit = (tuple(np.array(x) for x in r if x is not None) for r in (plain, heavy, unit))
    assert np.abs(heavy[0][:, :77] - plain[0][:, :77]).max() > 0.1  # CLIP-L | CLIP-G
    assert np.abs(heavy[0][:, 77:] - plain[0][:, 77:]).max() > 0.1  # T5
    np.testing.assert_array_equal(heavy[1], plain[1])  # pooled
    for a, b in zip(unit, plain, strict=True):
        np.testing.assert_array_equal(a, b)


def long_prompt(n_tokens, tokenizer):
    single = [w for w in WORDS if len(tokenizer(w, add_special_tokens=False).input_ids) == 1]
    words = (single * (n_tokens // len(single) + 1))[:n_tokens]
    text = " ".join(words)
    assert len(tokenizer(text, add_special_tokens=False).input_ids) == n_tokens  # one token per word here
    return text


def test_300_token_prompt_is_four_chunks_pooled_from_the_first(encoder, reference):
    text = long_prompt(300, encoder.tokenizer)
    assert [len(c[0]) for c in clip_chunks(encoder.tokenizer, [(text, 1.0)])] == [77] * 4
    ours = check(encoder, reference, text, "blurry", [[(text, 1.0)]], [[("blurry", 1.0)]], n_chunks=4)
    assert ours[0].shape == ours[1].shape == (1, 4 * 77 + 256, encoder.joint_attention_dim)
    first = encode_prompt_weighted(encoder, " ".join(text.split()[:75]), "blurry")  # the first chunk alone
    np.testing.assert_allclose(np.array(ours[2]), np.array(first[2]), atol=1e-6)


def test_break_starts_a_new_chunk(encoder, reference):
    ours = check(
        encoder,
        reference,
        "a cat on a table BREAK a (window:1.2)",
        "BREAK blurry",
        [[("a cat on a table", 1.0)], [("a ", 1.0), ("window", 1.2)]],
        [[], [("blurry", 1.0)]],  # A1111: a BREAK at the start closes an empty chunk
        n_chunks=2,
    )
    assert ours[0].shape[1] == 2 * 77 + 256


@pytest.mark.parametrize("longer", ["prompt", "negative"])
def test_negative_and_prompt_are_padded_to_one_length(encoder, reference, longer):
    text = long_prompt(100, encoder.tokenizer)
    prompt, negative = (text, "blurry") if longer == "prompt" else ("a cat", text)
    ours = check(encoder, reference, prompt, negative, [[(prompt, 1.0)]], [[(negative, 1.0)]], n_chunks=2)
    assert ours[0].shape == ours[1].shape == (1, 2 * 77 + 256, encoder.joint_attention_dim)


def test_t5_keeps_max_sequence_length_and_sees_the_text_without_syntax(encoder, reference):
    check(
        encoder,
        reference,
        "a \\(small\\) [cat] BREAK on a table",
        "",
        [[("a (small) ", 1.0), ("cat", 1 / 1.1)], [("on a table", 1.0)]],
        [[("", 1.0)]],
        n_chunks=2,
        max_sequence_length=77,
    )


def test_over_long_prompts_are_refused_in_one_line(encoder):
    text = long_prompt(75 * MAX_CLIP_CHUNKS + 1, encoder.tokenizer)
    from sd35m_mlx.validation import InvalidInput

    with pytest.raises(InvalidInput, match=f"at most {MAX_CLIP_CHUNKS}"):  # bad input: the CLI's exit 2, not 1
        encode_prompt_weighted(encoder, text)
    with pytest.raises(ValueError, match="cannot be greater than 512"):
        encode_prompt_weighted(encoder, "a cat", max_sequence_length=513)


def test_clip_skip_weights_against_the_same_layer_of_the_empty_prompt(encoder, reference):
    check(
        encoder,
        reference,
        "a (cat:1.4) on a table",
        "[blurry]",
        [[("a ", 1.0), ("cat", 1.4), (" on a table", 1.0)]],
        [[("blurry", 1 / 1.1)]],
        n_chunks=1,
        clip_skip=1,
    )


def test_clip_l_and_clip_g_prompts_of_different_lengths_share_one_chunk_count(encoder):
    text = long_prompt(100, encoder.tokenizer)
    ours = encode_prompt_weighted(encoder, "a cat", prompt_2=text, negative_prompt="blurry")
    assert ours[0].shape == ours[1].shape == (1, 2 * 77 + 256, encoder.joint_attention_dim)
    alone = encode_prompt_weighted(encoder, "a cat", negative_prompt="blurry")
    width_l = encoder.text_encoder.config.hidden_size
    # CLIP-L's first chunk is the short prompt alone, its second the empty prompt's chunk
    np.testing.assert_allclose(np.array(ours[0][:, :77, :width_l]), np.array(alone[0][:, :77, :width_l]), atol=1e-5)
    empty = encode_prompt_weighted(encoder, "", do_classifier_free_guidance=False)
    np.testing.assert_allclose(np.array(ours[0][:, 77:154, :width_l]), np.array(empty[0][:, :77, :width_l]), atol=1e-5)
