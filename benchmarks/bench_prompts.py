"""Prompt encoding with A1111 syntax: a 300-token weighted prompt vs a plain 77-token one.

    python benchmarks/bench_prompts.py                  # the tiny fixture (built in a temporary folder)
    python benchmarks/bench_prompts.py --model FOLDER   # any diffusers-layout SD3.5 folder

Best of --runs taken in turns, with a negative prompt, float32. Rows and figures: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sd35m_mlx  # noqa: E402,F401  (OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx  # noqa: E402

from benchmarks.measure import time_runs  # noqa: E402
from sd35m_mlx.loading.text_encoders import load_text_encoders  # noqa: E402
from sd35m_mlx.prompts.syntax import parse_attention  # noqa: E402
from sd35m_mlx.prompts.weighted import encode_prompt_weighted  # noqa: E402

WORDS = "a photo of a cat sitting on a wooden table next to a window with soft morning light".split()


def prompt_of(tokenizer, n_tokens: int, weighted: bool) -> str:
    """n_tokens CLIP tokens of words that are one token each; every fifth word weighted if asked."""
    single = [w for w in WORDS if len(tokenizer(w, add_special_tokens=False).input_ids) == 1]
    words = (single * (n_tokens // len(single) + 1))[:n_tokens]
    if weighted:
        words = [f"({w}:1.3)" if i % 5 == 0 else w for i, w in enumerate(words)]
    return " ".join(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="diffusers-layout folder (default: the tiny fixture)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the tiny T5 tokenizer cuts the 300-token prompt at 256 tokens
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            from scripts.build_fixture import build_tiny_pipeline

            folder = build_tiny_pipeline(Path(tmp) / "tiny")
        encoder = load_text_encoders(folder, mx.float32)
        plain = prompt_of(encoder.tokenizer, 75, weighted=False)
        long = prompt_of(encoder.tokenizer, 300, weighted=True)
        rows = [
            ("encode_prompt, plain 77 tokens", lambda: encoder.encode_prompt(plain, "blurry")),
            ("encode_prompt_weighted, the same plain prompt", lambda: encode_prompt_weighted(encoder, plain, "blurry")),
            ("encode_prompt_weighted, 300 tokens, weighted", lambda: encode_prompt_weighted(encoder, long, "blurry")),
        ]
        shapes = [tuple(fn()[0].shape) for _, fn in rows]  # also the warm-up
        best = [float("inf")] * len(rows)
        for _ in range(args.runs):  # round robin: a busy spell on a shared machine hits every row alike
            best = [min(b, time_runs(fn, 1)[0]) for b, (_, fn) in zip(best, rows, strict=True)]
        print(f"{'':48s} {'best s':>9s} {'ratio':>6s}  context")
        for (name, _), b, shape in zip(rows, best, shapes, strict=True):
            print(f"{name:48s} {b:9.4f} {b / best[0]:6.2f}  {shape}")
        t0 = time.perf_counter()
        parse_attention(long)
        print(f"parse_attention of the 300-token prompt ({len(long)} chars): {1e3 * (time.perf_counter() - t0):.2f} ms")


if __name__ == "__main__":
    main()
