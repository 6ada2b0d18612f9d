"""A real uvicorn server on a free 127.0.0.1 port, in a thread, for the server tests (the module-wide `server`
and `http` fixtures in tests/conftest.py use it), and what those tests read and send."""

from __future__ import annotations

import base64
import io
import threading
import time
from contextlib import contextmanager

import numpy as np
from PIL import Image


class RunningServer:
    """Started on creation; stopped by `stop()` or at the end of a `with` block."""

    def __init__(self, pipe, **options):
        import uvicorn

        from sd35m_mlx.server import create_app

        self.app = create_app(pipe, **options)
        from sd35m_mlx.server.run import bind, uvicorn_config

        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(self.app, "127.0.0.1", self.port, read_timeout=options.get("read_timeout", 30.0))
        config.timeout_graceful_shutdown = 10
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    @property
    def worker(self):
        return self.app.state.server.worker

    @contextmanager
    def client(self):
        """An httpx client on the server; on exit, waits for the server to be idle again (no job running
        or queued), so each test leaves it ready for the next."""
        import httpx

        with httpx.Client(base_url=self.url, timeout=60) as client:
            yield client
        self.wait_idle()

    def wait_idle(self) -> None:
        """Until no job runs or waits, so that a test leaves the server ready for the next."""
        wait_until(lambda: self.worker.current is None and self.worker.queued == 0, 30, what="idle server")

    def stop(self) -> None:
        self.worker.stop_accepting()  # as `serve` does on Ctrl-C: cancel the running job, then exit
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "server did not stop"

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(condition, timeout: float = 60.0, every: float = 0.05, what: str = "condition"):
    """Poll `condition()` until truthy (returned), failing after `timeout` seconds: no unbounded loops."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def pixels(image_or_b64) -> np.ndarray:
    if isinstance(image_or_b64, str):
        image_or_b64 = Image.open(io.BytesIO(base64.b64decode(image_or_b64)))
    return np.asarray(image_or_b64.convert("RGB"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
