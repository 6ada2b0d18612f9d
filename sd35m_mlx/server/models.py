"""The models a server may switch between (`serve --model A --model B`): one resident at a time.

Each is known by a public title (never a local path: `serve` names a folder or file by its last part) and
a loader chosen at start; a request can only name a title, so it can never load anything not listed then.
Switching runs in the job worker's thread (jobs.py), so it never overlaps a generation: the resident
pipeline is dropped and its memory released (gc, `mx.clear_cache()`) before the next one loads, so two
models are never held at once.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

from .errors import RequestError

Loader = Callable[[], object]  # () -> a loaded StableDiffusion35


@dataclass(frozen=True)
class Checkpoint:
    title: str
    filename: str  # what sd-models shows as the file: the title's last part, no directories
    load: Loader | None  # None: the model the server started with, not reloadable (create_app without loaders)


def checkpoints(first: str, loaders: dict[str, Loader] | None) -> dict[str, Checkpoint]:
    """title -> Checkpoint; the resident model (`first`) is always one of them."""
    loaders = dict(loaders or {})
    titles = [first, *(t for t in loaders if t != first)]
    return {t: Checkpoint(t, t.replace("\\", "/").rsplit("/", 1)[-1], loaders.get(t)) for t in titles}


def choose(served: dict[str, Checkpoint], title, param: str = "sd_model_checkpoint") -> Checkpoint:
    """The checkpoint a client named, or a 400 naming the choices (a path or unknown name is just unknown)."""
    found = served.get(title) if isinstance(title, str) else None
    if found is None:
        choices = ", ".join(served)
        raise RequestError(f"{param} {str(title)[:100]!r} is not served here; the choices: {choices}", param)
    return found


def release() -> None:
    """Return the memory of pipelines nobody references any more."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
