"""One model, one job at a time: a worker thread draining a bounded FIFO queue of generation jobs.

Handlers `submit` a job and await `job.wait()`; the worker runs its images one `generate` call per
seed (so each seed reproduces its image exactly) and reports progress and previews on the job.
Cancelling (client gone, A1111 interrupt, shutdown) stops a running job at the next step boundary
through generate's step callback, and removes a queued one from the queue.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

from PIL import Image

from .errors import QueueFull, RequestError, ShuttingDown
from .hires import make_images
from .loras import activate as activate_loras
from .models import Checkpoint, release
from .spec import ModelInfo, Spec, finish, generate_kwargs, png_bytes

log = logging.getLogger("sd35m_mlx.server")

QUEUED, RUNNING, DONE, CANCELLED, FAILED = "queued", "running", "done", "cancelled", "failed"
PARAMS = {"mask_image": "mask", "image": "image"}  # generate()'s argument a message starts with -> the request's


@dataclass(frozen=True)
class Result:
    png: bytes
    seed: int
    partial: bool = False  # an interrupted image as it stood (A1111 answers it; OpenAI's API does not)


class Job:
    _ids = itertools.count(1)

    def __init__(self, spec: Spec, loop: asyncio.AbstractEventLoop | None):
        self.id = next(Job._ids)
        self.spec = spec
        self.state = QUEUED
        self.results: list[Result] = []
        self.error: BaseException | None = None
        self.cancel_reason: str | None = None
        self.created = time.time()
        self.started: float | None = None
        self.image_index = 0  # which of the spec's images is being made
        self.step = 0
        self.total = spec.settings.steps
        self.preview: Image.Image | None = None
        self.preview_step = 0
        self.latents = None  # the running image's latest latents: what an interrupt decodes
        self.model: ModelInfo | None = None  # the model the job ran on (set by the worker)
        self._loop = loop
        self._future = loop.create_future() if loop is not None else None
        self._finished = threading.Event()

    # -- called from the worker thread --------------------------------------------------------------
    def on_step(self, step: int, total: int, latents=None) -> bool:
        self.step, self.total, self.latents = step, total, latents
        return self.cancel_reason is None  # False: generate raises GenerationCancelled

    def on_preview(self, step: int, total: int, image: Image.Image) -> None:
        self.preview, self.preview_step = image, step

    def finish(self, state: str, error: BaseException | None = None) -> None:
        if self._finished.is_set():
            return
        self.state, self.error = state, error
        self._finished.set()
        if self._loop is not None and self._future is not None:
            try:
                self._loop.call_soon_threadsafe(_resolve, self._future)
            except RuntimeError:  # the event loop is closed: nobody is waiting
                pass

    # -- called from anywhere -----------------------------------------------------------------------
    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def progress(self) -> float:
        """0..1 over all of the job's images."""
        if self.state == DONE:
            return 1.0
        n = max(len(self.spec.seeds), 1)
        return min((self.image_index + self.step / max(self.total, 1)) / n, 1.0)

    def eta(self) -> float:
        p = self.progress
        if self.started is None or p <= 0:
            return 0.0
        elapsed = time.time() - self.started
        return elapsed / p * (1 - p)

    def preview_png(self) -> bytes | None:
        image = self.preview
        if image is None:
            return None
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    async def wait(self, disconnected: Callable[[], object] | None = None, poll: float = 0.25) -> None:
        """Until the job ends; cancels it if `disconnected()` (awaitable) turns true meanwhile."""
        assert self._future is not None
        while not self._future.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._future), timeout=poll)
            except asyncio.TimeoutError:
                if disconnected is not None and await disconnected():
                    self.cancel("client disconnected")
                    return

    def wait_blocking(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Worker:
    """Owns the pipeline: one thread, one job at a time, a FIFO of at most `max_queue` waiting jobs."""

    def __init__(self, pipe, model: ModelInfo, version: str, max_queue: int = 8,
                 served: dict[str, Checkpoint] | None = None, describe: Callable | None = None,
                 lora_cache_bytes: int | None = None):  # fmt: skip
        self.pipe = pipe
        self.lora_cache_bytes = lora_cache_bytes  # server/loras.py activate
        self.model = model
        self.served = served or {}  # title -> Checkpoint: the models a job may switch to (server/models.py)
        self.describe = describe  # (pipe, title) -> ModelInfo of a newly loaded model
        self.version = version
        self.max_queue = max_queue
        self.current: Job | None = None
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._durations: deque[float] = deque(maxlen=8)
        self._thread = threading.Thread(target=self._run, name="sd35m-mlx-worker", daemon=True)
        self._thread.start()

    def submit(self, spec: Spec, loop: asyncio.AbstractEventLoop | None = None) -> Job:
        job = Job(spec, loop)
        with self._cond:
            if self._closed:
                raise ShuttingDown()
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self._queue.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """Cancel a job: a queued one leaves the queue at once, a running one stops at its next step."""
        job.cancel(reason)
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                job.finish(CANCELLED)

    def interrupt(self) -> bool:
        """A1111's interrupt: cancel the running job (queued ones go on). True if one was running."""
        job = self.current
        if job is None:
            return False
        job.cancel("interrupted")
        return True

    @property
    def running(self) -> Job | None:
        """The job being made, None once it has finished: its answer may already be with the client while this
        thread still tidies up (switching models back), and a client polling /progress then must see none."""
        job = self.current
        return None if job is None or job.done else job

    @property
    def queued(self) -> int:
        return len(self._queue)

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the mean job time so far (at least 1)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return max(1, round(mean))

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, cancel the running job and the queued ones, and wait for the thread."""
        self.stop_accepting()
        self._thread.join(timeout)

    def stop_accepting(self) -> None:
        """close() without waiting: safe from a signal handler."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            job.cancel("server shutting down")
            job.finish(CANCELLED)
        if (job := self.current) is not None:
            job.cancel("server shutting down")

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the worker thread --------------------------------------------------------------------------
    def _next(self) -> Job | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job = self._queue.popleft()
            self.current = job
            return job

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._execute(job)
            finally:
                self.current = None

    def _keep_partial(self, job: Job) -> None:
        """An interrupted image as it stood (A1111 decodes the current latents): only for the interrupt,
        not for a client that left or a shutdown, where nobody reads it."""
        latents, job.latents = job.latents, None
        if job.cancel_reason != "interrupted" or latents is None or not hasattr(self.pipe, "decode"):
            return
        try:
            image = self.pipe.decode(latents)[0]
        except Exception:  # the interrupt still answers what was finished
            log.exception("decoding the interrupted image failed")
            return
        seed = job.spec.seeds[job.image_index]
        job.results.append(Result(png_bytes(image, job.spec, seed, self.model, self.version), seed, partial=True))

    def _execute(self, job: Job) -> None:
        from sd35m_mlx.sampling.loop import GenerationCancelled

        job.state, job.started = RUNNING, time.time()
        before = self.model.name
        try:
            self.use(job.spec.checkpoint)
            job.model = self.model
            activate_loras(self.pipe, job.spec, self.lora_cache_bytes)  # this job's LoRAs only (server/loras.py)
            control = job.spec.control
            with control.active(self.pipe) if control is not None else nullcontext():  # its ControlNets only
                for i, seed in enumerate(job.spec.seeds):
                    job.image_index, job.step = i, 0
                    if job.cancel_reason is not None:
                        raise GenerationCancelled(job.cancel_reason)
                    kwargs = generate_kwargs(job.spec, seed, self.model)
                    # rgb previews: a 16->3 map at latent resolution, far under 1% of a step (sampling/preview.py)
                    images = make_images(self.pipe, job.spec, kwargs, callback=job.on_step, preview="rgb",
                                         on_preview=job.on_preview)  # fmt: skip
                    job.latents = None
                    png = png_bytes(finish(job.spec, images)[0], job.spec, seed, self.model, self.version)
                    job.results.append(Result(png, seed))
            self._durations.append(time.time() - job.started)
            job.finish(DONE)
        except GenerationCancelled:
            self._keep_partial(job)
            job.finish(CANCELLED)
        except RequestError as e:  # found in the job: a LoRA file that does not fit the model (server/loras.py)
            job.finish(FAILED, e)
        except (ValueError, TypeError) as e:  # generate's own argument checks: a request the spec let through
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            job.finish(FAILED, RequestError(message, PARAMS.get(message.split()[0])))
        except Exception as e:  # our fault: logged with its traceback, answered 500, the worker goes on
            log.exception("generation failed")
            job.finish(FAILED, e)
        finally:  # after the answer: the next job waits for it, the client does not
            if job.spec.checkpoint is not None and job.spec.restore and self.pipe is not None:
                try:
                    self.use(before)
                except Exception:
                    log.exception("switching back to %s failed", before)

    def use(self, title: str | None) -> None:
        """Make `title` the resident model (worker thread only): the old one is released before the new one
        loads, so two are never held at once. A load that fails brings the previous model back."""
        if title is None or title == self.model.name:
            return
        wanted, previous = self.served[title], self.served.get(self.model.name)
        if wanted.load is None or self.describe is None:
            raise RequestError(f"sd_model_checkpoint {title!r} cannot be loaded again", "sd_model_checkpoint")
        self.pipe = None
        release()
        try:
            pipe = wanted.load()
        except Exception:
            log.exception("loading %s failed", title)
            if previous is not None and previous.load is not None:
                self.pipe = previous.load()
            raise
        self.pipe, self.model = pipe, self.describe(pipe, title)
        log.info("switched to %s", title)
