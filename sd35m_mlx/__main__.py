"""`python -m sd35m_mlx ...` is the `sd35m-mlx` command (an entry point like the console script, not library code)."""

from sd35m_mlx_cli.main import main

main()
