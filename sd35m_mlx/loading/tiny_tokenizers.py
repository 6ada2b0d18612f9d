"""Tokenizers for random-weight models (tiny-random, the test fixtures), learned offline from a small corpus:
CLIP's byte-level BPE (vocab and merges) and a T5 sentencepiece model, written in the layouts transformers reads."""

from __future__ import annotations

import io
import json
import string
import tempfile
from collections import Counter
from pathlib import Path

import regex

# Tokenizer corpus: prompt-like English, so ordinary words become one to three BPE tokens.
CORPUS = """\
a photo of a cat sitting on a wooden table next to a window with soft morning light
a painting of a mountain landscape at sunset, oil on canvas, highly detailed
a portrait of an old man with a long white beard, studio lighting, sharp focus
an astronaut riding a horse on the moon, digital art, trending on artstation
a red sports car parked in front of a modern glass building in the city at night
a bowl of fresh fruit with apples, oranges and grapes on a kitchen counter
a small house in the forest covered with snow, warm light in the windows
a dog running on the beach with waves in the background, golden hour photography
the quick brown fox jumps over the lazy dog while the children watch from the garden
a close up photograph of a flower with drops of water on the petals, macro lens
a futuristic city with flying cars and tall towers, cinematic lighting, concept art
a watercolor painting of a river flowing through a green valley with trees and birds
a cup of coffee and a book on a table in a cozy cafe, shallow depth of field
a medieval castle on a hill under a stormy sky with lightning, dramatic, epic
a young woman reading a letter by the fire, in the style of a classic oil painting
a cute robot holding a sign that says hello world, three dimensional render
an aerial view of a green island surrounded by blue water and white sand
a black and white photo of a street in the rain with people holding umbrellas
a plate of pasta with tomato sauce and basil leaves, food photography, high quality
a colorful bird sitting on a branch of a tree in the tropical rain forest
the light of the moon reflected on the surface of a calm lake at night
a pencil sketch of a sleeping cat curled up on a soft blanket
a wide angle photograph of the northern lights over a frozen lake in winter
a bright kitchen with white walls, wooden floor and plants near the window
a detailed illustration of a dragon flying over a village, fantasy art
two friends walking down a country road in autumn with orange and yellow leaves
a close portrait of a smiling girl with freckles and red hair, 85mm lens, 8k uhd, film grain
"Hello World!" written in neon letters on a brick wall at midnight; photo by a street photographer
an ancient temple in the jungle, stone statues covered with moss, light rays through the mist
a still life with a glass bottle, three lemons and a blue cloth, painted in the 1890s
a snowy mountain village at dawn, smoke rising from chimneys, people walking to the market
What does the ocean look like from space? A satellite image of clouds over the sea.
a giant whale swimming through the clouds above a quiet town, surreal, dreamlike
the interior of a library with tall shelves full of old books and a spiral staircase
a vintage poster of a train crossing a bridge over a canyon, art deco style, 1920s
a golden retriever puppy playing with a ball in the grass, bokeh, award winning photo
a knight in shining armor standing in front of a burning castle, dark fantasy painting
a tiny mouse wearing a hat and a scarf, children's book illustration, pastel colors
a steaming bowl of ramen with an egg, green onions and slices of pork, 50mm, f/1.8
rows of sunflowers in a field under a clear blue sky, summer afternoon, 35mm film
the skyline of New York City seen from the water at sunrise, long exposure
"""

# OpenAI CLIP's pre-tokenizer (simple_tokenizer.py), applied to lower-cased, whitespace-cleaned text
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table ('!' first, so it gets id 0)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def train_clip_bpe(corpus: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    b2u = bytes_to_unicode()
    text = " ".join(corpus.lower().split())
    counts = Counter("".join(b2u[b] for b in w.encode()) for w in CLIP_PATTERN.findall(text))
    words = {w: (*w[:-1], w[-1] + "</w>") for w in counts}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for w, syms in words.items():
            for pair in zip(syms, syms[1:], strict=False):
                pairs[pair] += counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # ties broken by the pair itself: deterministic
        if pairs[best] < 2:
            break
        merges.append(best)
        words = {w: _merge_pair(syms, best) for w, syms in words.items()}
    base = list(b2u.values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for t in tokens:  # two merges can spell the same token: keep ids dense
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def write_clip_tokenizer(out_dir: Path, vocab: dict[str, int], merges: list, pad_token: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    special["pad_token"] = pad_token
    flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    added = {str(vocab[t]): dict(content=t, **flags) for t in sorted(set(special.values()), key=vocab.get)}
    config = dict(
        add_prefix_space=False,
        added_tokens_decoder=added,
        clean_up_tokenization_spaces=True,
        do_lower_case=True,
        errors="replace",
        model_max_length=77,
        tokenizer_class="CLIPTokenizer",
        **special,
    )
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))
    return out_dir


def write_t5_tokenizer(out_dir: Path, corpus: str, vocab_size: int) -> Path:
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    # Case variants and the printable ASCII set, so capitals, digits and symbols are not <unk>
    lines = corpus.splitlines()
    lines += [f(line) for f in (str.capitalize, str.title, str.upper) for line in lines]
    lines.append(" ".join(string.printable[:94]))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(model.getvalue())
        tok = T5TokenizerFast.from_pretrained(tmp, model_max_length=512, legacy=False)
    tok.save_pretrained(out_dir)
    (out_dir / "spiece.model").write_bytes(model.getvalue())  # the real repo ships it next to tokenizer.json
    return out_dir
