"""Does `sd35m-mlx serve` hold its memory flat under mixed traffic? A soak on the tiny random model.

    python benchmarks/bench_soak.py --requests 500              # 64 px, 1 step; minutes on 2 CPU cores
    python benchmarks/bench_soak.py --minutes 30 --json soak.json

The server runs in this process (uvicorn on a thread, as tests/server_helpers.py runs it) so MLX's active
memory can be read next to the resident set. Requests cycle through A1111 txt2img, OpenAI generations,
OpenAI edits (img2img), a long job whose client gives up (cancel by disconnect) and bad input (4xx). LoRA
switches are not in the mix: the tiny model has no LoRA files to switch. Pass: no 5xx, and both memory
figures grow at most 5% from the end of the warm-up to the last sample. Figures: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sd35m_mlx  # noqa: E402,F401  (OpenBLAS before mlx.core)

# isort: split
from benchmarks.measure import log, machine, proc_status_bytes, write_json  # noqa: E402

MAX_GROWTH = 0.05


def start_server(pipe, long_steps: int):
    import uvicorn

    from sd35m_mlx.server import create_app
    from sd35m_mlx.server.run import bind, uvicorn_config
    from sd35m_mlx.server.spec import Limits

    app = create_app(pipe, model_name="tiny-random", limits=Limits(max_steps=long_steps))
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", sock.getsockname()[1]))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def requests(size: int, steps: int, long_steps: int):
    """(kind, send(http) -> status) in the order the soak cycles through them."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (120, 80, 40)).save(buf, format="PNG")
    png = buf.getvalue()
    a1111 = {"prompt": "a red cube", "width": size, "height": size, "steps": steps, "seed": -1}
    openai = {"prompt": "a red cube", "size": f"{size}x{size}", "steps": steps}

    def disconnect(http):
        try:  # the client gives up long before the job ends; the server must cancel it
            http.post("/sdapi/v1/txt2img", json={**a1111, "steps": long_steps}, timeout=0.5)
        except Exception:  # noqa: BLE001 (httpx.ReadTimeout: what this request is for)
            return 499
        return 200

    return [
        ("txt2img", lambda http: http.post("/sdapi/v1/txt2img", json=a1111).status_code),
        ("generations", lambda http: http.post("/v1/images/generations", json=openai).status_code),
        ("edits", lambda http: http.post("/v1/images/edits", data={"prompt": "blue", "size": f"{size}x{size}",
                                         "steps": str(steps)}, files={"image": ("a.png", png)}).status_code),
        ("disconnect", disconnect),
        ("bad input", lambda http: http.post("/v1/images/generations", json={**openai, "size": "17x9"}).status_code),
        ("txt2img b64 image", lambda http: len(base64.b64decode(http.post("/sdapi/v1/txt2img", json=a1111)
                                                                .json()["images"][0])) and 200),
    ]  # fmt: skip


def idle(http, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = http.get("/health").json()
        if not health["busy"] and not health["queued"]:
            return
        time.sleep(0.05)


def sample(n: int, started: float) -> dict:
    import mlx.core as mx

    return {"requests": n, "s": round(time.perf_counter() - started, 1), "rss_bytes": proc_status_bytes("VmRSS"),
            "mlx_active_bytes": mx.get_active_memory(), "mlx_cache_bytes": mx.get_cache_memory()}  # fmt: skip


def soak(args) -> dict:
    import httpx

    from sd35m_mlx import StableDiffusion35

    pipe = StableDiffusion35.from_pretrained("tiny-random", dtype="float32")
    server, url = start_server(pipe, args.long_steps)
    kinds = requests(args.size, args.steps, args.long_steps)
    statuses: dict = {kind: {} for kind, _ in kinds}
    samples, started, n = [], time.perf_counter(), 0
    deadline = started + args.minutes * 60 if args.minutes else None
    with httpx.Client(base_url=url, timeout=120) as http:
        while (n < args.requests) if deadline is None else (time.perf_counter() < deadline):
            kind, send = kinds[n % len(kinds)]
            status = send(http)
            statuses[kind][status] = statuses[kind].get(status, 0) + 1
            n += 1
            if n == args.warmup or n % args.every == 0:
                idle(http)  # a sample never catches an abandoned job still winding down
                samples.append(sample(n, started))
                log(f"{n} requests: RSS {samples[-1]['rss_bytes'] / 2**20:.0f} MiB, "
                    f"MLX active {samples[-1]['mlx_active_bytes'] / 2**20:.1f} MiB")  # fmt: skip
        if not samples or samples[-1]["requests"] != n:
            idle(http)
            samples.append(sample(n, started))
    server.should_exit = True
    base = next(s for s in samples if s["requests"] >= min(args.warmup, n))
    last = samples[-1]
    growth = {k: (last[k] - base[k]) / base[k] for k in ("rss_bytes", "mlx_active_bytes") if base[k]}
    errors = sum(c for by in statuses.values() for code, c in by.items() if code >= 500 and code != 499)
    return {"machine": machine(), "settings": vars(args), "requests": n, "statuses": statuses,
            "server_errors": errors, "growth_after_warmup": growth, "samples": samples,
            "ok": errors == 0 and all(g <= MAX_GROWTH for g in growth.values())}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--minutes", type=float, default=None, help="run this long instead of --requests")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--long-steps", type=int, default=400, help="the job each disconnecting client abandons")
    p.add_argument("--warmup", type=int, default=50, help="requests before the memory baseline")
    p.add_argument("--every", type=int, default=50, help="requests between memory samples")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    r = soak(args)
    growth = ", ".join(f"{k} {v:+.1%}" for k, v in r["growth_after_warmup"].items())
    print(f"{r['requests']} requests, {r['server_errors']} server errors, growth after warm-up: {growth}")
    print(f"statuses: {r['statuses']}\n{'PASS' if r['ok'] else 'FAIL'} (growth <= {MAX_GROWTH:.0%}, no 5xx)")
    write_json(args.json, r)
    return r


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
