"""The tiny random-weight pipeline is a faithful stand-in for the real diffusers folder."""

import json

import numpy as np
import pytest
import regex
import torch
from safetensors.torch import load_file

from scripts.build_fixture import (
    MODEL_INDEX,
    _stream_transformer,
    _transformer_config,
    build_transformer,
)
from sd35m_mlx.loading.tiny_tokenizers import CLIP_PATTERN, bytes_to_unicode

PROMPTS = [
    "a photo of a cat sitting on a wooden table",
    "An astronaut riding a horse on the moon, 8k UHD!!  (digital art)",
    "Ünïcödé façade, naïve café; émigré's résumé",
    " ".join(["a painting of a mountain landscape at sunset"] * 12),  # > 77 tokens: truncated
]


def _openai_clip_bpe(folder):
    """OpenAI CLIP's simple_tokenizer algorithm over the folder's vocab.json and merges.txt."""
    vocab = json.loads((folder / "vocab.json").read_text())
    lines = (folder / "merges.txt").read_text().splitlines()[1:]
    ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
    b2u = bytes_to_unicode()

    def bpe(token):
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pair = min(zip(word, word[1:], strict=False), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return word

    def encode(text, max_length=77):
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = [vocab[t] for w in CLIP_PATTERN.findall(text) for t in bpe("".join(b2u[b] for b in w.encode()))]
        return [vocab["<|startoftext|>"], *ids[: max_length - 2], vocab["<|endoftext|>"]]

    return encode


def test_pipeline_loads_and_generates_with_diffusers(tiny_pipeline):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline)
    image = pipe(
        "a cat on a table",
        height=64,
        width=96,
        num_inference_steps=2,
        guidance_scale=4.5,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 96, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.05, "decoded image is (nearly) constant"


def test_model_index_names_every_component(tiny_pipeline):
    index = json.loads((tiny_pipeline / "model_index.json").read_text())
    assert index == MODEL_INDEX
    for name, entry in index.items():
        if not name.startswith("_") and entry[0] is not None:
            assert (tiny_pipeline / name).is_dir(), name
    scheduler = json.loads((tiny_pipeline / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert (scheduler["shift"], scheduler["num_train_timesteps"]) == (3.0, 1000)


@pytest.mark.parametrize("folder", ["tokenizer", "tokenizer_2"])
def test_clip_tokenizers_agree_with_openai_bpe(tiny_pipeline, folder):
    # In transformers >= 5 the two names are one tokenizers-backed class; the pure-Python OpenAI
    # algorithm is the independent check that vocab.json and merges.txt are in the CLIP format.
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    slow = CLIPTokenizer.from_pretrained(tiny_pipeline / folder)
    fast = CLIPTokenizerFast.from_pretrained(tiny_pipeline / folder)
    reference = _openai_clip_bpe(tiny_pipeline / folder)
    assert slow.model_max_length == fast.model_max_length == 77
    for prompt in PROMPTS:
        ids = slow(prompt, truncation=True, max_length=77).input_ids
        assert ids == fast(prompt, truncation=True, max_length=77).input_ids
        if folder == "tokenizer" or "!" not in prompt:  # tokenizer_2's pad "!" is a special token
            assert ids == reference(prompt), prompt
        assert slow.unk_token_id not in ids[1:-1]
    assert len(reference(PROMPTS[-1])) == 77
    assert len(slow("a photo of a cat on the table").input_ids) == 2 + 8, "frequent words are one token"
    prose = "a painting of a dog in the forest at night, oil on canvas"
    assert len(slow(prose).input_ids) < 2 + 1.5 * len(prose.split()), "words are a few tokens"


def test_clip_pad_tokens_and_encoder_ids_match(tiny_pipeline):
    from transformers import CLIPTextConfig, CLIPTokenizer

    tok_l = CLIPTokenizer.from_pretrained(tiny_pipeline / "tokenizer")
    tok_g = CLIPTokenizer.from_pretrained(tiny_pipeline / "tokenizer_2")
    assert tok_l.pad_token == "<|endoftext|>"
    assert tok_g.pad_token == "!" and tok_g.pad_token_id == 0
    padded = tok_g("a cat", padding="max_length", max_length=77).input_ids
    assert padded[:4] == [tok_g.bos_token_id, *tok_g("a cat").input_ids[1:-1], tok_g.eos_token_id]
    assert set(padded[4:]) == {0}
    # as in the real tokenizer_2: "!" is an added special token there, so "!!" is two of them
    assert tok_g("wow!!").input_ids[-3:-1] == [0, 0]
    assert tok_l("wow!!").input_ids[-3:-1] == [0, tok_l.convert_tokens_to_ids("!</w>")]
    for tok, folder in [(tok_l, "text_encoder"), (tok_g, "text_encoder_2")]:
        cfg = CLIPTextConfig.from_pretrained(tiny_pipeline / folder)
        # transformers pools at the first eos_token_id (when it is not the legacy 2)
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
            tok.bos_token_id,
            tok.eos_token_id,
            tok.pad_token_id,
        )
        assert cfg.eos_token_id != 2 and cfg.vocab_size >= len(tok)
        assert cfg.max_position_embeddings == 77


def test_t5_tokenizer_appends_eos_and_matches_sentencepiece(tiny_pipeline):
    import sentencepiece as spm
    from transformers import T5Tokenizer, T5TokenizerFast

    folder = tiny_pipeline / "tokenizer_3"
    fast = T5TokenizerFast.from_pretrained(folder)
    slow = T5Tokenizer.from_pretrained(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    assert (fast.pad_token_id, fast.eos_token_id, fast.unk_token_id) == (0, 1, 2)
    assert fast.eos_token == "</s>" and fast.model_max_length == 512
    for prompt in PROMPTS:
        ids = fast(prompt).input_ids
        assert ids == slow(prompt).input_ids
        assert ids == sp.encode(prompt) + [1]
    assert fast.unk_token_id not in fast(PROMPTS[1]).input_ids, "capitals, digits and symbols are known"
    t5 = json.loads((tiny_pipeline / "text_encoder_3" / "config.json").read_text())
    assert t5["vocab_size"] >= len(fast)
    clip_width = sum(
        json.loads((tiny_pipeline / f / "config.json").read_text())["hidden_size"]
        for f in ("text_encoder", "text_encoder_2")
    )
    assert t5["d_model"] > clip_width, "the CLIP features must be zero-padded up to the T5 width"


def test_every_weight_carries_signal(tiny_pipeline):
    for path in sorted(tiny_pipeline.glob("*/*.safetensors")):
        for name, t in load_file(path).items():
            assert t.dtype == torch.float32, name
            assert t.std() > 0.01 if t.numel() > 1 else t.abs() > 0, f"{path.parent.name}: {name}"
    weights = load_file(tiny_pipeline / "transformer" / "diffusion_pytorch_model.safetensors")
    for name in [
        "norm_out.linear.weight",
        "proj_out.weight",
        "transformer_blocks.3.norm1_context.linear.weight",
    ]:
        assert weights[name].abs().min() > 0, name
    assert weights["transformer_blocks.0.norm1.linear.weight"].std() > 0.05


def test_transformer_is_deterministic_and_seeded(tmp_path):
    a = load_file(build_transformer(tmp_path / "a", seed=5) / "diffusion_pytorch_model.safetensors")
    b = load_file(build_transformer(tmp_path / "b", seed=5) / "diffusion_pytorch_model.safetensors")
    c = load_file(build_transformer(tmp_path / "c", seed=6) / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["proj_out.weight"], c["proj_out.weight"])


def test_streamed_transformer_equals_save_pretrained(tmp_path):
    # build_full_width_transformer streams tensors to disk; same tensors as the tiny path
    saved = build_transformer(tmp_path / "saved", seed=2)
    streamed = _stream_transformer(tmp_path / "streamed", _transformer_config(), seed=2, dtype=torch.float32)
    a = load_file(saved / "diffusion_pytorch_model.safetensors")
    b = load_file(streamed / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg_a, cfg_b = (json.loads((f / "config.json").read_text()) for f in (saved, streamed))
    assert cfg_a == cfg_b


def test_sd3_medium_transformer_has_no_dual_attention_or_qk_norm(tiny_sd3_medium_transformer):
    cfg = json.loads((tiny_sd3_medium_transformer / "config.json").read_text())
    assert cfg["dual_attention_layers"] == [] and cfg["qk_norm"] is None
    keys = load_file(tiny_sd3_medium_transformer / "diffusion_pytorch_model.safetensors").keys()
    assert not any(".attn2." in k or ".norm_q." in k for k in keys)
