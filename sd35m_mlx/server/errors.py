"""Errors a request can cause, and the JSON shape each API dialect reports them in."""

from __future__ import annotations


class RequestError(Exception):
    """A client mistake: answered with `status` (4xx) and `message`, naming `param` where there is one."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.headers = headers or {}


class QueueFull(RequestError):
    def __init__(self, retry_after: int):
        super().__init__(
            "the server is busy: its queue is full; retry later",
            status=503,
            headers={"Retry-After": str(retry_after)},
        )


class ShuttingDown(RequestError):
    def __init__(self):
        super().__init__("the server is shutting down", status=503)


def dialect(path: str) -> str:
    """Which API a path belongs to: 'openai' (/v1/...), 'a1111' (/sdapi/...) or 'plain'."""
    if path.startswith("/v1/"):
        return "openai"
    if path.startswith("/sdapi/"):
        return "a1111"
    return "plain"


_OPENAI_TYPES = {401: "invalid_request_error", 413: "invalid_request_error", 503: "server_error"}
_OPENAI_CODES = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large", 503: "server_busy"}


def error_body(path: str, status: int, message: str, param: str | None = None, kind: str | None = None) -> dict:
    """The error JSON for `path`'s dialect: OpenAI's `{"error": {...}}`, A1111's `{"error", "detail", ...}`."""
    d = dialect(path)
    if d == "openai":
        if status >= 500:
            err_type = _OPENAI_TYPES.get(status, "server_error")
        else:
            err_type = _OPENAI_TYPES.get(status, "invalid_request_error")
        return {"error": {"message": message, "type": err_type, "param": param, "code": _OPENAI_CODES.get(status)}}
    if d == "a1111":  # modules/api/api.py's handler: {"error": type name, "detail", "body", "errors"}
        return {"error": kind or ("HTTPException" if status < 500 else "RuntimeError"), "detail": message,
                "body": "", "errors": message}  # fmt: skip
    return {"detail": message}
