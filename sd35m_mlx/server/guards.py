"""ASGI middleware in front of every route: the API key check (401) and the request body size limit (413)."""

from __future__ import annotations

import base64
import binascii
import hmac
import json

from starlette.exceptions import HTTPException

from .errors import error_body

OPEN_PATHS = frozenset({"/health", "/", "/favicon.ico"})  # the page is static: its API calls carry the key


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


def key_matches(authorization: str, key: str) -> bool:
    """`Bearer KEY`, or HTTP Basic with KEY as the password (what A1111 clients send for --api-auth)."""
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, ValueError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode("utf-8"), key.encode("utf-8"))


class ApiKey:
    """401 for every path but OPEN_PATHS unless the request carries the key."""

    def __init__(self, app, key: str | None):
        self.app = app
        self.key = key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.key or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if key_matches(headers.get(b"authorization", b"").decode("latin-1"), self.key):
            return await self.app(scope, receive, send)
        message = "a valid API key is required: send the header Authorization: Bearer KEY"
        body = error_body(scope["path"], 401, message)
        await _send_json(send, 401, body, {"WWW-Authenticate": 'Bearer realm="sd35m-mlx"'})


class BodyTooLarge(HTTPException):
    """Raised while a body is being read; an HTTPException so FastAPI's body parsing passes it through."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body too large (at most {limit} bytes)")


class BodyLimit:
    """413 for a declared Content-Length over `limit`, or as soon as a streamed body passes it."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            message = f"request body too large: {int(declared)} bytes (at most {self.limit})"
            return await _send_json(send, 413, error_body(scope["path"], 413, message))
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)
