"""Tokenizers for the random-weight fixtures, learned offline: CLIP's byte-level BPE (vocab and merges
from a corpus) and a T5 sentencepiece model, written in the layouts transformers reads."""

from __future__ import annotations

import io
import json
import string
import tempfile
from collections import Counter
from pathlib import Path

import regex

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
