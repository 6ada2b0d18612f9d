"""The default command: `sd35m-mlx PROMPT` writes PNGs that carry their own settings."""

from __future__ import annotations

import time
import traceback
import warnings
from pathlib import Path

import click

import sd35m_mlx

from . import distributed, editing, prompts_file
from .errors import RunError, UsageError, one_line
from .group import DefaultCommand
from .job import load, make_image, plan, write
from .options import generate_options
from .progress import Reporter, format_seconds, peak_memory


@click.command("generate", cls=DefaultCommand)
@generate_options
@editing.editing_options
@click.version_option(sd35m_mlx.__version__, prog_name="sd35m-mlx")
@click.pass_context
def generate(ctx: click.Context, quiet: bool, verbose: bool, **params) -> None:
    """Generate images from PROMPT with Stable Diffusion 3.5 Medium.

    Each PNG stores its settings (A1111-style `parameters` plus exact JSON), so --from-image can
    re-run it. Progress goes to stderr, the paths written to stdout.

    \b
    Examples:
      sd35m-mlx "a capybara holding a sign that reads Hello World"
      sd35m-mlx "a lighthouse at dusk" --seed 7 -n 4 -o "lighthouse-{seed}.png"
      sd35m-mlx "the same scene in watercolor" --image photo.png --strength 0.6
      sd35m-mlx --from-image sd35m-7.png --steps 60
    """
    reporter = Reporter(quiet=quiet, verbose=verbose)
    try:
        with warnings.catch_warnings():
            # Library warnings (e.g. "prompt truncated to 77 CLIP tokens") as one stderr line each.
            warnings.showwarning = reporter.python_warning
            run(ctx, reporter, params)
    except click.ClickException:
        raise
    except KeyboardInterrupt:
        reporter.interrupted()
        ctx.exit(130)
    except Exception as e:
        from sd35m_mlx.validation import InvalidInput  # numpy: not for --help

        if isinstance(e, InvalidInput):  # a generate() argument this model cannot take
            raise UsageError(str(e)) from None
        if verbose:
            traceback.print_exc()
        raise RunError(one_line(e) + ("" if verbose else " (--verbose shows the traceback)")) from None


def run(ctx: click.Context, reporter: Reporter, params: dict) -> None:
    split = params.pop("split", "seeds")
    prompts = params.pop("prompts_file", None)
    if (ranks := distributed.join(split)) is not None:  # started by mlx.launch: cli/distributed.py
        if prompts:
            raise UsageError("--prompts-file does not run under mlx.launch yet; give PROMPT")
        return distributed.run(ctx, reporter, params, ranks, split)

    if prompts:  # one job per line, the model loaded once
        return prompts_file.run(ctx, reporter, params, prompts)

    # 1. Everything that can fail fast fails before the model loads: nothing is written on failure.
    job = plan(ctx, params)
    for note in job.notes:
        reporter.say(note)

    # 2. Load
    t5 = "" if job.settings.t5 else ", no T5"
    reporter.say(f"Loading {job.settings.model} ({job.settings.dtype}{t5})")
    t0 = time.perf_counter()
    pipe = load(job, params, reporter)
    reporter.say(f"Loaded in {format_seconds(time.perf_counter() - t0)}")

    # 3. One generate() per seed, so each seed reproduces its image exactly
    written: list[tuple[Path, int]] = []
    taken: set[Path] = set()
    for i in range(len(job.seeds)):
        image = make_image(pipe, job, params, reporter, i)
        written.append(write(reporter, job, image, i, params["overwrite"], taken, params["quality"]))

    # 4. Summary
    reporter.summary(written, peak_memory())
