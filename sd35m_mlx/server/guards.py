"""ASGI middleware in front of every route: Host and Origin checks (403), the API key check (401, or a signed
image URL: 403 when expired or tampered) and the request body size limit (413)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from urllib.parse import parse_qs

from starlette.exceptions import HTTPException

from .errors import error_body

# the page and its files are static: its API calls carry the key
OPEN_PATHS = frozenset({"/health", "/", "/studio.css", "/studio.js", "/favicon.ico"})
SIGNED_PREFIXES = ("/v1/images/files/", "/studio/history/")  # what a signed URL may open (GET) without the key


class UrlSigner:
    """Image URLs that open without the key until they expire (`?exp=UNIX&sig=HEX`), so a chat UI's <img src>
    shows them: HMAC-SHA256 over the path and expiry with a secret derived from the API key (a URL reveals
    neither the key nor a way to sign other paths or times)."""

    def __init__(self, key: str):
        self._secret = hmac.new(key.encode("utf-8"), b"sd35m-mlx signed image urls", hashlib.sha256).digest()

    def _sig(self, path: str, exp: int) -> str:
        return hmac.new(self._secret, f"{path}\n{exp}".encode(), hashlib.sha256).hexdigest()

    def query(self, path: str, lifetime_s: float, now: float | None = None) -> str:
        exp = int((time.time() if now is None else now) + lifetime_s)
        return f"exp={exp}&sig={self._sig(path, exp)}"

    def valid(self, path: str, query: str, now: float | None = None) -> bool:
        q = parse_qs(query)
        exp, sig = q.get("exp", [""])[0], q.get("sig", [""])[0]
        if not (exp.isascii() and exp.isdigit() and len(exp) <= 20) or not sig:  # int() refuses "²" and 5,000 digits
            return False
        fresh = int(exp) >= (time.time() if now is None else now)
        return hmac.compare_digest(sig.encode("ascii", "replace"), self._sig(path, int(exp)).encode()) and fresh


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
    """401 for every path but OPEN_PATHS unless the request carries the key; with `signer`, an image URL
    carrying a signature (exp, sig) opens (GET, HEAD) without it, and a bad or expired one gets 403."""

    def __init__(self, app, key: str | None, signer: UrlSigner | None = None):
        self.app = app
        self.key = key
        self.signer = signer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.key or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if key_matches(headers.get(b"authorization", b"").decode("latin-1"), self.key):
            return await self.app(scope, receive, send)
        query = scope.get("query_string", b"").decode("latin-1")
        signable = scope["path"].startswith(SIGNED_PREFIXES) and scope["method"] in ("GET", "HEAD")
        if self.signer is not None and signable and "sig=" in query:
            if self.signer.valid(scope["path"], query):
                return await self.app(scope, receive, send)
            body = error_body(scope["path"], 403, "this image URL has expired or is not valid")
            return await _send_json(send, 403, body)
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


LOCAL_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def _host_name(host_header: str) -> str:
    """`name:port`, `[v6]:port` or `name` -> the name, lower-case, without the brackets."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def machine_names() -> set[str]:
    """This machine's own names (`hostname`, `hostname.local`, its FQDN), as a browser on the LAN types them."""
    names = {socket.gethostname().lower()}
    names |= {n.split(".")[0] + ".local" for n in list(names)}
    try:
        names.add(socket.getfqdn().lower())
    except OSError:
        pass
    return names


class HostOrigin:
    """Refuse what a web page on another site could make a browser send (403, one line):

    - a Host header naming no address of this server (DNS rebinding: evil.example resolved to 127.0.0.1
      makes our answers readable to that page). IP literals, loopback names, this machine's names and
      `allowed_hosts` pass; an IP literal cannot be a rebinding, whose page's origin is a domain name.
    - an Origin header other than the server's own (a cross-site form or fetch POST runs a generation
      even when the page cannot read the answer), unless listed in `cors_origins`.

    Requests without Origin (curl, SDKs, apps) are not affected. ComfyUI and Jupyter check both for the
    same reasons."""

    def __init__(self, app, allowed_hosts=(), cors_origins=()):
        self.app = app
        self.hosts = LOCAL_NAMES | machine_names() | {h.lower() for h in allowed_hosts}
        self.origins = {o.rstrip("/").lower() for o in cors_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        name = _host_name(host)
        if host and not (_is_ip(name) or name in self.hosts):
            message = f"Host {name} is not a name of this server; to serve under it, start with --allowed-host {name}"
            return await _send_json(send, 403, error_body(scope["path"], 403, message))
        origin = headers.get(b"origin")
        if origin is not None:
            origin = origin.decode("latin-1").rstrip("/").lower()
            own = {f"{scheme}://{host.lower()}" for scheme in ("http", "https")}
            if origin not in own and origin not in self.origins:
                message = f"requests from the web page at {origin} are refused; allow it with --cors-origin {origin}"
                return await _send_json(send, 403, error_body(scope["path"], 403, message))
        await self.app(scope, receive, send)
