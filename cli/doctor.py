"""`sd35m-mlx doctor`: the environment, cached models and recommended settings, then a self-test on a tiny
random model (no download). Paste its output into a bug report; exit 0 only when every check passes."""

from __future__ import annotations

import sys

import click


def _line(check) -> str:
    status = {None: "  ", True: "ok", False: "FAILED"}[check.ok]
    return f"{status:6} {check.name}: {check.detail}"


@click.command()
@click.option("--no-self-test", is_flag=True, help="Only print the environment; build and run nothing.")
@click.option(
    "--bench",
    is_flag=True,
    help="Instead of the self-test, time SD3.5 Medium at 1024 px in bfloat16, --quantize 8 and --quantize 4 "
    "(one warm step each, minutes) and print a row for README's per-chip table. Only where the model is "
    "already in the Hugging Face cache: nothing is downloaded.",
)
@click.option("--bench-model", default=None, hidden=True, help="The bench's model (tests: tiny-random).")
@click.option("--bench-size", type=click.IntRange(16), default=None, hidden=True, help="The bench's size in px.")
def doctor(no_self_test: bool, bench: bool, bench_model: str | None, bench_size: int | None) -> None:
    """Check this machine: versions, device and memory, cached models, the settings we recommend, and a
    self-test (generate on a worker thread, cancel, a quantized layer, a preview) on a tiny random model
    built in memory: no download, a few seconds."""
    from sd35m_mlx.doctor import cached_models, environment, recommendations, self_test

    for check in [*environment(), *cached_models(), *recommendations()]:
        click.echo(_line(check))
    if bench:
        from sd35m_mlx.doctor import bench as bench_mod

        model, size = bench_model or bench_mod.DEFAULT_MODEL, bench_size or bench_mod.SIZE
        timings = bench_mod.bench(model, size, say=click.echo)
        if timings is not None:
            click.echo(bench_mod.HEADER)
            click.echo(bench_mod.table_row(timings))
        return
    if no_self_test:
        return
    failed = 0
    for check in self_test():
        click.echo(_line(check))
        failed += check.ok is False
    click.echo(f"{'all checks passed' if not failed else f'{failed} check(s) FAILED'}")
    sys.exit(1 if failed else 0)
