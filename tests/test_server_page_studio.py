"""The studio page's workflows beyond one image, in Debian's Chromium (tests/page_helpers.py): the model's limits
and the Model switch, upscale of a result, outpaint by dragging an edge, a ControlNet unit, and the history across
a server restart. Results are compared pixel for pixel with the library calls the server makes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from PIL import Image  # noqa: E402
from PIL.PngImagePlugin import PngInfo  # noqa: E402

from tests import page_helpers  # noqa: E402
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
from tests.server_helpers import RunningServer, pixels, png  # noqa: E402

browser, page = page_helpers.browser, page_helpers.page  # the fixtures
PHOTO = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
KW = dict(num_inference_steps=1, guidance_scale=4.5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("history")


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    from scripts.build_fixture import build_controlnet

    return {"edges": build_controlnet(tmp_path_factory.mktemp("controlnets") / "edges", seed=1)}


@pytest.fixture(scope="module")
def server_options(folder, nets, tiny_pipeline):
    from sd35m_mlx import StableDiffusion35

    def loader(source):
        return lambda: StableDiffusion35.from_pretrained(source, dtype="float32")

    return dict(model_name="sd35m-tiny", output_dir=str(folder), controlnets={k: str(v) for k, v in nets.items()},
                loaders={"sd35m-tiny": loader(tiny_pipeline), "tiny-random": loader("tiny-random")})  # fmt: skip


def config(server) -> dict:
    return httpx.get(server.url + "/studio/config").json()["model"]


def test_sizes_steps_and_count_are_the_models_limits_and_aspect_presets_keep_to_them(page, server):
    m = config(server)
    for name, key in (("Width", "max_width"), ("Height", "max_height"), ("Steps", "max_steps"), ("Count", "max_count")):
        assert label(page, name).get_attribute("max") == str(m[key]), name
    assert m["max_width"] < 1024  # the tiny model: the page never offers 1024 px
    assert label(page, "Width").input_value() == str(m["default_width"])
    assert label(page, "Steps").input_value() == str(m["default_steps"])
    label(page, "Aspect").select_option("16:9")
    w, h = int(label(page, "Width").input_value()), int(label(page, "Height").input_value())
    assert w <= m["max_width"] and w % m["multiple"] == 0 == h % m["multiple"]
    assert abs(w / h - 16 / 9) < 0.2, (w, h)  # the shape kept within the limits, not clipped to it


def test_upscale_a_result_is_img2img_at_the_factor_with_the_strength(page, pipe, server):
    from sd35m_mlx.upscale import lanczos

    fill_settings(page, steps=1, seed=3)
    generate(page, "a boat")
    page.wait_for_selector("#gallery .card img")
    first = Image.fromarray(card_pixels(page))
    label(page, "Upscale factor").select_option("2")
    label(page, "Upscale strength").fill("0.4")
    with page.expect_request("**/sdapi/v1/img2img") as sent:
        page.locator("#gallery .card").get_by_role("button", name="Upscale").click()
    page.wait_for_function("document.querySelectorAll('#gallery .card').length === 2")
    body = sent.value.post_data_json
    assert (body["width"], body["height"], body["denoising_strength"], body["seed"]) == (128, 128, 0.4, 3)
    want = pipe.generate("a boat", image=lanczos(first, (128, 128)), strength=0.4, width=128, height=128, seed=3, **KW)
    assert np.array_equal(card_pixels(page, 0), pixels(want[0]))
    assert "upscale x2" in page.inner_text("#gallery .card .meta")

    top = config(server)["max_width"]  # beyond the model's size: said at once, nothing sent
    fill_settings(page, steps=1, seed=3, size=top // 2 + 16)
    generate(page, "a boat")
    page.wait_for_function("document.querySelectorAll('#gallery .card').length === 3")
    page.locator("#gallery .card").first.get_by_role("button", name="Upscale").click()
    page.wait_for_function("document.getElementById('status').classList.contains('error')")
    assert f"at most {top}x{top}" in page.inner_text("#status") and page.locator("#gallery .card").count() == 3


def test_outpaint_by_dragging_the_right_edge(page, pipe):
    from sd35m_mlx.editing.outpaint import outpaint

    drop_file(page, "drop", png(PHOTO), "photo.png")
    page.wait_for_selector("#init-controls.on")
    button(page, "Outpaint").click()
    box = page.locator("#frame").bounding_box()
    page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    for dx in range(10, 80, 10):  # 70 CSS px at the 4x display: 17 image px, snapped to 16
        page.mouse.move(box["x"] + box["width"] - 2 + dx, box["y"] + box["height"] / 2)
    page.mouse.up()
    assert [label(page, n).input_value() for n in ("Left", "Top", "Right", "Bottom")] == ["0", "0", "16", "0"]
    assert label(page, "Width").input_value() == "80"
    label(page, "Steps").fill("1")
    label(page, "Seed").fill("5")
    with page.expect_request("**/sdapi/v1/img2img") as sent:
        generate(page, "a field")
    page.wait_for_selector("#gallery .card img")
    body = sent.value.post_data_json
    assert body["outpaint"] == {"left": 0, "top": 0, "right": 16, "bottom": 0, "fill": "edge", "feather": 32}
    assert "mask" not in body
    job = outpaint(PHOTO, (0, 0, 16, 0), fill="edge", feather=32)
    raw = pipe.generate(
        "a field", image=job.image, mask_image=job.mask, strength=1.0, seed=5, width=80, height=64, **KW
    )
    assert np.array_equal(card_pixels(page), pixels(job.composite(raw)[0]))


def test_a_controlnet_unit_from_the_page_equals_the_library_with_that_controlnet(page, pipe, nets, tmp_path):
    from sd35m_mlx.loading.controlnet import load_controlnet

    control = Image.new("RGB", (64, 64))
    control.paste((255, 255, 255), (10, 20, 50, 24))
    control.save(tmp_path / "edges.png")
    page.click("#control-box summary")
    assert label(page, "Control model").locator("option").all_inner_texts() == ["edges"]
    label(page, "Control image").set_input_files(tmp_path / "edges.png")
    page.wait_for_selector("#control-thumb:not([hidden])")
    assert label(page, "Use ControlNet").is_checked()
    label(page, "Control scale").fill("0.7")
    label(page, "Control end").fill("0.5")
    fill_settings(page, steps=2, seed=4)
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        generate(page, "a house")
    page.wait_for_selector("#gallery .card img")
    unit = sent.value.post_data_json["alwayson_scripts"]["controlnet"]["args"][0]
    assert (unit["model"], unit["module"], unit["weight"], unit["guidance_end"]) == ("edges", "none", 0.7, 0.5)
    held = pipe.controlnets
    try:
        pipe.controlnets = [load_controlnet(nets["edges"])]
        want = pipe.generate("a house", control_image=control, controlnet_conditioning_scale=0.7,
                             control_guidance_end=0.5, seed=4, width=64, height=64, num_inference_steps=2)  # fmt: skip
    finally:
        pipe.controlnets = held
    assert np.array_equal(card_pixels(page), pixels(want[0]))


def test_canny_edges_previewed_then_used_equal_the_librarys_canny(page, pipe, nets, tmp_path):
    pytest.importorskip("cv2")
    from sd35m_mlx.editing.preprocess import canny
    from sd35m_mlx.loading.controlnet import load_controlnet

    picture = np.full((64, 64, 3), 30, np.uint8)
    picture[8:40, 10:30], picture[30:60, 34:60] = (200, 40, 40), (40, 200, 90)
    Image.fromarray(picture).save(tmp_path / "shapes.png")
    page.click("#control-box summary")
    label(page, "Control image").set_input_files(tmp_path / "shapes.png")
    label(page, "Preprocessor").select_option("canny")
    label(page, "Canny low").fill("50")
    label(page, "Canny high").fill("150")
    button(page, "Preview edges").click()
    page.wait_for_selector("#control-map:not([hidden])")
    edges = canny(Image.fromarray(picture), 50, 150)
    shown = page.get_attribute("#control-map", "src")
    assert np.array_equal(pixels(data_url_image(shown)), pixels(edges)) and edges.getextrema() != ((0, 0),) * 3
    fill_settings(page, steps=1, seed=8)
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        generate(page, "a cat")
    page.wait_for_selector("#gallery .card img")
    unit = sent.value.post_data_json["alwayson_scripts"]["controlnet"]["args"][0]
    assert (unit["module"], unit["threshold_a"], unit["threshold_b"]) == ("canny", 50, 150)
    held = pipe.controlnets
    try:
        pipe.controlnets = [load_controlnet(nets["edges"])]
        want = pipe.generate("a cat", control_image=edges, seed=8, width=64, height=64, **KW)
    finally:
        pipe.controlnets = held
    assert np.array_equal(card_pixels(page), pixels(want[0]))


def write_png(path, prompt: str, seed: int, mtime: float) -> None:
    info = PngInfo()
    info.add_text("parameters", f"{prompt}\nSteps: 3, Sampler: Euler a, Schedule type: Karras, CFG scale: 6, "
                                f"Seed: {seed}, Size: 64x64")  # fmt: skip
    Image.new("RGB", (64, 64), (seed, 2, 3)).save(path, format="PNG", pnginfo=info)
    os.utime(path, (mtime, mtime))


def test_history_across_a_restart_paged_filtered_reused_and_deleted(browser, pipe, folder):
    for saved in folder.iterdir():  # the other tests' images (before a page lists them)
        saved.unlink()
    for i in range(13):  # older images, from an earlier run
        write_png(folder / f"old-{i:02d}.png", f"a castle number {i}", seed=i + 1, mtime=1e9 + i)
    errors: list[str] = []
    with RunningServer(pipe, model_name="sd35m-tiny", output_dir=str(folder)) as before:
        first = open_page(browser, before.url, errors)
        try:
            first.wait_for_selector("body[data-ready]")
            fill_settings(first, steps=1, seed=21)
            generate(first, "a lighthouse")
            first.wait_for_selector("#history .card:has-text('a lighthouse')")  # saved, and listed newest first
            assert first.locator("#history .card .meta b").first.inner_text() == "a lighthouse"
        finally:
            first.context.close()
    with RunningServer(pipe, model_name="sd35m-tiny", output_dir=str(folder)) as again:  # restarted: same folder
        tab = open_page(browser, again.url, errors)
        try:
            tab.wait_for_selector("#history .card:has-text('a lighthouse')")
            assert tab.locator("#history .card").count() == 12 and "Page 1 of 2 (14 images)" in tab.inner_text(
                "#page-info"
            )
            button(tab, "Older").click()
            tab.wait_for_function("document.querySelectorAll('#history .card').length === 2")
            assert tab.locator("#history .card .meta b").all_inner_texts() == ["a castle number 1", "a castle number 0"]
            label(tab, "Filter history").fill("number 1")  # "number 1", "number 10" .. "number 12"
            tab.wait_for_function("document.querySelectorAll('#history .card').length === 4")
            assert button(tab, "Newer").is_disabled() and button(tab, "Older").is_disabled()
            card = tab.locator("#history .card", has_text="a castle number 12")
            card.get_by_role("button", name="Use these settings").click()
            values = [
                label(tab, n).input_value() for n in ("Prompt", "Seed", "Steps", "Guidance", "Sampler", "Scheduler")
            ]
            assert values == ["a castle number 12", "13", "3", "6", "Euler a", "karras"]
            assert card.get_by_role("link", name="Download").get_attribute("href") == "/studio/history/old-12.png"
            tab.once("dialog", lambda d: d.accept())
            card.get_by_role("button", name="Delete").click()
            tab.wait_for_function("document.querySelectorAll('#history .card').length === 3")
            assert not (folder / "old-12.png").exists() and (folder / "old-11.png").exists()
        finally:
            tab.context.close()
        assert errors == []


def test_switch_the_model_and_its_pixels_come_back(page, server, tiny_pipeline):
    from sd35m_mlx import StableDiffusion35

    assert label(page, "Model").locator("option").all_inner_texts() == ["sd35m-tiny", "tiny-random"]
    label(page, "Model").select_option("tiny-random")
    page.wait_for_function("document.getElementById('status').textContent === 'tiny-random is ready.'")
    assert json.loads(httpx.get(server.url + "/sdapi/v1/options").text)["sd_model_checkpoint"] == "tiny-random"
    assert label(page, "Width").get_attribute("max") == str(config(server)["max_width"])  # the new model's config
    fill_settings(page, steps=1, seed=6)
    generate(page, "a tree")
    page.wait_for_selector("#gallery .card img")
    want = StableDiffusion35.from_pretrained("tiny-random", dtype="float32").generate(
        "a tree", width=64, height=64, seed=6, **KW
    )[0]
    assert np.array_equal(card_pixels(page), pixels(want))
    label(page, "Model").select_option("sd35m-tiny")  # back, for whoever comes next
    page.wait_for_function("document.getElementById('status').textContent === 'sd35m-tiny is ready.'")
