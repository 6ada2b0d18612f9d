"""`sd35m-mlx serve`: one resident model behind OpenAI's Images API, AUTOMATIC1111's /sdapi/v1 and a web page.

Needs the optional extra: `pip install "sd35m-mlx[server]"` (FastAPI, uvicorn, python-multipart).
`create_app(pipe, ...)` builds the ASGI app around a loaded `StableDiffusion35`; `serve(...)` runs it.
"""

from __future__ import annotations

INSTALL_HINT = 'the server needs its optional dependencies: pip install "sd35m-mlx[server]"'


def require_extra() -> None:
    """Raise ImportError with the install command when FastAPI, uvicorn or python-multipart is missing."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{INSTALL_HINT} (missing: {', '.join(missing)})")


def create_app(pipe, config=None, **options):
    """The ASGI app; see `sd35m_mlx.server.app.create_app`."""
    require_extra()
    from .app import create_app as _create_app

    return _create_app(pipe, config, **options)


__all__ = ["INSTALL_HINT", "create_app", "require_extra"]
