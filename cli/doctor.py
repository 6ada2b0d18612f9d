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
def doctor(no_self_test: bool) -> None:
    """Check this machine: versions, device and memory, cached models, the settings we recommend, and a
    self-test (generate on a worker thread, cancel, a quantized layer, a preview) on a tiny random model
    built in memory: no download, a few seconds."""
    from sd35m_mlx.doctor import cached_models, environment, recommendations, self_test

    for check in [*environment(), *cached_models(), *recommendations()]:
        click.echo(_line(check))
    if no_self_test:
        return
    failed = 0
    for check in self_test():
        click.echo(_line(check))
        failed += check.ok is False
    click.echo(f"{'all checks passed' if not failed else f'{failed} check(s) FAILED'}")
    sys.exit(1 if failed else 0)
