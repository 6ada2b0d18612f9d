"""Does `sd35m-mlx serve` hold its memory flat under mixed traffic? A soak on the tiny random model.

    python benchmarks/bench_soak.py --requests 500              # 64 px, 1 step; minutes on 2 CPU cores

The server runs in this process (uvicorn on a thread) so MLX's active memory can be read next to the
resident set. Pass: no 5xx, and both grow at most 5% after the warm-up. Two random LoRA files (diffusers'
layout, written here with numpy) join the mix, and the LoRA switch time between requests is timed with the
server's cache and without it. Mix and figures: benchmarks/README.md.
"""

from __future__ import annotations

import base64
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sd35m_mlx  # noqa: E402,F401  (OpenBLAS before mlx.core)

# isort: split
from benchmarks.measure import log, machine, parser, proc_status_bytes, write_json  # noqa: E402

MAX_GROWTH = 0.05


def start_server(pipe, long_steps: int, lora_dir: str | None = None):
    import uvicorn

    from sd35m_mlx.server import create_app
    from sd35m_mlx.server.run import bind, uvicorn_config
    from sd35m_mlx.server.spec import Limits

    app = create_app(pipe, model_name="tiny-random", limits=Limits(max_steps=long_steps), lora_dir=lora_dir)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", sock.getsockname()[1]))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def switch_times(http, worker, body: dict, runs: int) -> dict:
    """Median request time (s) naming no LoRA, and alternating <lora:a>/<lora:b> (a switch every request) with
    the cache (loaded once) and without it (budget 0, as `serve --lora-cache-mb 0`: each switch reads its file);
    "use_loras" rows: the worker's switch alone, without the generation's noise."""
    send = lambda prompt: http.post("/sdapi/v1/txt2img", json={**body, "prompt": prompt}).status_code  # noqa: E731
    use_loras, switches = worker.pipe.use_loras, []

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        names = use_loras(*args, **kwargs)
        switches.append(time.perf_counter() - t0)
        return names

    worker.pipe.use_loras, out = timed, {}
    for label, budget, prompts in (("no LoRA", None, ["a red cube"] * 2),
                                   ("switch, cached", None, ["a <lora:a:0.8>", "a <lora:b:1>"]),
                                   ("switch, uncached", 0, ["a <lora:a:0.8>", "a <lora:b:1>"])):  # fmt: skip
        worker.lora_cache_bytes = budget
        send(prompts[1])  # warm: the cached case starts with both loaded
        times, switches[:] = [], []
        for i in range(2 * runs):
            t0 = time.perf_counter()
            assert send(prompts[i % 2]) == 200
            times.append(time.perf_counter() - t0)
        out[label] = statistics.median(times)
        if label != "no LoRA":
            out[f"use_loras, {label.split(', ')[1]}"] = statistics.median(switches)
    worker.lora_cache_bytes, worker.pipe.use_loras = None, use_loras
    return out


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
        ("lora a", lambda http: http.post("/sdapi/v1/txt2img", json={**a1111, "prompt": "a <lora:a:0.8>"}).status_code),
        ("lora b", lambda http: http.post("/sdapi/v1/txt2img", json={**a1111, "prompt": "a <lora:b:1>"}).status_code),
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

    from benchmarks.bench_lora import write_lora_file
    from sd35m_mlx import StableDiffusion35
    from sd35m_mlx.lora.layers import layer_table

    pipe = StableDiffusion35.from_pretrained("tiny-random", dtype="float32")
    loras = tempfile.TemporaryDirectory()
    for seed, name in enumerate("ab"):  # random LoRAs on every Linear of the transformer, in diffusers' layout
        write_lora_file(Path(loras.name) / f"{name}.safetensors", layer_table(pipe.transformer), args.lora_rank, seed)
    server, url = start_server(pipe, args.long_steps, loras.name)
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
        body = {"width": args.size, "height": args.size, "steps": args.steps, "seed": 1}
        switches = switch_times(http, server.config.app.state.server.worker, body, args.switch_runs)
    server.should_exit = True
    loras.cleanup()
    base = next(s for s in samples if s["requests"] >= min(args.warmup, n))
    last = samples[-1]
    growth = {k: (last[k] - base[k]) / base[k] for k in ("rss_bytes", "mlx_active_bytes") if base[k]}
    errors = sum(c for by in statuses.values() for code, c in by.items() if code >= 500 and code != 499)
    return {"machine": machine(), "settings": vars(args), "requests": n, "statuses": statuses,
            "server_errors": errors, "growth_after_warmup": growth, "samples": samples, "lora_switch_s": switches,
            "ok": errors == 0 and all(g <= MAX_GROWTH for g in growth.values())}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--minutes", type=float, default=None, help="run this long instead of --requests")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--long-steps", type=int, default=400, help="the job each disconnecting client abandons")
    p.add_argument("--warmup", type=int, default=100, help="requests before the memory baseline")
    p.add_argument("--every", type=int, default=50, help="requests between memory samples")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--switch-runs", type=int, default=20, help="requests per LoRA switch-time setting, x2")
    args = p.parse_args(argv)
    r = soak(args)
    growth = ", ".join(f"{k} {v:+.1%}" for k, v in r["growth_after_warmup"].items())
    print(f"{r['requests']} requests, {r['server_errors']} server errors, growth after warm-up: {growth}")
    print("request time (median): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in r["lora_switch_s"].items()))
    print(f"statuses: {r['statuses']}\n{'PASS' if r['ok'] else 'FAIL'} (growth <= {MAX_GROWTH:.0%}, no 5xx)")
    write_json(args.json, r)
    return r


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
