"""The web page at `/`, in a real browser: Debian's headless Chromium driven by Playwright's Python API.

Skips (with the reason) where Playwright or a Chromium binary is missing; `.ci/run` installs both.
"""

from __future__ import annotations

import base64
import io
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from PIL import Image  # noqa: E402

from sd35m_mlx.server.spec import Limits  # noqa: E402
from tests.server_helpers import RunningServer, pixels, png, wait_until  # noqa: E402

LONG = 1000


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


@pytest.fixture(scope="module")
def server_options():
    return dict(model_name="sd35m-tiny", limits=Limits(max_steps=LONG))


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent.length > 0")
    yield page
    context.close()
    server.wait_idle()


def fill_settings(page, steps: int, seed: int) -> None:
    for field, value in (("#width", "64"), ("#height", "64"), ("#steps", str(steps)), ("#seed", str(seed))):
        page.fill(field, value)


def card_pixels(page, index: int = 0) -> np.ndarray:
    src = page.locator(".card img").nth(index).get_attribute("src")
    return pixels(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))


def test_type_a_prompt_press_enter_and_the_image_appears(page, pipe):
    assert page.inner_text("#model-name") == "sd35m-tiny"
    fill_settings(page, steps=2, seed=7)
    page.fill("#prompt", "a red cube")
    page.press("#prompt", "Enter")  # Enter submits
    page.wait_for_selector(".card img")
    want = pipe.generate("a red cube", width=64, height=64, num_inference_steps=2, guidance_scale=4.5, seed=7)[0]
    assert np.array_equal(card_pixels(page), pixels(want))
    assert "seed 7" in page.inner_text(".card .meta") and "Done" in page.inner_text("#status")

    # "use these settings" puts them back into the form
    page.fill("#prompt", "something else")
    page.fill("#seed", "-1")
    page.click(".card button:has-text('Use these settings')")
    assert page.input_value("#prompt") == "a red cube" and page.input_value("#seed") == "7"


def test_sampler_and_scheduler_selects_list_what_runs(page, pipe):
    samplers = page.locator("#sampler option").all_inner_texts()
    assert len(samplers) == 18 and samplers[:2] == ["Euler", "Euler a"] and "UniPC" in samplers
    schedulers = page.locator("#scheduler option")
    assert schedulers.count() == 9 and "Karras" in schedulers.all_inner_texts()
    fill_settings(page, steps=2, seed=5)
    page.select_option("#sampler", "DPM++ 2M")
    page.select_option("#scheduler", "karras")  # by value: our name, shown as its A1111 label
    page.fill("#prompt", "a blue ball")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".card img")
    kw = dict(width=64, height=64, num_inference_steps=2, guidance_scale=4.5, seed=5)
    want = pipe.generate("a blue ball", sampler="dpmpp_2m", scheduler="karras", **kw)[0]
    assert np.array_equal(card_pixels(page), pixels(want))


def test_cancel_a_long_run(page, server):
    fill_settings(page, steps=LONG, seed=1)
    page.fill("#prompt", "a long run")
    page.click("#generate")
    page.wait_for_function("document.getElementById('bar').value > 0")  # the live progress bar moves
    page.wait_for_selector("#preview:not([hidden])")  # and the live preview shows
    assert "step" in page.inner_text("#status") and page.is_enabled("#cancel")
    page.click("#cancel")
    page.wait_for_function("document.getElementById('status').textContent.includes('Cancelled')")
    wait_until(lambda: server.worker.current is None, 20, what="the server to drop the cancelled job")
    assert page.locator(".card").count() == 0 and page.is_enabled("#generate")


def test_drop_an_image_for_img2img(page, pipe):
    source = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = base64.b64encode(png(source)).decode()
    page.evaluate(  # a real drop event carrying a PNG file, as a drag from the desktop delivers it
        """async (b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "photo.png", { type: "image/png" }));
            document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true }));
        }""",
        data,
    )
    page.wait_for_selector("#init-controls.on")
    fill_settings(page, steps=2, seed=3)
    page.fill("#prompt", "a fox")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".card img")
    want = pipe.generate("a fox", image=source, strength=0.6, width=64, height=64, num_inference_steps=2, seed=3)[0]
    assert np.array_equal(card_pixels(page), pixels(want))
    assert "img2img" in page.inner_text(".card .meta")


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


def test_drop_a_mask_next_to_the_image_to_inpaint(page, pipe):
    from PIL import ImageFilter

    source = Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 24, 40, 56))
    drop_file(page, "drop", png(source), "photo.png")
    page.wait_for_selector("#init-controls.on")
    drop_file(page, "mask-box", png(mask), "mask.png")  # on the mask box: the mask, not a new image
    page.wait_for_selector("#mask-thumb:not([hidden])")
    assert page.get_attribute("#init-thumb", "src") != page.get_attribute("#mask-thumb", "src")
    fill_settings(page, steps=2, seed=5)
    page.fill("#prompt", "a fox")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".card img")
    # the page sends A1111's default mask_blur (4 px) over the whole picture
    want = pipe.generate("a fox", image=source, mask_image=mask.filter(ImageFilter.GaussianBlur(4)), strength=0.6,
                         width=64, height=64, num_inference_steps=2, seed=5)[0]  # fmt: skip
    assert np.array_equal(card_pixels(page), pixels(want))
    assert "inpaint" in page.inner_text(".card .meta")


def test_with_an_api_key_the_page_asks_for_it(browser, pipe):
    with RunningServer(pipe, api_key="s3cret") as s:
        context = browser.new_context()
        try:
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.goto(s.url + "/")
            page.wait_for_selector("#key-box.on")  # its first API call got 401
            assert "API key" in page.inner_text("#status")
            page.fill("#key", "s3cret")
            fill_settings(page, steps=1, seed=2)
            page.fill("#prompt", "a key")
            page.press("#prompt", "Enter")
            page.wait_for_selector(".card img")
        finally:
            context.close()
