"""The `sd35m-mlx` command (argument parsing and printing only)."""

from __future__ import annotations

import click


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sd35m-mlx")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Stable Diffusion 3.5 Medium on Apple silicon, in MLX.

    Image generation lands in a later release; for now this prints help.
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def main() -> None:
    cli()
