"""A click group with a default command, so `sd35m-mlx "a prompt"` needs no subcommand name.

Any first argument that is not a subcommand name (a prompt, an option, -h) goes to the default
command; no arguments at all show its help. Prompts like "convert my photo" stay prompts: only
the bare word of a subcommand (e.g. `convert`) selects it, and `sd35m-mlx generate convert`
still means the prompt. `help` alone, or `help COMMAND`, shows help as in git and pip; `help` followed by
anything else (`help me draw a cat`) is a prompt.
"""

from __future__ import annotations

import click

_ROUTED = "sd35m_mlx.routed_to_default"


class DefaultGroup(click.Group):
    def __init__(self, *args, default: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.default = default

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args:
            args = ["--help"]  # a bare `sd35m-mlx` shows what it can do
        elif args == ["help"]:
            args = ["--help"]
        elif len(args) == 2 and args[0] == "help" and args[1] in self.commands:
            args = [args[1], "--help"]
        if args[0] not in self.commands:
            args = [self.default, *args]
            ctx.meta[_ROUTED] = True
        return super().parse_args(ctx, args)


class _Context(click.Context):
    @property
    def command_path(self) -> str:
        if self.parent is not None and self.parent.meta.get(_ROUTED, False):
            return self.parent.command_path  # usage and "Try 'sd35m-mlx --help'" without the hidden name
        return super().command_path


class DefaultCommand(click.Command):
    """Reached by default, it reads as the program itself (`sd35m-mlx [OPTIONS] [PROMPT]`); its help
    lists the other commands."""

    context_class = _Context

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        group = ctx.parent.command if ctx.parent is not None else None
        if not isinstance(group, click.Group):
            return
        others = [(name, cmd.get_short_help_str()) for name, cmd in group.commands.items() if cmd is not self]
        if others:
            with formatter.section("Other commands"):
                formatter.write_dl(others)
