"""The studio page's weight (bytes of HTML, CSS, JS) and time to interactive (navigation start to Generate enabled
with the model's config loaded: `window.studioReadyAt`, a performance.now() reading) in headless Chromium on
`sd35m-mlx serve --model tiny-random`; optionally screenshots. Figures: benchmarks/README.md.

    python benchmarks/bench_page.py [--screenshots DIR]   # 10 cold loads; phone and desktop shots, light and dark
"""

import shutil
import statistics
import sys
import tempfile
from itertools import product
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_server import ServeProcess  # noqa: E402
from benchmarks.measure import parser, write_json  # noqa: E402

SIZES = {"phone": dict(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True),
         "desktop": dict(viewport={"width": 1280, "height": 800})}  # fmt: skip


def cold_load(browser, url: str, close: bool = True, **context) -> tuple[float, int, object]:
    """(ms to interactive, bytes of the page's own files, the page: open unless `close`) in a fresh context."""
    page = browser.new_context(**context).new_page()
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready]")
    ms, size = page.evaluate(
        "[window.studioReadyAt, performance.getEntries().filter((e) => e.initiatorType !== "
        "'fetch').reduce((n, e) => n + (e.transferSize || 0), 0)]"
    )  # the page's own files
    if close:
        page.context.close()
    return ms, size, page


def screenshots(browser, url: str, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    _, _, page = cold_load(browser, url, close=False)  # one image first, so results and history show
    for name, value in (("Width", "64"), ("Height", "64"), ("Steps", "2"), ("Prompt", "a lighthouse at dusk")):
        page.get_by_label(name, exact=True).fill(value)
    page.get_by_label("Prompt", exact=True).press("Enter")
    page.wait_for_selector("#history .card img")
    page.context.close()
    shots = []
    for (size, context), scheme in product(SIZES.items(), ("light", "dark")):
        _, _, page = cold_load(browser, url, close=False, color_scheme=scheme, **context)
        page.click("#loras-box summary")
        page.wait_for_selector("#history .card img")
        shots.append(out / f"studio-{size}-{scheme}.png")
        page.screenshot(path=shots[-1], full_page=size == "phone")
        page.context.close()
    return shots


def main() -> None:
    from playwright.sync_api import sync_playwright

    p = parser(__doc__)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--screenshots", type=Path, help="folder for the four PNGs")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as history, sync_playwright() as pw:
        server = ServeProcess(Path("tiny-random"), max_steps=50)
        server.args += ["--output-dir", history]
        with server:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            loads = [cold_load(browser, server.url) for _ in range(args.runs)]
            tti = [round(t) for t, _, _ in loads]
            print(f"page weight: {loads[0][1]} bytes transferred (HTML+CSS+JS, headers included; not compressed)")
            print(f"time to interactive: median {statistics.median(tti)} ms, min {min(tti)} ms, {args.runs} loads")
            write_json(args.json, {"page_bytes": loads[0][1], "tti_ms": tti})
            for shot in screenshots(browser, server.url, args.screenshots) if args.screenshots else []:
                print("screenshot:", shot)  # (leaving sync_playwright closes the browser)


if __name__ == "__main__":
    main()
