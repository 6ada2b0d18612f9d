"""What `sd35m-mlx serve` costs over calling `generate` directly, and what an idle server holds.

    python benchmarks/bench_server.py                 # tiny fixture, 64 px, 2 steps; ~1 min on 2 CPU cores
    python benchmarks/bench_server.py --quick         # a few runs, for the smoke test

Method and figures: benchmarks/README.md.
"""

from __future__ import annotations

import base64
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sd35m_mlx  # noqa: E402,F401  (OpenBLAS before mlx.core)

# isort: split
import numpy as np  # noqa: E402

from benchmarks.measure import parser, proc_status_bytes, time_runs, write_json  # noqa: E402


class ServeProcess:
    """`sd35m-mlx serve --port 0` on `model` in a child process; `url` once it listens."""

    def __init__(self, model: Path, max_steps: int):
        self.args = ["serve", "--model", str(model), "--dtype", "float32", "--port", "0", "--max-steps", str(max_steps)]

    def __enter__(self):
        code = "import sys; from sd35m_mlx_cli.main import cli; cli(sys.argv[1:], prog_name='sd35m-mlx')"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-c", code, *self.args], cwd=ROOT, env=env,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.pid = self.proc.pid
        deadline = time.monotonic() + 300
        for line in self.proc.stderr:
            if " on http://" in line:
                self.url = line.split(" on ")[1].split()[0].rstrip("/")
                return self
            if time.monotonic() > deadline:
                break
        self.proc.kill()
        raise RuntimeError("sd35m-mlx serve did not start")

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def timed_interleaved(fns: dict, runs: int) -> dict:
    """Each fn's min_s, median_s, runs and requests_per_s over `runs` rounds of one call each (after a warm-up)."""
    for fn in fns.values():
        fn()  # warm-up (first-call compilation, connection set-up)
    times: dict = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name] += time_runs(fn, 1)
    return {
        name: {"min_s": min(t), "median_s": statistics.median(t), "runs": len(t), "requests_per_s": 1 / min(t)}
        for name, t in times.items()
    }


