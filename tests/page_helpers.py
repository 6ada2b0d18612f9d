"""What the browser tests of the studio page share: Debian's Chromium through Playwright's Python API, a page
that fails its test on any console error, and the page's gestures (drop a file, fill the settings)."""

from __future__ import annotations

import base64
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.server_helpers import pixels

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


def chromium_path() -> str | None:
    for candidate in (os.environ.get("SD35M_MLX_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set SD35M_MLX_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def open_page(browser, url: str, errors: list, **context_options):
    """A new tab on the studio (a desktop's size unless `context_options` say otherwise), loading; its console
    errors and uncaught exceptions go to `errors`. Ready once `body[data-ready]` is there."""
    context = browser.new_context(**{"viewport": {"width": 1280, "height": 800}, **context_options})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.on("console", lambda m: m.type == "error" and errors.append(f"console: {m.text} ({m.location.get('url')})"))
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.goto(url + "/")
    return page


@pytest.fixture
def page(browser, server):
    """The studio on the module's server; the test fails if the page logged an error."""
    errors: list[str] = []
    page = open_page(browser, server.url, errors)
    page.wait_for_selector("body[data-ready]")
    yield page
    page.context.close()
    server.wait_idle()
    assert errors == [], errors


def label(page, name: str):
    return page.get_by_label(name, exact=True)


def button(page, name: str):
    return page.get_by_role("button", name=name, exact=True)


def fill_settings(page, steps: int, seed: int, size: int = 64) -> None:
    for name, value in (("Width", size), ("Height", size), ("Steps", steps), ("Seed", seed)):
        label(page, name).fill(str(value))


def generate(page, prompt: str) -> None:
    label(page, "Prompt").fill(prompt)
    label(page, "Prompt").press("Enter")  # Enter generates


def card_pixels(page, index: int = 0) -> np.ndarray:
    src = page.locator("#gallery .card img").nth(index).get_attribute("src")
    return pixels(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))


def data_url_image(data_url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def drop_file(page, target: str, data: bytes, name: str) -> None:
    """A real drop event carrying a PNG file on `target` (a CSS id), as a drag from the desktop delivers it."""
    page.evaluate(
        """async ([target, b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: "image/png" }));
            document.getElementById(target).dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true }));
        }""",
        [target, base64.b64encode(data).decode(), name],
    )
