"""Inpainting through the server: OpenAI's `mask` (alpha 0 = edit) and A1111's `mask` fields (white = repaint,
`inpainting_mask_invert`, `mask_blur`, `inpaint_full_res` + padding, `inpainting_fill`), driven by the clients
apps use, pixel for pixel against `pipe.generate(image=..., mask_image=...)` with the converted mask (PNG is
lossless: exact equality). Bad masks are 4xx in each dialect's shape, and the server goes on serving.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image, ImageFilter, ImageOps  # noqa: E402

from tests.server_helpers import b64, pixels, png  # noqa: E402

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}
SOURCE = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def server_options():
    return dict(model_name="sd35m-tiny", max_body_bytes=1 << 20)


def alpha_mask(box, size=(64, 64), rgb=(0, 0, 0)) -> Image.Image:
    """OpenAI's kind of mask: opaque everywhere but `box` (left, top, right, bottom), fully transparent."""
    a = np.full((size[1], size[0]), 255, np.uint8)
    if box is not None:
        x1, y1, x2, y2 = box
        a[y1:y2, x1:x2] = 0
    rgba = np.dstack([np.full_like(a, c) for c in rgb] + [a])
    return Image.fromarray(rgba, "RGBA")


def white_mask(box, size=(64, 64)) -> Image.Image:
    """generate()'s (and A1111's) kind: white = repaint."""
    m = Image.new("L", size, 0)
    if box is not None:
        m.paste(255, box)
    return m


# --- the clients apps use, pixel for pixel -----------------------------------------------------------


def test_openai_client_edit_with_mask_equals_pipeline_inpaint(server, pipe):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    box = (8, 16, 40, 56)  # not square, not centred
    mask = alpha_mask(box, rgb=(255, 255, 255))  # its colour is irrelevant: only alpha 0 marks the edit
    want_mask = white_mask(box)

    r = client.images.edit(
        image=("in.png", png(SOURCE), "image/png"),
        mask=("mask.png", png(mask), "image/png"),
        prompt="a green door",
        size="64x64",
        extra_body={"seed": 5, "steps": 2, "strength": 0.8},
    )
    want = pipe.generate("a green door", image=SOURCE, mask_image=want_mask, strength=0.8, seed=5, **SMALL)[0]
    assert np.array_equal(pixels(r.data[0].b64_json), pixels(want))
    img2img = pipe.generate("a green door", image=SOURCE, strength=0.8, seed=5, **SMALL)[0]
    assert not np.array_equal(pixels(want), pixels(img2img))  # the mask matters on this fixture

    # without `strength`, a masked edit repaints from scratch (OpenAI's transparent region has no content);
    # 4 steps, where strength 0.6 (img2img's default) would skip one
    r = client.images.edit(image=("in.png", png(SOURCE), "image/png"), mask=("mask.png", png(mask), "image/png"),
                           prompt="a green door", size="64x64", extra_body={"seed": 6, "steps": 4})  # fmt: skip
    want = pipe.generate("a green door", image=SOURCE, mask_image=want_mask, strength=1.0, seed=6,
                         **{**SMALL, "num_inference_steps": 4})[0]  # fmt: skip
    assert np.array_equal(pixels(r.data[0].b64_json), pixels(want))


def test_webuiapi_img2img_with_mask_equals_pipeline_inpaint(server, pipe):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler")
    mask = white_mask((20, 4, 52, 36))
    r = api.img2img(
        images=[SOURCE],
        mask_image=mask,
        inpainting_mask_invert=1,  # repaint what is black
        mask_blur=3,
        inpaint_full_res=True,  # "only masked" -> padding_mask_crop
        inpaint_full_res_padding=6,
        inpainting_fill=1,  # "original": what we run
        prompt="a cat",
        width=64,
        height=64,
        steps=2,
        seed=8,
        denoising_strength=0.7,
    )
    # A1111's steps: binarise (> 128), invert, Gaussian blur of mask_blur px
    want_mask = ImageOps.invert(mask).filter(ImageFilter.GaussianBlur(3))
    want = pipe.generate("a cat", image=SOURCE, mask_image=want_mask, padding_mask_crop=6, strength=0.7, seed=8,
                         guidance_scale=7.0, **SMALL)[0]  # fmt: skip
    assert np.array_equal(pixels(r.image), pixels(want))
    assert r.info["warnings"] == []


