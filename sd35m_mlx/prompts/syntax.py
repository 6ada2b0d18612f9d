"""AUTOMATIC1111's prompt syntax: attention weights `(x)` `[x]` `(x:w)`, `BREAK`, and `<lora:NAME:WEIGHT>` tags.

`parse_attention` gives the results of A1111's `parse_prompt_attention` (modules/prompt_parser.py,
AUTOMATIC1111/stable-diffusion-webui at 28bd8e142d5f77b71ae8d7d7140b5da1b3a49906; its docstring
examples are tests/test_prompts.py's cases), with three differences where A1111 raises, blows up or
returns infinities:

- a weight that is not a number (`(x:1.2.3)`, `(x:.)`, where A1111's `float()` raises): the `:` is text
  and the `)` closes the bracket as a plain one (x1.1);
- weights are clamped to [-MAX_WEIGHT, MAX_WEIGHT], each explicit weight and each product, so a weight is
  always finite (`(x:1e400)` is text in A1111's grammar, but 400 digits give inf, and 1.1**10000 too);
- brackets nested deeper than MAX_NESTING (per kind) are syntax without weight. This keeps the parser
  linear: A1111 multiplies every enclosed fragment at every closing bracket (quadratic for 10k levels),
  and each fragment's weight must be the same sequence of float products as A1111's to be equal bit
  for bit, so the work per fragment is bounded by the nesting it counts.
"""

from __future__ import annotations

import math
import re

MAX_WEIGHT = 100.0  # far beyond any useful emphasis (A1111 users write 0.5 - 2); keeps every weight finite
MAX_NESTING = 32  # (((...))) 32 deep is 1.1**32 = 21x; deeper brackets add no weight
MAX_LORA_TAGS = 32

BREAK = "BREAK"
BREAK_WEIGHT = -1.0  # A1111 marks BREAK as ("BREAK", -1) in the parsed list

ROUND = 1.1
SQUARE = 1 / 1.1

# A1111's re_attention, alternative for alternative (escapes, brackets, `:w)`, text, a lone `:`)
_TOKEN = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:([+-]?[.\d]+)\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")  # what float() accepts of [+-]?[.\d]+
_BREAK_WORD = re.compile(r"\bBREAK\b\s*")  # A1111's re_break is \s*\bBREAK\b\s*; the leading \s* is rstrip()
_LORA_TAG = re.compile(r"<(lora|lyco):([^>]+)>")  # A1111's re_extra_net <(\w+):([^>]+)>, LoRA networks only


def _clamp(w: float) -> float:
    return min(max(w, -MAX_WEIGHT), MAX_WEIGHT)


def _split_break(text: str) -> list[str]:
    """re.split(r"\\s*\\bBREAK\\b\\s*", text) without the regex's quadratic retries on long whitespace runs."""
    parts, pos = [], 0
    for m in _BREAK_WORD.finditer(text):
        parts.append(text[pos : m.start()].rstrip())  # str.isspace is what \s matches
        pos = m.end()
    parts.append(text[pos:])
    return parts


