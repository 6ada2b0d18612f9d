"""The studio page at `/`, in a real browser: Debian's headless Chromium driven by Playwright's Python API
(tests/page_helpers.py). Every control is found by its label, as a person (or a screen reader) finds it.

Skips (with the reason) where Playwright or a Chromium binary is missing; `.ci/run` installs both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from PIL import Image, ImageFilter  # noqa: E402

from sd35m_mlx.server.spec import Limits  # noqa: E402
from tests import page_helpers  # noqa: E402
from tests.lora_writers import save  # noqa: E402
from tests.page_helpers import (  # noqa: E402
    button,
    card_pixels,
    data_url_image,
    drop_file,
    fill_settings,
    generate,
    label,
    open_page,
)
from tests.server_helpers import RunningServer, pixels, png, wait_until  # noqa: E402

browser, page = page_helpers.browser, page_helpers.page  # the fixtures
LONG = 1000
# every control the issue names, by its accessible name
LABELS = ["Model", "Prompt", "Negative prompt", "Search LoRAs", "Sampler", "Scheduler", "Width", "Height", "Aspect",
          "Steps", "Guidance", "Count", "Seed", "Image", "Strength", "Brush size", "Mask image", "Left", "Top", "Right",
          "Bottom", "Fill", "Feather", "Use ControlNet", "Control image", "Control model", "Preprocessor",
          "Control scale", "Control start", "Control end", "Canny low", "Canny high", "Upscale factor",
          "Upscale strength", "Filter history"]  # fmt: skip
BUTTONS = [
    "Generate",
    "Cancel",
    "Random",
    "Reuse last",
    "Mask",
    "Outpaint",
    "Eraser",
    "Invert",
    "Clear",
    "Remove image",
]


def _lora(path, seed: int, metadata: dict) -> None:
    rng = np.random.default_rng(seed)
    t = {}
    for i in range(2):
        t[f"transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight"] = rng.standard_normal((4, 32)) / 6
        t[f"transformer.transformer_blocks.{i}.attn.to_q.lora_B.weight"] = rng.standard_normal((32, 4)) * 0.3
    path.parent.mkdir(parents=True, exist_ok=True)
    save(path, t, metadata)


@pytest.fixture(scope="module")
def server_options(tmp_path_factory):
    loras = tmp_path_factory.mktemp("loras")
    _lora(loras / "styles" / "ink.safetensors", 0, {"ss_tag_frequency": '{"set": {"inky lines": 5, "paper": 2}}'})
    _lora(loras / "sketch.safetensors", 1, {"modelspec.trigger_phrase": "pencil sketch"})
    return dict(model_name="sd35m-tiny", limits=Limits(max_steps=LONG), lora_dir=str(loras))


def random_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_every_control_has_a_label_and_is_found_by_it(page):
    page.click("#image-box summary")
    drop_file(page, "drop", png(random_image(0)), "photo.png")
    page.wait_for_selector("#init-controls.on")
    button(page, "Mask").click()  # shows the brush's tools
    for name in LABELS:
        assert label(page, name).count() == 1, name
    for name in BUTTONS:
        assert button(page, name).count() == 1, name
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll("input, select, textarea")]
            .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label"))
            .map((el) => el.id || el.outerHTML)"""
    )
    assert unlabelled == []
    assert page.evaluate("document.querySelectorAll('input, select, textarea').length") >= len(LABELS)
    assert label(page, "Model").evaluate("el => el.tagName") == "SELECT"
    assert [label(page, n).get_attribute("type") for n in ("Width", "Height", "Image")] == ["number", "number", "file"]


def test_type_a_prompt_press_enter_and_the_image_appears(page, pipe):
    assert label(page, "Model").input_value() == "sd35m-tiny"
    fill_settings(page, steps=2, seed=7)
    generate(page, "a red cube")
    page.wait_for_selector("#gallery .card img")
    want = pipe.generate("a red cube", width=64, height=64, num_inference_steps=2, guidance_scale=4.5, seed=7)[0]
    assert np.array_equal(card_pixels(page), pixels(want))
    assert "seed 7" in page.inner_text(".card .meta") and "Done" in page.inner_text("#status")
    assert (
        page.locator("#gallery .card").get_by_role("link", name="Download").get_attribute("download") == "sd35m-7.png"
    )
    page.click("#gallery .card img")  # full size, in the page
    assert page.locator("#viewer").evaluate("d => d.open") and page.get_attribute("#viewer-img", "src").startswith(
        "data:"
    )
    page.click("#viewer")
    assert not page.locator("#viewer").evaluate("d => d.open")

    # "use these settings" puts them back into the form; "reuse" takes the last seed
    label(page, "Prompt").fill("something else")
    button(page, "Random").click()
    assert label(page, "Seed").input_value() == "-1"
    button(page, "Reuse last").click()
    assert label(page, "Seed").input_value() == "7"
    label(page, "Seed").fill("-1")
    page.locator("#gallery .card").get_by_role("button", name="Use these settings").click()
    assert label(page, "Prompt").input_value() == "a red cube" and label(page, "Seed").input_value() == "7"


