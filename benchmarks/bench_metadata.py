"""Reading A1111 `parameters` text: our one-pass parser vs A1111's regex, at doubling line lengths.

    python benchmarks/bench_metadata.py                   # hostile lines (no colon: the regex's worst case)
    python benchmarks/bench_metadata.py --regex-max 50000 # the regex up to 50,000 characters (about 40 s)

Sizes double row to row: a linear parser's time doubles (ratio ~2); A1111's regex quadruples (ratio
~4: every start position scans to the end of the line). The regex is stopped at --regex-max because
80,000 characters took it 33 s.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd35m_mlx_cli.metadata import KeyValueLine  # noqa: E402

# A1111's pattern, as cli/metadata.py used it before (modules/infotext_utils.py: re_param_code)
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')

LINES = {
    "words, no colon": lambda n: ("lorem ipsum " * (n // 12 + 1))[:n],
    "one key per item": lambda n: ("Key: value, " * (n // 12 + 1))[:n],
    "open quotes": lambda n: ('k: "a, ' * (n // 7 + 1))[:n],
}


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[12_500 * 2**k for k in range(8)])
    p.add_argument("--regex-max", type=int, default=25_000, help="longest line given to the regex")
    args = p.parse_args(argv)
    print(
        f"{'line':18} {'chars':>9} {'ours s':>9} {'x prev':>7} {'steps/char':>10} {'A1111 regex s':>14} {'x prev':>7}"
    )
    for name, make in LINES.items():
        prev_ours = prev_regex = None
        for n in args.sizes:
            line = make(n)
            ours = best_of(lambda line=line: KeyValueLine(line))
            steps = KeyValueLine(line).steps / max(len(line), 1)
            regex = best_of(lambda line=line: A1111_PARAM.findall(line), 1) if n <= args.regex_max else None
            grow = f"{ours / prev_ours:7.1f}" if prev_ours else " " * 7
            rgrow = f"{regex / prev_regex:7.1f}" if regex and prev_regex else " " * 7
            rtext = f"{regex:14.3f}" if regex is not None else f"{'-':>14}"
            print(f"{name:18} {n:9,} {ours:9.4f} {grow} {steps:10.2f} {rtext} {rgrow}")
            prev_ours, prev_regex = ours, regex


if __name__ == "__main__":
    main()
