"""One-line CLI errors: click prints `Error: message` on stderr and exits with `exit_code`."""

from __future__ import annotations

import click


class UsageError(click.ClickException):
    """A bad option value or combination; exit 2 as for click's own parsing errors, but no usage block."""

    exit_code = 2


class RunError(click.ClickException):
    """A failure while running (loading, generating, writing); exit 1."""

    exit_code = 1


def one_line(exc: BaseException) -> str:
    """An exception's first message line; with its type name unless a plain ValueError or OSError."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, (ValueError, OSError)):
        return text
    return f"{type(exc).__name__}: {text}"