def test_a1111_whole_picture_inpaint_and_other_fills_are_said_in_info(server, pipe, http):
    mask = white_mask((0, 0, 40, 24))
    body = {"prompt": "a cat", "init_images": [b64(png(SOURCE))], "mask": b64(png(mask)), "mask_blur": 0,
            "inpaint_full_res": 0, "inpainting_fill": 2, "width": 64, "height": 64, "steps": 2, "seed": 9,
            "denoising_strength": 0.9}  # fmt: skip
    r = http.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    want = pipe.generate("a cat", image=SOURCE, mask_image=mask, strength=0.9, seed=9, guidance_scale=4.5, **SMALL)
    assert np.array_equal(pixels(r.json()["images"][0]), pixels(want[0]))
    warnings = json.loads(r.json()["info"])["warnings"]
    assert len(warnings) == 1 and "latent noise" in warnings[0] and "original" in warnings[0]
    assert "mask" not in r.json()["parameters"]  # the mask is not echoed back (as init_images)


def test_a1111_mask_blur_per_axis_and_its_default(server, pipe, http):
    """mask_blur_x / mask_blur_y (A1111 >= 1.4) blur each axis; without any, A1111's default 4 px."""
    mask = white_mask((16, 20, 48, 44))
    body = {"prompt": "a cat", "init_images": [b64(png(SOURCE))], "mask": b64(png(mask)), "inpaint_full_res": True,
            "inpaint_full_res_padding": 4, "inpainting_fill": 1, "width": 64, "height": 64, "steps": 2, "seed": 2,
            "denoising_strength": 0.9}  # fmt: skip
    for blur, extra in (((5, 1), {"mask_blur_x": 5, "mask_blur_y": 1}), (4, {})):
        r = http.post("/sdapi/v1/img2img", json={**body, **extra})
        assert r.status_code == 200, r.text
        want = pipe.generate("a cat", image=SOURCE, mask_image=mask.filter(ImageFilter.GaussianBlur(blur)),
                             padding_mask_crop=4, strength=0.9, seed=2, **SMALL)[0]  # fmt: skip
        assert np.array_equal(pixels(r.json()["images"][0]), pixels(want)), blur


# --- bad masks: 4xx in each dialect's shape, and the server goes on -----------------------------------


