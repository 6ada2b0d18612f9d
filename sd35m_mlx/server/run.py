"""Running the app with uvicorn: bind, say where, and on Ctrl-C / SIGTERM stop accepting, cancel the
running job and exit 0 (uvicorn alone would wait for the job to finish and re-raise the signal)."""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Callable

from . import require_extra

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a server others can reach with no key, or None."""
    if api_key or is_loopback(host):
        return None
    return (
        f"serving on {host} with no API key: anyone who can reach this machine can use it. "
        "Set --api-key (or SD35M_MLX_API_KEY), or bind 127.0.0.1."
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Made with proto=IPPROTO_TCP so asyncio sets TCP_NODELAY on each connection
    (uvicorn's own bind_socket leaves proto 0: then every keep-alive response waited ~40 ms for a
    delayed ACK, measured in benchmarks/bench_server.py)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    return sock


def read_timeout_protocol(read_timeout: float):
    """uvicorn's h11 protocol, closing a connection whose request (headers and body) has not fully arrived
    `read_timeout` seconds after the connection opened or its previous response ended. uvicorn has no such
    timeout: 300 sockets announcing a 50 MB body and sending a few bytes stayed open indefinitely."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ReadTimeoutH11Protocol(H11Protocol):
        _read_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._read_timer = self.loop.call_later(read_timeout, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if self.cycle is None or self.cycle.more_body:  # still reading headers or the body
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.more_body:  # the whole request is in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return ReadTimeoutH11Protocol


def uvicorn_config(app, host: str, port: int, *, verbose: bool = False, read_timeout: float = 30.0):
    """The uvicorn settings every server of ours runs with (tests included)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=read_timeout_protocol(read_timeout),
        log_level="info" if verbose else "warning",
        access_log=verbose,
        timeout_graceful_shutdown=30,
        lifespan="on",
    )


def serve(
    pipe,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    config=None,
    verbose: bool = False,
    say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
    sock: socket.socket | None = None,
) -> None:
    """Serve `pipe` until Ctrl-C or SIGTERM. `config`: a ServerConfig. `sock`: already bound by `bind` (the CLI
    binds before loading the model, so a taken port fails in a second, not after minutes of loading)."""
    require_extra()
    import uvicorn

    from .app import ServerConfig, create_app

    config = config or ServerConfig()
    sock = sock or bind(host, port)  # first: a taken port fails before anything starts
    app = create_app(pipe, config)
    worker = app.state.server.worker

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:  # a second signal: stop now
                self.force_exit = True
                return
            worker.stop_accepting()  # cancels the running job at its next step; its client gets a 503
            self.should_exit = True  # no re-raise of the signal afterwards: a requested stop exits 0

    uv_config = uvicorn_config(app, host, port, verbose=verbose, read_timeout=config.read_timeout)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    if warning := open_warning(host, config.api_key):
        say(f"Warning: {warning}")
    say(f"Serving {config.model_name} on http://{shown}:{bound_port}/ (OpenAI API under /v1, A1111 under /sdapi/v1)")
    say("Ctrl-C stops.")
    Server(uv_config).run(sockets=[sock])
    say("Stopped.")
