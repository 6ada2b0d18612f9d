"""`sd35m-mlx train --data DIR --output OUT_DIR`: train a LoRA on a folder of captioned images."""

from __future__ import annotations

import traceback
import warnings

import click

from .errors import RunError, UsageError, one_line
from .progress import Reporter
from .settings import DTYPES


@click.command("train")
@click.option("--data", default=None, help="Folder of images with same-name .txt captions (kohya / mflux layout).")
@click.option("--output", default=None, help="Output folder: LoRA, checkpoints, validation images, config.json.")
@click.option("--config", "config_file", default=None, help="A .toml or .json file with any of these settings.")
@click.option("--model", default=None, help="Base model (anything `generate --model` takes).  [default: the Hub repo]")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Compute dtype.  [default: bfloat16]")
@click.option("--steps", type=int, default=None, help="Optimizer steps.  [default: 1000]")
@click.option("--rank", type=int, default=None, help="LoRA rank.  [default: 16]")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (scale alpha / rank).  [default: the rank]")
@click.option("--learning-rate", type=float, default=None, help="AdamW learning rate.  [default: 1e-4]")
@click.option("--lr-schedule", type=click.Choice(("constant", "cosine")), default=None, help="[default: constant]")
@click.option("--warmup-steps", type=int, default=None, help="Linear warm-up steps.  [default: 0]")
@click.option("--batch-size", type=int, default=None, help="Images per step (one aspect bucket each).  [default: 1]")
@click.option(
    "--resolution", type=int, default=None, help="Training size; buckets keep about its area.  [default: 1024]"
)
@click.option(
    "--targets",
    default=None,
    help="Layers to adapt: presets attention, mlp, adaln and/or module names (attn.to_q, ff.net.2), "
    "comma-separated.  [default: attention (both streams and attn2)]",
)
@click.option("--quantize", type=click.Choice(("4", "8")), default=None, help="Quantize the frozen base.")
@click.option("--no-t5", "no_t5", is_flag=True, default=None, help="Encode captions without T5.")
@click.option("--seed", type=int, default=None, help="Seed of LoRA init, data order, noise.  [default: 0]")
@click.option(
    "--loss",
    type=click.Choice(("x0", "velocity")),
    default=None,
    help="x0: diffusers' preconditioned loss (its default); velocity: plain flow-matching MSE.  [default: x0]",
)
@click.option(
    "--gradient-checkpointing",
    is_flag=True,
    default=None,
    help="Backward block by block, each block recomputed: one block's activations in memory at a time.",
)
@click.option(
    "--compile",
    "compile",
    is_flag=True,
    default=None,
    help="mx.compile each step's graph (traced once per aspect bucket); see benchmarks/README.md for when it helps.",
)
@click.option("--trigger-word", default=None, help="Put in front of every caption.")
@click.option("--default-caption", default=None, help="Caption for images without a .txt file.")
@click.option("--validation-prompt", default=None, help="Generate this prompt at fixed seeds every N steps.")
@click.option(
    "--validation-every", type=int, default=None, help="Steps between validation images.  [default: end only]"
)
@click.option("--save-every", type=int, default=None, help="Steps between checkpoints.  [default: end and Ctrl-C]")
@click.option(
    "--export-kohya",
    is_flag=True,
    default=None,
    help="Also write OUT_DIR/lora_kohya.safetensors in kohya's SD3 layout (ComfyUI, Forge, kohya's tools).",
)
@click.option(
    "--resume",
    default=None,
    help="A checkpoint-N folder of an earlier run with the same settings (README: which may change).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    default=None,
    help="Replace the earlier run in a non-empty OUT_DIR (its LoRA, checkpoints, validation images; not cache/).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="Print tracebacks on errors.")
def train(config_file, quiet, verbose, **flags) -> None:
    """Train a LoRA for SD3.5 Medium (diffusers' SD3 recipe; the LoRA loads in diffusers, ComfyUI and here).

    Flags override the --config file; the effective settings are saved as OUT_DIR/config.json.

    \b
    Example:
      sd35m-mlx train --data ./my-style --output ./my-style-lora --steps 1500 --quantize 8 \\
        --trigger-word mystyle --validation-prompt "mystyle, a lighthouse" --validation-every 250
    """
    from sd35m_mlx.training.config import build_config, read_config_file
    from sd35m_mlx.training.run import train as run_training

    reporter = Reporter(quiet=quiet, verbose=verbose)
    if flags.get("quantize") is not None:
        flags["quantize"] = int(flags["quantize"])
    try:
        file_values = read_config_file(config_file) if config_file else {}
        config = build_config(file_values, flags)
    except ValueError as e:
        raise UsageError(one_line(e)) from None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = reporter.python_warning
            path = run_training(config, say=reporter.say, show_progress=not quiet)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None
    except ValueError as e:
        if verbose:
            traceback.print_exc()
        raise UsageError(one_line(e)) from None
    except Exception as e:
        if verbose:
            traceback.print_exc()
        raise RunError(one_line(e) + ("" if verbose else " (--verbose shows the traceback)")) from None
    reporter.result(path)