def bomb_png(side: int = 100_000) -> bytes:
    """A valid PNG header claiming side x side RGBA pixels."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


RGBA_TINY = alpha_mask((3, 3, 4, 4))  # one transparent pixel: no 8x8 latent cell samples it (generate's own check)
OPENAI_BAD = [
    (png(alpha_mask((0, 0, 8, 8), size=(32, 64))), 400, "same size as the image"),
    (b"not an image", 400, "not an image"),
    (png(white_mask((0, 0, 32, 32))), 400, "no alpha channel"),  # white = repaint: not OpenAI's convention
    (png(alpha_mask(None)), 400, "marks nothing to repaint"),  # fully opaque: nothing to edit
    (png(RGBA_TINY), 400, "latent cell"),
    (bomb_png(), 413, "too large"),
]


@pytest.mark.parametrize("mask,status,message", OPENAI_BAD, ids=[c[2] for c in OPENAI_BAD])
def test_openai_bad_mask(server, http, mask, status, message):
    files = [("image", ("in.png", png(SOURCE), "image/png")), ("mask", ("mask.png", mask, "image/png"))]
    r = http.post("/v1/images/edits", data={"prompt": "p", "size": "64x64", "steps": "1"}, files=files)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["param"] == "mask"
    assert http.get("/health").json()["status"] == "ok"


def test_openai_mask_as_a_text_field_is_refused(server, http):
    files = [("image", ("in.png", png(SOURCE), "image/png"))]
    r = http.post("/v1/images/edits", data={"prompt": "p", "size": "64x64", "mask": "abc"}, files=files)
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask"


A1111_BAD = [
    ({"mask": b64(png(white_mask((0, 0, 8, 8), size=(64, 48))))}, "same size as the image"),
    ({"mask": b64(b"hello")}, "not an image"),
    ({"mask": "%%% not base64 %%%"}, "not valid base64"),
    ({"mask": b64(png(white_mask(None)))}, "all black"),
    ({"mask": b64(png(white_mask((0, 0, 64, 64)))), "inpainting_mask_invert": 1}, "after inpainting_mask_invert"),
    ({"mask": b64(png(white_mask((0, 0, 8, 8)))), "mask_blur": -1}, "mask_blur must be between"),
    ({"mask": b64(png(white_mask((0, 0, 8, 8)))), "inpaint_full_res_padding": -4}, "inpaint_full_res_padding"),
    ({"mask": b64(png(white_mask((0, 0, 8, 8)))), "inpaint_full_res_padding": 10**6}, "inpaint_full_res_padding"),
]


@pytest.mark.parametrize("fields,message", A1111_BAD, ids=[c[1] for c in A1111_BAD])
def test_a1111_bad_mask(server, http, fields, message):
    body = {"prompt": "p", "init_images": [b64(png(SOURCE))], "width": 64, "height": 64, "steps": 1, **fields}
    r = http.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error", "detail", "body", "errors"} and message in r.json()["detail"]
    assert http.get("/health").json()["status"] == "ok"


def test_the_server_inpaints_after_bad_masks(server, http):
    files = [
        ("image", ("in.png", png(SOURCE), "image/png")),
        ("mask", ("m.png", png(alpha_mask((0, 0, 32, 32))), "image/png")),
    ]
    for bad in (b"junk", png(alpha_mask(None))):
        bad_files = [files[0], ("mask", ("m.png", bad, "image/png"))]
        assert (
            http.post(
                "/v1/images/edits", data={"prompt": "p", "size": "64x64", "steps": "1"}, files=bad_files
            ).status_code
            == 400
        )
    r = http.post("/v1/images/edits", data={"prompt": "p", "size": "64x64", "steps": "1"}, files=files)
    assert r.status_code == 200 and len(r.json()["data"]) == 1


# --- the conversions themselves ----------------------------------------------------------------------


def test_mask_conversions_read_every_kind_of_transparency():
    from sd35m_mlx.server.masks import a1111_mask, openai_mask

    want = np.asarray(white_mask((8, 16, 40, 56)))
    la = alpha_mask((8, 16, 40, 56)).convert("LA")
    palette = Image.fromarray(np.where(want == 255, 0, 1).astype(np.uint8), "P")  # index 0 is transparent
    palette.putpalette([0, 0, 0, 255, 255, 255])
    palette.info["transparency"] = 0
    for im in (alpha_mask((8, 16, 40, 56)), la, palette):
        assert np.array_equal(np.asarray(openai_mask(png(im), (64, 64))), want), im.mode
    # A1111: white repaints; a mask with transparency repaints where it is opaque (Gradio's sketch layer)
    assert np.array_equal(np.asarray(a1111_mask(png(white_mask((8, 16, 40, 56))), (64, 64))), want)
    strokes = np.zeros((64, 64, 4), np.uint8)
    strokes[16:56, 8:40] = (255, 0, 0, 255)  # opaque red strokes on a transparent canvas
    assert np.array_equal(np.asarray(a1111_mask(png(Image.fromarray(strokes, "RGBA")), (64, 64))), want)
    inverted = a1111_mask(png(white_mask((8, 16, 40, 56))), (64, 64), invert=True)
    assert np.array_equal(np.asarray(inverted), 255 - want)


# --- generate()'s own argument checks run before a job is queued --------------------------------------


@pytest.mark.parametrize("route", ["openai", "a1111"])
def test_an_argument_only_validate_generation_refuses_is_4xx_before_queueing(server, http, pipe, monkeypatch, route):
    """strength 1e-20 passes the server's own range check (0, 1] but runs no step: `validate_generation`
    refuses it in Server.check, so the job never reaches the worker (generate is never called)."""
    calls = []
    monkeypatch.setattr(pipe, "generate", lambda *a, **k: calls.append(k) or [SOURCE])
    if route == "openai":
        files = [("image", ("in.png", png(SOURCE), "image/png"))]
        r = http.post("/v1/images/edits", data={"prompt": "p", "size": "64x64", "steps": "1", "strength": "1e-20"},
                      files=files)  # fmt: skip
        assert r.status_code == 400 and "too small" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "strength"
    else:
        body = {"prompt": "p", "init_images": [b64(png(SOURCE))], "width": 64, "height": 64, "steps": 1,
                "denoising_strength": 1e-20}  # fmt: skip
        r = http.post("/sdapi/v1/img2img", json=body)
        assert r.status_code == 400 and "too small" in r.json()["detail"], r.text
    assert calls == []  # refused before queueing, not by the worker's generate call