def test_sampler_and_scheduler_selects_list_what_runs(page, pipe):
    samplers = label(page, "Sampler").locator("option").all_inner_texts()
    assert len(samplers) == 18 and samplers[:2] == ["Euler", "Euler a"] and "UniPC" in samplers
    schedulers = label(page, "Scheduler").locator("option")
    assert schedulers.count() == 9 and "Karras" in schedulers.all_inner_texts()
    fill_settings(page, steps=2, seed=5)
    label(page, "Sampler").select_option("DPM++ 2M")
    label(page, "Scheduler").select_option("karras")  # by value: our name, shown as its A1111 label
    generate(page, "a blue ball")
    page.wait_for_selector("#gallery .card img")
    kw = dict(width=64, height=64, num_inference_steps=2, guidance_scale=4.5, seed=5)
    want = pipe.generate("a blue ball", sampler="dpmpp_2m", scheduler="karras", **kw)[0]
    assert np.array_equal(card_pixels(page), pixels(want))


def test_escape_cancels_a_long_run_with_live_progress(page, server):
    fill_settings(page, steps=LONG, seed=1)
    generate(page, "a long run")
    page.wait_for_function("document.getElementById('bar').value > 0")  # the live progress bar moves
    page.wait_for_selector("#preview:not([hidden])")  # and the live preview shows
    assert "step" in page.inner_text("#status") and button(page, "Cancel").is_enabled()
    page.keyboard.press("Escape")
    page.wait_for_function("document.getElementById('status').textContent.includes('Cancelled')")
    wait_until(lambda: server.worker.current is None, 20, what="the server to drop the cancelled job")
    assert page.locator("#gallery .card").count() == 0 and button(page, "Generate").is_enabled()


def test_behind_another_job_the_page_shows_its_queue_position_and_escape_leaves_the_queue(page, server):
    import threading

    import httpx

    other = threading.Thread(target=lambda: httpx.post(server.url + "/sdapi/v1/txt2img", timeout=60, json={
        "prompt": "someone else", "width": 64, "height": 64, "steps": LONG}))  # fmt: skip
    other.start()
    try:
        wait_until(lambda: server.worker.current is not None, 20, what="the other job to start")
        fill_settings(page, steps=1, seed=1)
        generate(page, "mine")
        page.wait_for_function("document.getElementById('queue').textContent === '1 ahead in the queue'")
        assert "Waiting: 1 job before this one" in page.inner_text("#status")
        page.keyboard.press("Escape")
        page.wait_for_function("document.getElementById('status').textContent.includes('Cancelled')")
        wait_until(lambda: server.worker.queued == 0, 20, what="the page's job to leave the queue")
    finally:
        httpx.post(server.url + "/sdapi/v1/interrupt")
        other.join(60)
    assert page.locator("#gallery .card").count() == 0


def test_on_a_phone_the_form_and_results_stack_without_sideways_scrolling(browser, server):
    errors: list[str] = []
    phone = open_page(browser, server.url, errors, viewport={"width": 390, "height": 844}, is_mobile=True,
                      has_touch=True)  # fmt: skip
    try:
        phone.wait_for_selector("body[data-ready]")
        form, stage = phone.locator("#form").bounding_box(), phone.locator(".stage").bounding_box()
        assert stage["y"] >= form["y"] + form["height"] and form["width"] <= 390
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        phone.context.close()
    assert errors == []


