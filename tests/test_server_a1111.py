"""The rest of A1111's API that clients call: png-info for our PNGs and A1111's, and the start-up endpoints
(webuiapi, SillyTavern, Open WebUI and Krita's plugin list these on connect and fail when one is missing)."""

import base64
import io
import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

pytest.importorskip("fastapi")


def _b64_png(text: dict | None = None) -> str:
    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


A1111_TEXT = (
    "a castle on a hill, (dramatic:1.2)\nNegative prompt: blurry\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, "
    'Model: sd3.5_medium, Lora hashes: "style: abc123", Version: v1.10.1'
)


def test_png_info_of_an_a1111_image(http):
    r = http.post("/sdapi/v1/png-info", json={"image": _b64_png({"parameters": A1111_TEXT, "extra": "x"})})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["info"] == A1111_TEXT and body["items"] == {"extra": "x"}
    p = body["parameters"]
    assert p["Prompt"] == "a castle on a hill, (dramatic:1.2)" and p["Negative prompt"] == "blurry"
    assert p["Steps"] == "30" and p["Sampler"] == "DPM++ 2M" and p["Schedule type"] == "Karras"
    assert (p["Size-1"], p["Size-2"]) == ("512", "768") and p["Lora hashes"] == "style: abc123"


def test_png_info_of_our_own_image(http):
    r = http.post("/sdapi/v1/txt2img", json={"prompt": "a red cube", "width": 64, "height": 64, "steps": 1, "seed": 5})
    info = http.post("/sdapi/v1/png-info", json={"image": r.json()["images"][0]}).json()
    assert info["parameters"]["Prompt"] == "a red cube" and info["parameters"]["Seed"] == "5"
    assert json.loads(info["items"]["sd35m-mlx"])["seed"] == 5  # our JSON chunk comes along in items


def test_png_info_bad_input_is_a_4xx(http):
    assert http.post("/sdapi/v1/png-info", json={"image": "not base64!"}).status_code == 400
    assert http.post("/sdapi/v1/png-info", json={}).status_code == 400
    assert (
        http.post("/sdapi/v1/png-info", content=b"[1]", headers={"Content-Type": "application/json"}).status_code == 400
    )
    empty = http.post("/sdapi/v1/png-info", json={"image": _b64_png()}).json()
    assert empty == {"info": "", "items": {}, "parameters": {}}


@pytest.mark.parametrize(
    "path, shape",
    [("/sdapi/v1/cmd-flags", dict), ("/sdapi/v1/upscalers", list), ("/sdapi/v1/latent-upscale-modes", list),
     ("/sdapi/v1/sd-vae", list), ("/sdapi/v1/hypernetworks", list), ("/sdapi/v1/face-restorers", list),
     ("/sdapi/v1/realesrgan-models", list), ("/sdapi/v1/prompt-styles", list), ("/sdapi/v1/embeddings", dict),
     ("/sdapi/v1/extensions", list), ("/sdapi/v1/script-info", list), ("/sdapi/v1/memory", dict)],
)  # fmt: skip
def test_startup_endpoints_answer_as_a1111(http, path, shape):
    r = http.get(path)
    assert r.status_code == 200 and isinstance(r.json(), shape), (path, r.text)


def test_webuiapi_startup_calls(server):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert api.get_prompt_styles() == [] and api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_cmd_flags()["api"] is True and api.get_memory()["ram"]["total"] > 0
    assert api.get_sd_vae() == [] and api.get_latent_upscale_modes() == []
    assert api.util_get_model_names() == [m["title"] for m in api.get_sd_models()]
    api.refresh_checkpoints()
