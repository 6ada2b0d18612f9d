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
    """sd35m_mlx/ is the library; cli/ (sd35m_mlx_cli) sits on top of it, as the server does."""
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "sd35m_mlx").rglob("*.py")
        if re.search(r"^\s*(from|import)\s+sd35m_mlx_cli\b", p.read_text(), re.M)
    ]
    assert offenders == []
