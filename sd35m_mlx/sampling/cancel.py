"""Stopping a running generate() from another thread, at the next step boundary."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .loop import GenerationCancelled, Step, StepExtra, StepResult


class Cancellation:
    """The pipeline's cancel handle. `cancel()` stops the run in progress (if any) before its next
    step and raises GenerationCancelled in the generating thread; with no run in progress it does
    nothing, and it never carries over to a later run. Safe to call from any thread, any number of times.
    """

    def __init__(self):
        self._guard = threading.Lock()
        self._event = threading.Event()
        self._running = False
        self.check = CancelCheck(self._event)  # the loop's extra: put it first, so a cancelled step reports nothing

    def cancel(self) -> bool:
        """Request the stop; True if a run was in progress to receive it."""
        with self._guard:
            if self._running:
                self._event.set()
            return self._running

    @contextmanager
    def run(self) -> Iterator[None]:
        """Scope of one run: requests made inside it stop it (`check` raises at the next step boundary)."""
        with self._guard:
            self._running = True
            self._event.clear()
        try:
            yield
        finally:
            with self._guard:
                self._running = False
                self._event.clear()


def cancellable(method):
    """Decorator for a pipeline's generate: the call is the run that `self._cancellation.cancel()` stops."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._cancellation.run():
            return method(self, *args, **kwargs)

    return wrapper


class CancelCheck(StepExtra):
    """Raises GenerationCancelled before a step (and after the last one) once cancel was requested."""

    def __init__(self, event: threading.Event):
        self.event = event

    def model_inputs(self, step: Step, x) -> dict:
        if self.event.is_set():
            raise GenerationCancelled(f"cancelled before step {step.count} of {step.total}")
        return {}

    def observe(self, result: StepResult) -> None:
        if self.event.is_set():
            s = result.step
            raise GenerationCancelled(f"cancelled after step {s.count} of {s.total}")
