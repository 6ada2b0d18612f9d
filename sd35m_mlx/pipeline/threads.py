"""Calling the pipeline from any thread: a stream of the calling thread's own, one lock per pipeline.

Since mlx 0.31.2 streams belong to the thread that made them (mlx PRs #3281 "each thread has its
own default stream", #3348 thread-local Metal/CUDA command encoders, #3537 the same on the CPU in
0.32.0; `help(mx.new_stream)`: "can only be used on the thread where it was created"). A worker
thread gets a default stream of its own, but any *lazy* array built on another thread still names
that thread's stream and fails to evaluate with "There is no Stream(gpu, N) in current thread":
mflux #502 (generate from a ThreadPoolExecutor), mlx-lm #1181 / #1256, mlx #3727. Reproduced here on
the CPU backend with mlx 0.32.4: `encode_prompt` on the main thread, `generate(prompt_embeds=...)`
on a worker. So (1) whatever outlives a call is evaluated before the call returns (weights in
`from_pretrained`, `encode_prompt`'s result, generate's output); (2) a call off the main thread runs
under a stream made on, and cached for, that thread (as proposed in mflux #503 and mlx-lm #1275),
so the call never depends on a stream the caller set. Before 0.31.2 streams were global and
`mx.stream` set a process-wide default (mlx #2133: not safe from several threads), so there nothing
is entered. (3) One model, one device: a pipeline runs one call at a time (`serialized`).
(4) A worker's streams are destroyed as the worker ends (`_ThreadStreams`), not at process exit.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import mlx.core as mx

# mlx >= 0.31.2, where streams are per thread (the same release added thread-local streams)
PER_THREAD_STREAMS = hasattr(mx, "new_thread_local_stream")

_local = threading.local()
F = TypeVar("F", bound=Callable)


class _ThreadStreams(dict):
    """A thread's streams by device. Dropped by the thread itself as it ends (thread-local data), it
    then destroys MLX's streams of that thread (`mx.clear_streams`, as MLX's own thread tests do):
    left to C++ thread-local destructors, they raced interpreter exit ("terminate called without an
    active exception" in some runs that generated on a worker; none so)."""

    def __del__(self):
        if hasattr(mx, "clear_streams"):  # mlx >= 0.31.2
            mx.clear_streams()


def thread_stream() -> mx.Stream:
    """This thread's stream on the default device, made on first use and kept for the thread's life."""
    streams = getattr(_local, "streams", None)
    if streams is None:  # the main thread's end is MLX's own exit
        main = threading.current_thread() is threading.main_thread()
        streams = _local.streams = {} if main else _ThreadStreams()
    device = mx.default_device()
    key = str(device)
    if key not in streams:
        streams[key] = mx.new_stream(device)
    return streams[key]


@contextmanager
def own_stream() -> Iterator[None]:
    """Run the block on this thread's own stream when off the main thread (mlx >= 0.31.2)."""
    if not PER_THREAD_STREAMS or threading.current_thread() is threading.main_thread():
        yield  # the main thread's default stream is MLX's own: unchanged behaviour and speed
        return
    with mx.stream(thread_stream()):
        yield


def any_thread(fn: F) -> F:
    """Decorator: `fn` runs under `own_stream()` (for functions with no pipeline lock, e.g. loading)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with own_stream():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def serialized(method: F) -> F:
    """Decorator for pipeline methods: one call at a time per pipeline (its `_lock`, re-entrant so
    generate may call encode_prompt), on the calling thread's own stream."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock, own_stream():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
