"""The `sd35m-mlx` console script: a group whose default command is `generate`.

To add a subcommand (e.g. `convert`), write it as a click command in its own module and register
it here with `cli.add_command(...)`; `sd35m-mlx "a prompt"` keeps meaning `generate`.
"""

from __future__ import annotations

import os

import click

from .convert import convert
from .doctor import doctor
from .generate import generate
from .group import DefaultGroup
from .serve import serve
from .train import train

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


@click.group(cls=DefaultGroup, default="generate", context_settings=CONTEXT)
def cli() -> None:
    """Stable Diffusion 3.5 Medium in MLX."""


cli.add_command(generate)
cli.add_command(convert)
cli.add_command(serve)
cli.add_command(train)
cli.add_command(doctor)


def main() -> None:
    # We use transformers for tokenizers only: its "PyTorch was not found" advice reads as fatal to a newcomer.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    cli(prog_name="sd35m-mlx")
