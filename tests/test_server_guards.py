"""What a web page on another site, or a slow client, can make the server do: Host and Origin checks (403),
CORS only for the origins allowed, and the read timeout for headers and bodies."""

import socket
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from sd35m_mlx import StableDiffusion35  # noqa: E402
from sd35m_mlx.server.jobs import Job  # noqa: E402
from tests.server_helpers import RunningServer  # noqa: E402

ONE_STEP = {"prompt": "p", "size": "64x64", "steps": 1}


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    return StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32")


@pytest.fixture(scope="module")
def server(pipe):
    s = RunningServer(pipe, allowed_hosts=("studio.lan",), read_timeout=1.0)
    yield s
    s.stop()


def test_a_foreign_host_header_is_refused(server):
    """DNS rebinding: a page at evil.example whose name resolves to 127.0.0.1 sends Host: evil.example."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.get("/v1/models", headers={"Host": f"evil.example:{server.port}"})
        assert r.status_code == 403 and "--allowed-host evil.example" in r.text
        for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "studio.lan", f"[::1]:{server.port}",
                     f"192.168.1.10:{server.port}", f"{socket.gethostname()}:{server.port}"):  # fmt: skip
            assert http.get("/v1/models", headers={"Host": host}).status_code == 200, host


def test_a_cross_site_post_is_refused_and_runs_nothing(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        before = next(Job._ids)  # job ids count the jobs made
        evil = {"Origin": "http://evil.example"}
        r = http.post("/v1/images/generations", json=ONE_STEP, headers=evil)
        assert r.status_code == 403 and "--cors-origin http://evil.example" in r.json()["error"]["message"]
        files = {"image": ("a.png", b"not read", "image/png")}
        assert http.post("/v1/images/edits", data={"prompt": "p"}, files=files, headers=evil).status_code == 403
        assert http.post("/sdapi/v1/txt2img", json={"prompt": "p"}, headers={"Origin": "null"}).status_code == 403
        assert next(Job._ids) == before + 1, "a refused request made a job"
        own = {"Origin": server.url}  # what the page's own fetch sends
        assert http.post("/v1/images/generations", json=ONE_STEP, headers=own).status_code == 200
        assert "access-control-allow-origin" not in r.headers


def test_cors_origin_allows_that_page_only(pipe):
    s = RunningServer(pipe, cors_origins=("http://app.example",), api_key="k")
    try:
        with httpx.Client(base_url=s.url, timeout=60) as http:
            preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                         "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
            r = http.options("/v1/images/generations", headers=preflight)  # a preflight carries no key
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
            r = http.get("/v1/models", headers={"Origin": "http://app.example", "Authorization": "Bearer k"})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
            r = http.get("/v1/models", headers={"Origin": "http://evil.example", "Authorization": "Bearer k"})
            assert r.status_code == 403
    finally:
        s.stop()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except (TimeoutError, ConnectionResetError):
        return False


@pytest.mark.parametrize(
    "partial",
    [b"GET /health HTTP/1.1\r\nHost: 127.0", b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
     b"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n{\"pro"],
    ids=["headers", "body"],
)  # fmt: skip
def test_a_request_that_never_arrives_in_full_is_dropped(server, partial):
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(partial)
        assert _closed_within(sock, 10), "the server kept a half-sent request open"
    assert time.monotonic() - t0 < 8  # read_timeout 1 s, with room for a loaded machine
    with httpx.Client(base_url=server.url, timeout=60) as http:  # and it goes on serving
        assert http.get("/health").status_code == 200


def test_a_slow_but_complete_request_is_served(server):
    """The timeout covers arrival, not the answer: a keep-alive connection serves a second request."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post("/v1/images/generations", json=ONE_STEP).status_code == 200
        time.sleep(0.3)
        assert http.get("/health").status_code == 200


def test_signed_image_urls_open_without_the_key_until_they_expire(pipe):
    from urllib.parse import urlsplit

    s = RunningServer(pipe, api_key="k", signed_urls=True)
    try:
        with httpx.Client(base_url=s.url, timeout=60) as http:
            key = {"Authorization": "Bearer k"}
            r = http.post("/v1/images/generations", json={**ONE_STEP, "response_format": "url"}, headers=key)
            url = urlsplit(r.json()["data"][0]["url"])
            assert "exp=" in url.query and "sig=" in url.query
            r = http.get(f"{url.path}?{url.query}")  # no Authorization: what an <img src> sends
            assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
            assert http.get(url.path).status_code == 401  # unsigned and no key: as before
            tampered = url.query[:-1] + ("0" if url.query[-1] != "0" else "1")
            assert http.get(f"{url.path}?{tampered}").status_code == 403
            exp = int(url.query.split("exp=")[1].split("&")[0])
            later = url.query.replace(f"exp={exp}", f"exp={exp + 10}")  # a longer life is a forgery
            assert http.get(f"{url.path}?{later}").status_code == 403
            other = url.path.replace(url.path[-36:-4], "0" * 32)  # the signature is for its own path only
            assert http.get(f"{other}?{url.query}").status_code == 403
        signer = s.app.state.server.signer
        old = signer.query(url.path, lifetime_s=-1)  # already expired
        assert not signer.valid(url.path, old) and signer.valid(url.path, signer.query(url.path, 60))
    finally:
        s.stop()


@pytest.mark.parametrize("exp", ["\u00b2", "\u0661\u0662", "0" * 5000, "9" * 30, "-1", ""])
def test_a_hostile_expiry_is_an_invalid_signature_not_a_500(exp):
    from sd35m_mlx.server.guards import UrlSigner

    signer = UrlSigner("k")
    good = signer.query("/x.png", 60)
    assert signer.valid("/x.png", good)
    assert not signer.valid("/x.png", good.replace(good.split("&")[0], f"exp={exp}"))


def test_signed_urls_are_opt_in(pipe):
    s = RunningServer(pipe, api_key="k")
    try:
        with httpx.Client(base_url=s.url, timeout=60) as http:
            r = http.post("/v1/images/generations", json={**ONE_STEP, "response_format": "url"},
                          headers={"Authorization": "Bearer k"})  # fmt: skip
            assert "sig=" not in r.json()["data"][0]["url"] and s.app.state.server.signer is None
    finally:
        s.stop()


def test_serve_refuses_signed_urls_without_a_key():
    from click.testing import CliRunner

    from sd35m_mlx_cli.main import cli

    args = ["serve", "--signed-urls", "--model", "tiny-random"]
    result = CliRunner().invoke(cli, args, env={"SD35M_MLX_API_KEY": ""})
    assert result.exit_code == 2 and "--signed-urls needs --api-key" in result.output
