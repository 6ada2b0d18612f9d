"""Progress on stderr: stage lines, a denoising bar with per-step time, a closing summary."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

import sd35m_mlx  # noqa: F401  (loads OpenBLAS before mlx.core is imported below)

BAR_WIDTH = 24


def format_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(round(s), 60)
    return f"{m}:{s:02d} min" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d} h"


def format_bytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


class Reporter:
    """Everything the command says. --quiet keeps only the output paths (stdout) and errors."""

    def __init__(self, *, quiet: bool = False, verbose: bool = False):
        self.quiet = quiet
        self.verbose = verbose
        self.live = sys.stderr.isatty()  # redraw the bar in place only on a terminal
        self.start = time.perf_counter()
        self.mid_line = False  # a live bar is drawn and its line not yet ended

    def say(self, message: str) -> None:
        if not self.quiet:
            if self.mid_line:
                click.echo(err=True)
                self.mid_line = False
            click.echo(message, err=True)

    def python_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """A `warnings.showwarning` that prints one line (with its origin under --verbose)."""
        where = f" ({category.__name__} at {filename}:{lineno})" if self.verbose else ""
        self.say(f"Warning: {message}{where}")

    def interrupted(self) -> None:
        """Said even with --quiet: the user should know the run stopped short."""
        if self.mid_line:
            click.echo(err=True)
            self.mid_line = False
        click.echo("Interrupted; no partial file written.", err=True)

    def result(self, path: Path) -> None:
        click.echo(str(path))

    def steps(self, label: str) -> StepProgress:
        return StepProgress(self, label)

    def summary(self, written: list[tuple[Path, int]], peak_bytes: int | None) -> None:
        for path, seed in written:
            self.say(f"  {path}  (seed {seed})")
        peak = f", peak memory {format_bytes(peak_bytes)}" if peak_bytes is not None else ""
        n = len(written)
        self.say(f"{n} image{'s' * (n != 1)} in {format_seconds(time.perf_counter() - self.start)}{peak}")


class StepProgress:
    """The `callback(step, total, latents)` for generate(): draws the bar, never touches the latents.

    generate() encodes the prompt before step 1, so step 1's time includes encoding; the per-step
    time shown is the mean over later steps once there are any.
    """

    def __init__(self, reporter: Reporter, label: str):
        self.r = reporter
        self.label = label
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.t_last = self.t0
        self.step = 0
        self.total = 0

    def __call__(self, step: int, total: int, latents=None) -> None:
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        self.step, self.total, self.t_last = step, total, now
        if self.r.quiet:
            return
        if self.r.live:
            click.echo(f"\r{self.line()}\x1b[K", err=True, nl=False)  # ESC[K: clear the old line's tail
            self.r.mid_line = True
        elif self.r.verbose or step * 10 // total > (step - 1) * 10 // total:  # logs: every 10%
            click.echo(self.line(), err=True)
        if step == total:
            self.r.say(f"{self.label} decoding")

    def per_step(self) -> float:
        if self.step > 1 and self.t_first is not None:
            return (self.t_last - self.t_first) / (self.step - 1)
        return self.t_last - self.t0

    def line(self) -> str:
        done = int(BAR_WIDTH * self.step / max(self.total, 1))
        bar = "#" * done + "-" * (BAR_WIDTH - done)
        eta = self.per_step() * (self.total - self.step)
        tail = f"  eta {format_seconds(eta)}" if self.step < self.total else ""
        return f"{self.label} denoising [{bar}] {self.step}/{self.total}  {self.per_step():.2f} s/step{tail}"


def peak_memory() -> int | None:
    """MLX's peak allocation so far, in bytes (the CLI's only call into mlx)."""
    try:
        import mlx.core as mx

        return int(mx.get_peak_memory())
    except Exception:  # a summary line is not worth failing a finished run
        return None
