"""`python -m sd35m_mlx_cli ...` is the `sd35m-mlx` command."""

from .main import main

main()