def test_choose_an_image_for_img2img(page, pipe, tmp_path):
    source = random_image(2)
    source.save(tmp_path / "photo.png")
    page.click("#image-box summary")
    label(page, "Image").set_input_files(tmp_path / "photo.png")
    page.wait_for_selector("#init-controls.on")
    fill_settings(page, steps=2, seed=3)
    generate(page, "a fox")
    page.wait_for_selector("#gallery .card img")
    want = pipe.generate("a fox", image=source, strength=0.6, width=64, height=64, num_inference_steps=2, seed=3)[0]
    assert np.array_equal(card_pixels(page), pixels(want))
    assert "img2img" in page.inner_text(".card .meta")


def test_drop_an_image_then_a_mask_file_on_the_mask_box_to_inpaint(page, pipe):
    source, mask = random_image(4), Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 24, 40, 56))
    drop_file(page, "drop", png(source), "photo.png")
    page.wait_for_selector("#init-controls.on")
    button(page, "Mask").click()
    drop_file(page, "mask-box", png(mask), "mask.png")  # on the mask box: the mask, not a new image
    page.wait_for_function("document.getElementById('status').textContent.includes('mask.png')")
    assert page.get_attribute("#init-img", "src").startswith("data:image/png")
    fill_settings(page, steps=2, seed=5)
    generate(page, "a fox")
    page.wait_for_selector("#gallery .card img")
    # the page sends A1111's default mask_blur (4 px) over the whole picture
    want = pipe.generate("a fox", image=source, mask_image=mask.filter(ImageFilter.GaussianBlur(4)), strength=0.6,
                         width=64, height=64, num_inference_steps=2, seed=5)[0]  # fmt: skip
    assert np.array_equal(card_pixels(page), pixels(want))
    assert "inpaint" in page.inner_text(".card .meta")


