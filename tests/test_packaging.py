"""pyproject.toml lists packages explicitly (cli/ installs as sd35m_mlx_cli): every subpackage must be there,
or a wheel install silently lacks it."""

import re
import subprocess
import sys
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


HELP_IMPORTS = """
import sys
from importlib.metadata import entry_points

(main,) = [ep.load() for ep in entry_points(group="console_scripts") if ep.name == "sd35m-mlx"]
for args in ([], ["generate"], ["convert"], ["serve"], ["train"], ["doctor"]):
    sys.argv = ["sd35m-mlx", *args, "--help"]
    try:
        main()
    except SystemExit as e:
        assert e.code == 0, (args, e.code)
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "sd35m_mlx"))))
"""


def test_help_imports_no_mlx():
    """`sd35m-mlx --help` (and each command's) stays fast: it must not import mlx, only the MLX-free parts of the
    library (defaults, record). Run in a fresh interpreter through the console script's entry point."""
    done = subprocess.run([sys.executable, "-c", HELP_IMPORTS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    imported = done.stdout.splitlines()[-1].split()
    assert [m for m in imported if m.split(".")[0] == "mlx"] == []
    assert "sd35m_mlx.defaults" in imported  # the check saw the library's modules at all


# The constants the MLX-free front ends share with the library, and literals that would betray a copy.
SHARED = ("DEFAULT_MODEL", "TAESD3_REPO", "SAMPLERS", "DTYPES", "MULTIPLE", "MAX_SEQUENCE_LENGTH", "MAX_SEED",
          "MAX_PROMPT_CHARS", "TRAINED_MP", "MAX_SIDE")  # fmt: skip
SHARED_LITERALS = ('"stabilityai/stable-diffusion-3.5-medium"', '"madebyollin/taesd3"', "2**64")


def test_shared_constants_are_defined_only_in_defaults():
    """One home for each (sd35m_mlx/defaults.py): a copy in the CLI, the server or a loader would drift."""
    assignment = re.compile(rf"^[ \t]*(?:\w+[ \t]*,[ \t]*)*({'|'.join(SHARED)})\b[^=\n(]*=(?!=)", re.M)
    home = ROOT / "sd35m_mlx" / "defaults.py"
    assert {m[1] for m in assignment.finditer(home.read_text())} == set(SHARED)  # the pattern finds them
    copies = []
    for p in [*(ROOT / "sd35m_mlx").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]:
        if p != home:
            text = p.read_text()
            copies += [f"{p.relative_to(ROOT)}: {m[1]}" for m in assignment.finditer(text)]
            copies += [f"{p.relative_to(ROOT)}: {lit}" for lit in SHARED_LITERALS if lit in text]
    assert copies == [], "import these from sd35m_mlx.defaults"


def test_python_dash_m_runs_the_command():
    for module in ("sd35m_mlx", "sd35m_mlx_cli"):
        run = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "Usage: " in run.stdout and "doctor" in run.stdout, (module, run.stderr)