def pipeline_only_rss(model: Path, size: int, steps: int) -> int:
    """Resident set of a fresh process that loads the same pipeline and generates one image: the
    baseline the idle server's own process is compared with."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import sd35m_mlx; from sd35m_mlx import StableDiffusion35;"
        "from benchmarks.measure import proc_status_bytes;"
        "p = StableDiffusion35.from_pretrained(sys.argv[2], dtype='float32');"
        "n = int(sys.argv[3]); p.generate('a red cube', width=n, height=n, num_inference_steps=int(sys.argv[4]));"
        "print(proc_status_bytes('VmRSS'))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(model), str(size), str(steps)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return int(out.stdout.split()[-1])


def tiny_fixture(cache: Path) -> Path:
    from benchmarks.measure import build_once
    from scripts.build_fixture import build_tiny_pipeline

    folder = cache / "sd35m-tiny"
    build_once(folder, build_tiny_pipeline)
    return folder


def run(args) -> dict:
    from sd35m_mlx import StableDiffusion35

    model = Path(args.model) if args.model else tiny_fixture(Path(args.cache))
    pipe = StableDiffusion35.from_pretrained(model, dtype="float32")
    size, steps = args.size, args.steps
    gen = dict(width=size, height=size, num_inference_steps=steps, guidance_scale=4.5, seed=1)
    results: dict = {"settings": {"model": model.name, "size": size, "steps": steps, "runs": args.runs}}

    # 1 and 2, interleaved run by run so both meet the same load on the machine
    import httpx

    def direct():
        pipe.generate("a red cube", **gen)

    def direct_with_preview():
        pipe.generate("a red cube", **gen, preview="rgb", on_preview=lambda *a: None, callback=lambda *a: True)

    with ServeProcess(model, args.steps) as server:
        results["rss_server_started_bytes"] = proc_status_bytes("VmRSS", server.pid)
        with httpx.Client(base_url=server.url, timeout=120) as http:
            openai_body = {"prompt": "a red cube", "size": f"{size}x{size}", "steps": steps, "seed": 1}
            a1111_body = {"prompt": "a red cube", "width": size, "height": size, "steps": steps, "seed": 1,
                          "cfg_scale": 4.5, "sampler_name": "Euler"}  # fmt: skip

            def post(path, body):
                r = http.post(path, json=body)
                r.raise_for_status()
                return r

            results |= timed_interleaved(
                {
                    "direct": direct,
                    "direct_with_preview": direct_with_preview,
                    "openai": lambda: post("/v1/images/generations", openai_body),
                    "a1111": lambda: post("/sdapi/v1/txt2img", a1111_body),
                    "health": lambda: http.get("/health"),
                },
                args.runs,
            )
            results["response_bytes"] = len(post("/v1/images/generations", openai_body).content)
            time.sleep(1.0)
            results["rss_server_idle_bytes"] = proc_status_bytes("VmRSS", server.pid)
    results["rss_direct_bytes"] = proc_status_bytes("VmRSS")
    results["rss_pipeline_only_bytes"] = pipeline_only_rss(model, size, steps)
    for api in ("openai", "a1111"):
        r = results[api]
        r["overhead_s"] = r["min_s"] - results["direct"]["min_s"]
        r["overhead_vs_preview_s"] = r["min_s"] - results["direct_with_preview"]["min_s"]

    # 3. serialisation of one 1024 px image (random pixels: PNG's worst case; a real image compresses better)
    from PIL import Image

    from sd35m_mlx.record import Settings
    from sd35m_mlx.server.app import VERSION
    from sd35m_mlx.server.spec import ModelInfo, Spec, png_bytes

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    info = ModelInfo.of(pipe, model.name)
    spec = Spec(Settings("a red cube", width=1024, height=1024), seeds=[1])
    serialise = {"serialise_1024": lambda: base64.b64encode(png_bytes(image, spec, 1, info, VERSION))}
    results |= timed_interleaved(serialise, max(3, args.runs // 4))

    return results


def report(r: dict) -> None:
    s = r["settings"]
    ms = lambda v: f"{v * 1000:8.1f} ms"  # noqa: E731
    print(f"sd35m-mlx serve vs generate: {s['model']}, {s['size']} px, {s['steps']} steps, {s['runs']} runs")
    print("  (min over the runs, the least disturbed [median])")
    rows = [("generate (direct)", r["direct"]),
            ("generate + rgb preview + callback", r["direct_with_preview"]),
            ("OpenAI /v1/images/generations", r["openai"]), ("A1111 /sdapi/v1/txt2img", r["a1111"]),
            ("GET /health", r["health"])]  # fmt: skip
    for name, t in rows:
        print(f"  {name:36s} {ms(t['min_s'])}  [{ms(t['median_s']).strip()}]  {t['requests_per_s']:7.2f} req/s")
    for api in ("openai", "a1111"):
        print(f"  overhead {api:8s} {ms(r[api]['overhead_s'])} over generate, "
              f"{ms(r[api]['overhead_vs_preview_s']).strip()} over generate with the preview")  # fmt: skip
    print(f"  response size (b64 JSON, {s['size']} px): {r['response_bytes']:,} bytes")
    print(f"  PNG + metadata + base64 of one 1024x1024 image: {ms(r['serialise_1024']['median_s']).strip()}")
    mb = lambda key: f"{r[key] / 1e6:.0f} MB"  # noqa: E731
    print(f"  resident memory of the server process: started {mb('rss_server_started_bytes')}, idle after the "
          f"requests {mb('rss_server_idle_bytes')}; a process with the same pipeline that generated the same "
          f"image, no server: {mb('rss_pipeline_only_bytes')}")  # fmt: skip
    idle = r["rss_server_idle_bytes"] - r["rss_pipeline_only_bytes"]
    print(f"  memory held by the idle server (its process minus the pipeline-only one): {idle / 1e6:.0f} MB")


def parse_args(argv=None):
    p = parser(__doc__, quick="3 runs")
    p.add_argument("--model", help="model folder (default: the tiny random-weight fixture, built once)")
    p.add_argument(
        "--cache", default=str(ROOT / "benchmarks" / "results" / "fixtures"), help="where the tiny fixture is built"
    )
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args(argv)
    if args.quick:
        args.runs = 3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = run(args)
    report(results)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
