"""`sd35m-mlx convert SRC DST`: write MLX weights that load with no conversion work, optionally quantized."""

from __future__ import annotations

import time
import traceback
import warnings

import click

from .errors import RunError, UsageError, one_line
from .progress import Reporter, format_seconds
from .settings import DTYPES

_BITS = ("4", "8")


@click.command("convert")
@click.argument("source", metavar="SRC")
@click.argument("destination", metavar="DST")
@click.option(
    "--quantize",
    type=click.Choice(_BITS),
    default=None,
    show_default=False,
    help="Quantize the MMDiT's and T5's linear layers to 4 or 8 bits (the MMDiT's embedders and final "
    "layer stay in --dtype, its adaLN layers at 8 bits). MMDiT + T5 weights, bfloat16 14.5 GB: 8 bits "
    "8.0 GB, output error about twice bfloat16 rounding's; 4 bits 5.0 GB, 20-30x that error "
    "(benchmarks/bench_quantization.py).  [default: no quantization]",
)
@click.option(
    "--t5-quantize",
    type=click.Choice((*_BITS, "none")),
    default=None,
    show_default=False,
    help="T5's own setting: 4, 8, or none (keep it in --dtype).  [default: as --quantize]",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="bfloat16",
    help="Dtype of the stored weights (and of quantization scales). T5 is never stored in float16 (it "
    "overflows): bfloat16 instead.",
)
@click.option(
    "--group-size",
    type=click.Choice(("32", "64", "128")),
    default="64",
    help="Quantization group size: weights share one scale and bias per this many input features.",
)
@click.option("--t5/--no-t5", default=True, help="Include the T5-XXL text encoder (--no-t5 saves ~9.5 GB).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the output folder.")
@click.option("-v", "--verbose", is_flag=True, help="Print tracebacks on errors.")
def convert(
    source: str,
    destination: str,
    quantize: str | None,
    t5_quantize: str | None,
    dtype: str,
    group_size: str,
    t5: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Convert a model to (quantized) MLX weights.

    Writes SRC into the new folder DST. SRC is anything --model takes: a diffusers-layout folder,
    a single-file checkpoint, a converted folder, or a Hugging Face Hub id. DST must not exist or
    be empty; it is written completely or not at all. Then run `sd35m-mlx "a prompt" --model DST`.

    \b
    Examples:
      sd35m-mlx convert stabilityai/stable-diffusion-3.5-medium sd35m-mlx-bf16
      sd35m-mlx convert ./sd3.5-medium sd35m-mlx-q8 --quantize 8 --t5-quantize 4
    """
    from sd35m_mlx.convert import check_destination  # mlx: not for --help

    reporter = Reporter(quiet=quiet, verbose=verbose)
    try:
        dst = check_destination(destination)
    except OSError as e:
        raise UsageError(one_line(e)) from None
    transformer_bits = int(quantize) if quantize else None
    t5_bits = transformer_bits if t5_quantize is None else (None if t5_quantize == "none" else int(t5_quantize))
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = reporter.python_warning
            run(source, dst, dtype, transformer_bits, t5_bits, int(group_size), t5, reporter)
    except KeyboardInterrupt:
        reporter.say("Interrupted; nothing written.")
        raise click.exceptions.Exit(130) from None
    except Exception as e:
        if verbose:
            traceback.print_exc()
        raise RunError(one_line(e) + ("" if verbose else " (--verbose shows the traceback)")) from None
    reporter.say(f"Converted in {format_seconds(time.perf_counter() - t0)}")
    reporter.result(dst)


def run(source, dst, dtype, transformer_bits, t5_bits, group_size, t5, reporter) -> None:
    from sd35m_mlx.convert import convert as convert_weights
    from sd35m_mlx.pipeline import resolve_dtype

    convert_weights(
        source,
        dst,
        dtype=resolve_dtype(dtype),
        transformer_bits=transformer_bits,
        t5_bits=t5_bits,
        group_size=group_size,
        load_t5=t5,
        progress=reporter.say,
    )