def parse_attention(text: str) -> list[tuple[str, float]]:
    """[(fragment, weight)] of an A1111 prompt; ("BREAK", -1.0) marks a BREAK. Never raises for a string.

    Fragments keep their text without the syntax (escapes resolved); runs of equal weight are merged.

    >>> parse_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    if not isinstance(text, str):
        raise TypeError(f"a prompt must be a string, got {type(text).__name__}")
    res: list[list] = []  # [text, weight], as A1111 builds it
    round_stack: list[int | None] = []  # start index in res of each open bracket; None: too deep, no weight
    square_stack: list[int | None] = []
    mergeable = False  # res[-1] has seen the same brackets as the next fragment: append to it

    def multiply(start: int | None, factor: float) -> None:
        nonlocal mergeable
        mergeable = False
        if start is None:
            return
        for entry in res[start:]:
            w = entry[1] * factor
            entry[1] = w if -MAX_WEIGHT <= w <= MAX_WEIGHT else _clamp(w)

    def push(stack: list[int | None]) -> None:
        nonlocal mergeable
        mergeable = False
        stack.append(len(res) if len(stack) < MAX_NESTING else None)

    def add(fragment: str) -> None:
        nonlocal mergeable
        if mergeable:
            res[-1][0] += fragment
        else:
            res.append([fragment, 1.0])
        mergeable = True

    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)  # the alternatives cover every character: always a match
        token, weight = m.group(0), m.group(1)
        pos = m.end()
        if token.startswith("\\"):
            add(token[1:])
        elif token == "(":
            push(round_stack)
        elif token == "[":
            push(square_stack)
        elif weight is not None and round_stack:
            if _NUMBER.fullmatch(weight):
                multiply(round_stack.pop(), _clamp(float(weight)))
            else:  # A1111 raises here; we read the ':' as text and go on after it
                add(":")
                pos = m.start() + 1
        elif token == ")" and round_stack:
            multiply(round_stack.pop(), ROUND)
        elif token == "]" and square_stack:
            multiply(square_stack.pop(), SQUARE)
        else:
            for i, part in enumerate(_split_break(token)):
                if i > 0:
                    res.append([BREAK, BREAK_WEIGHT])
                    mergeable = False
                add(part)

    for start in round_stack:
        multiply(start, ROUND)
    for start in square_stack:
        multiply(start, SQUARE)

    if not res:
        return [("", 1.0)]
    merged = [tuple(res[0])]
    for fragment, w in res[1:]:  # runs of identical weights become one fragment, as in A1111
        if merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + fragment, w)
        else:
            merged.append((fragment, w))
    return merged


def is_break(fragment: str, weight: float) -> bool:
    """A parsed BREAK marker. A1111 tests weight == -1; a BREAK inside brackets gets its weight multiplied
    (-1.1 in `(a BREAK b)`), which A1111 then encodes as the word BREAK with weight -1.1: we break there too."""
    return fragment == BREAK and weight < 0


def extract_lora_tags(text: str, max_tags: int = MAX_LORA_TAGS) -> tuple[str, list[tuple[str, float]]]:
    """(text without its `<lora:NAME:WEIGHT>` tags, [(NAME, WEIGHT)] in order of appearance).

    A1111's syntax (modules/extra_networks.py: the tag is removed from the text, `lyco` is an alias of
    `lora`); WEIGHT is optional (1.0). A1111's per-encoder form `<lora:NAME:TE:UNET>` (and `te=`/`unet=`
    arguments) is refused: SD3.5 LoRAs train the transformer, and one weight per LoRA is what we apply.
    Names are returned as written; a LoRA library resolves them. A bad weight, an empty name or more
    than `max_tags` tags raise ValueError (one line).
    """
    tags: list[tuple[str, float]] = []

    def take(m: re.Match) -> str:
        if len(tags) >= max_tags:
            raise ValueError(f"at most {max_tags} <lora:...> tags per prompt")
        args = m.group(2).split(":")
        name = args[0].strip()
        if not name:
            raise ValueError(f"LoRA tag {m.group(0)!r} has no name")
        if len(args) > 2 or any("=" in a for a in args[1:]):
            raise ValueError(
                f"LoRA tag {m.group(0)!r}: give one weight, <lora:NAME:WEIGHT> (per-encoder weights are not supported)"
            )
        weight = 1.0
        if len(args) == 2:
            try:
                weight = float(args[1])
            except ValueError:
                raise ValueError(f"LoRA tag {m.group(0)!r}: weight {args[1]!r} is not a number") from None
            if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
                raise ValueError(f"LoRA tag {m.group(0)!r}: weight must be finite and within +-{MAX_WEIGHT:g}")
        tags.append((name, weight))
        return ""

    return _LORA_TAG.sub(take, text), tags
