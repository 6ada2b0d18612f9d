"""pyproject.toml lists packages explicitly (cli/ installs as sd35m_mlx_cli): every subpackage must be there,
or a wheel install silently lacks it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    block = re.search(r"^packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M)[1]
    listed = set(re.findall(r'"([^"]+)"', block))  # tomllib is 3.11+; we support 3.10
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sd35m_mlx").rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_the_library_never_imports_the_cli():
    """sd35m_mlx/ is the library; cli/ (sd35m_mlx_cli) sits on top of it, as the server does. The package's
    __main__.py (`python -m sd35m_mlx`) is an entry point like the console script, not library code."""
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "sd35m_mlx").rglob("*.py")
        if p.relative_to(ROOT).as_posix() != "sd35m_mlx/__main__.py"
        and re.search(r"^\s*(from|import)\s+sd35m_mlx_cli\b", p.read_text(), re.M)
    ]
    assert offenders == []


def test_python_dash_m_runs_the_command():
    import subprocess
    import sys

    for module in ("sd35m_mlx", "sd35m_mlx_cli"):
        run = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "Usage: " in run.stdout and "doctor" in run.stdout, (module, run.stderr)
