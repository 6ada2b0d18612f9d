"""parse_attention gives A1111's parse_prompt_attention results; extract_lora_tags reads A1111's LoRA tags."""

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sd35m_mlx.prompts.syntax import MAX_NESTING, MAX_WEIGHT, extract_lora_tags, parse_attention

# The examples of parse_prompt_attention's docstring (modules/prompt_parser.py,
# AUTOMATIC1111/stable-diffusion-webui at 28bd8e142d5f77b71ae8d7d7140b5da1b3a49906), exact floats included.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]

# More of A1111's rules, results worked out from its code
RULES = [
    ("", [("", 1.0)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("(a:0.5) [b", [("a", 0.5), (" ", 1.0), ("b", 1 / 1.1)]),  # unbalanced [ applies to the end
    ("a) b] c", [("a) b] c", 1.0)]),  # closing brackets without an opening one are text
    ("\\\\ \\) \\[", [("\\ ) [", 1.0)]),  # escapes
    ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped, as A1111 drops it
    ("(a:-1)", [("a", -1.0)]),
    ("a:1.3) b", [("a:1.3) b", 1.0)]),  # a weight without an opening bracket is text
    ("(x:1e400)", [("x:1e400", 1.1)]),  # `e` is not in A1111's weight grammar: text, plain bracket
    ("(x:nan)", [("x:nan", 1.1)]),  # nor is nan
    ("([a)b]", [("a", 1.1 / 1.1), ("b", 1 / 1.1)]),  # round and square brackets close independently
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a BREAKb BREAK", [("a BREAKb", 1.0), ("BREAK", -1.0), ("", 1.0)]),  # BREAK is a whole word
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # A1111 multiplies the marker too
    ("a  \n BREAK\t b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),  # surrounding whitespace goes
    ("(a)(b:1.1)c", [("ab", 1.1), ("c", 1.0)]),  # equal weights merge
]

# Where A1111 raises or overflows: our documented choices
OURS = [
    ("(x:1.2.3)", [("x:1.2.3", 1.1)]),  # float('1.2.3') raises in A1111: the ':' is text
    ("(x:.)", [("x:.", 1.1)]),
    ("(x:" + "9" * 400 + ")", [("x", MAX_WEIGHT)]),  # inf in A1111: clamped
    ("(x:-" + "9" * 400 + ")", [("x", -MAX_WEIGHT)]),
    ("((x:0):" + "9" * 400 + ")", [("x", 0.0)]),  # 0 * inf is nan in A1111
]


@pytest.mark.parametrize("text, expected", A1111_EXAMPLES + RULES + OURS)
def test_parse_attention_gives_a1111_results(text, expected):
    assert parse_attention(text) == expected


def test_nesting_beyond_the_limit_adds_no_weight():
    up = down = 1.0
    for _ in range(MAX_NESTING):  # A1111's order of float products
        up *= 1.1
        down *= 1 / 1.1
    for depth in (MAX_NESTING, MAX_NESTING + 5, 10_000):
        assert parse_attention("(" * depth + "x" + ")" * depth) == [("x", up)]
        assert parse_attention("[" * depth + "x") == [("x", down)]
    assert parse_attention("(" * (MAX_NESTING - 1) + "x") != [("x", up)]


PATHOLOGICAL = {
    "nested": lambda n: "(" * n + "x" + ")" * n,
    "nested_fragments": lambda n: "(a" * n + ")" * n,
    "mixed_unbalanced": lambda n: "(a[b\\(" * n,
    "whitespace_runs": lambda n: "a" + " " * (20 * n) + "b BREAK",
    "weights": lambda n: "(a:1.1)" * n + ":1" * n,
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_parse_attention_runs_in_linear_time(name):
    """10k-deep nesting parses, and 8x the input takes about 8x the time (A1111's parser: 64x)."""

    def seconds(n):
        text = PATHOLOGICAL[name](n)
        t0 = time.perf_counter()
        parse_attention(text)
        return time.perf_counter() - t0

    small, large = min(seconds(1250) for _ in range(3)), min(seconds(10_000) for _ in range(2))
    assert large < 20 * small + 0.05, f"{name}: {large:.3f}s for 8x the input of {small:.3f}s"


PROMPT_PIECES = st.sampled_from(
    ["(", ")", "[", "]", "\\", ":", ":1.3)", ":-2)", ":0)", ":1.2.3)", "1e9", ".", "BREAK", " ", "\n", "a", "é"]
    + ["9" * 320]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(PROMPT_PIECES | st.text(max_size=8), max_size=40).map("".join))
def test_parse_attention_never_raises_and_weights_are_finite(text):
    parsed = parse_attention(text)
    assert parsed and all(isinstance(t, str) and isinstance(w, float) for t, w in parsed)
    assert all(math.isfinite(w) and abs(w) <= MAX_WEIGHT for _, w in parsed)
    assert all(a[1] != b[1] for a, b in zip(parsed, parsed[1:], strict=False))  # runs are merged


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="()[]\\:"), max_size=30))
def test_text_without_syntax_is_one_fragment(text):
    if "BREAK" not in text:
        assert parse_attention(text) == [(text, 1.0)]


@pytest.mark.parametrize(
    "text, rest, tags",
    [
        ("a cat <lora:style:0.8>", "a cat ", [("style", 0.8)]),
        ("<lora:sub/dir/name> x <lyco:other:-0.5>", " x ", [("sub/dir/name", 1.0), ("other", -0.5)]),
        ("<lora: spaced :1>", "", [("spaced", 1.0)]),
        ("no tags <hypernet:x:1> (a:1.2)", "no tags <hypernet:x:1> (a:1.2)", []),
    ],
)
def test_extract_lora_tags(text, rest, tags):
    assert extract_lora_tags(text) == (rest, tags)


@pytest.mark.parametrize(
    "text, match",
    [
        ("<lora:x:abc>", "not a number"),
        ("<lora:x:nan>", "finite"),
        ("<lora:x:1e400>", "finite"),
        ("<lora:x:0.5:1>", "one weight"),
        ("<lora:x:te=1>", "one weight"),
        ("<lora::1>", "no name"),
        ("<lora:x>" * 1000, "at most 32"),
    ],
)
def test_extract_lora_tags_refuses_bad_tags_in_one_line(text, match):
    with pytest.raises(ValueError, match=match) as info:
        extract_lora_tags(text)
    assert "\n" not in str(info.value)