def paint(page, y: float, x0: float = 0.15, x1: float = 0.85) -> None:
    """A mouse stroke across the mask canvas at height `y` (fractions of its size)."""
    box = page.locator("canvas#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y * box["height"])
    page.mouse.down()
    for k in range(1, 11):
        page.mouse.move(box["x"] + (x0 + (x1 - x0) * k / 10) * box["width"], box["y"] + y * box["height"])
    page.mouse.up()


def test_paint_a_mask_with_the_mouse_and_the_result_is_the_library_with_that_mask(page, pipe):
    source = random_image(6)
    drop_file(page, "drop", png(source), "photo.png")
    page.wait_for_selector("#init-controls.on")
    button(page, "Mask").click()
    assert button(page, "Mask").get_attribute("aria-pressed") == "true"
    label(page, "Brush size").fill("24")  # CSS px: 6 image px at the 4x display of a 64 px image
    paint(page, y=0.5)
    fill_settings(page, steps=2, seed=9)
    with page.expect_request("**/sdapi/v1/img2img") as sent:
        generate(page, "a fox")
    page.wait_for_selector("#gallery .card img")
    body = sent.value.post_data_json
    assert body["mask_blur"] == 4 and body["init_images"][0].startswith("data:image/png")
    mask = data_url_image(body["mask"]).convert("L")
    m = np.asarray(mask)
    assert mask.size == (64, 64) and m[32, 32] == 255 and m[32, 4] == 0 and m[4, 32] == 0  # the stroke, only
    binary = mask.point(lambda v: 255 if v > 128 else 0)  # as A1111 reads a mask
    want = pipe.generate("a fox", image=source, mask_image=binary.filter(ImageFilter.GaussianBlur(4)), strength=0.6,
                         width=64, height=64, num_inference_steps=2, seed=9)[0]  # fmt: skip
    assert np.array_equal(card_pixels(page), pixels(want))
    assert "inpaint" in page.inner_text(".card .meta")


def test_mask_tools_eraser_invert_clear_and_touch(page):
    drop_file(page, "drop", png(random_image(1)), "photo.png")
    page.wait_for_selector("#init-controls.on")
    button(page, "Mask").click()
    label(page, "Brush size").fill("40")
    paint(page, y=0.5)

    def mask() -> np.ndarray | None:
        url = page.evaluate("maskPng()")
        return None if url is None else np.asarray(data_url_image(url).convert("L"))

    assert mask()[32, 32] == 255
    button(page, "Eraser").click()
    paint(page, y=0.5, x0=0.4, x1=0.6)
    assert mask()[32, 32] == 0 and mask()[32, 12] == 255
    button(page, "Eraser").click()
    button(page, "Invert").click()
    assert mask()[32, 12] == 0 and mask()[4, 4] == 255
    button(page, "Clear").click()
    assert mask() is None  # nothing painted: plain img2img
    stroke = """([kind, y, pressure]) => {  // Pointer Events as a finger or a pen sends them
        const c = document.getElementById("mask-canvas"), r = c.getBoundingClientRect();
        const at = (type, fx) => c.dispatchEvent(new PointerEvent(type, { pointerId: 7, pointerType: kind, pressure,
            bubbles: true, clientX: r.left + fx * r.width, clientY: r.top + y * r.height, isPrimary: true }));
        at("pointerdown", 0.2); at("pointermove", 0.5); at("pointermove", 0.8); at("pointerup", 0.8);
    }"""
    page.evaluate(stroke, ["touch", 0.25, 0.5])  # a finger paints as the mouse does
    assert mask()[16, 32] == 255 and mask()[48, 32] == 0
    page.evaluate(stroke, ["pen", 0.75, 0.1])  # a light pen: a fifth of the brush (pressure x 2)
    column = mask()[:, 32] > 128
    assert column[:32].sum() == 10 and 1 <= column[32:].sum() <= 3  # the brush's 10 px; the pen's 2


def test_a_lora_from_the_list_goes_into_the_prompt(page, server_options):
    page.click("#loras-box summary")
    names = page.locator("#lora-list li > button:not(.trigger)").all_inner_texts()
    assert names == ["sketch", "styles/ink"]
    triggers = page.locator("#lora-list .trigger").all_inner_texts()
    assert triggers == ["pencil sketch", "inky lines", "paper"]  # trigger phrase; tags by frequency
    label(page, "Search LoRAs").fill("paper")
    assert page.get_by_role("button", name="sketch", exact=True).is_hidden()
    label(page, "Prompt").fill("a cat")
    page.get_by_role("button", name="styles/ink", exact=True).click()
    assert label(page, "Prompt").input_value() == "a cat <lora:styles/ink:1>"
    page.keyboard.type("0.5")  # the weight is selected: typing edits it in place
    assert label(page, "Prompt").input_value() == "a cat <lora:styles/ink:0.5>"
    label(page, "Prompt").evaluate("p => p.setSelectionRange(1, 1)")  # the caret after "a"
    page.get_by_role("button", name="inky lines").click()  # a trigger word, where the caret was
    assert label(page, "Prompt").input_value() == "a inky lines cat <lora:styles/ink:0.5>"
    label(page, "Prompt").fill("a cat <lora:styles/ink:0.5>")
    fill_settings(page, steps=1, seed=3)
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        label(page, "Prompt").press("Enter")
    page.wait_for_selector("#gallery .card img")
    assert sent.value.post_data_json["prompt"] == "a cat <lora:styles/ink:0.5>"
    assert "Done" in page.inner_text("#status")
    label(page, "Search LoRAs").fill("")
    _lora(Path(server_options["lora_dir"]) / "new.safetensors", 2, {})
    button(page, "Refresh the list").click()  # the server lists its folder again
    page.get_by_role("button", name="new", exact=True).wait_for()


def test_dark_mode_follows_the_system(page):
    def colours():
        return page.evaluate("() => ['backgroundColor', 'color'].map((k) => getComputedStyle(document.body)[k])")

    page.emulate_media(color_scheme="light")
    light = colours()
    page.emulate_media(color_scheme="dark")
    dark = colours()
    assert light == ["rgb(246, 246, 244)", "rgb(29, 29, 31)"] and dark == ["rgb(21, 21, 23)", "rgb(236, 236, 239)"]


def test_with_an_api_key_the_page_asks_once_per_tab(browser, pipe):
    with RunningServer(pipe, api_key="s3cret") as s:
        errors = []
        page = open_page(browser, s.url, errors)
        try:
            page.wait_for_selector("#key-box:not([hidden])")  # its first API call got 401
            assert "API key" in page.inner_text("#status")
            label(page, "API key").fill("s3cret")
            label(page, "API key").press("Tab")  # change: kept for the tab, and the page asks the server again
            page.wait_for_selector("body[data-ready]")
            page.reload()  # the same tab keeps the key
            page.wait_for_selector("body[data-ready]")
            assert page.locator("#key-box").is_hidden()
            fill_settings(page, steps=1, seed=2)
            generate(page, "a key")
            page.wait_for_selector("#gallery .card img")
        finally:
            page.context.close()
        assert [e for e in errors if "401" not in e] == []
