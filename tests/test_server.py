"""`sd35m-mlx serve`: a real uvicorn server on the tiny fixture, driven by the clients apps use.

The official `openai` client and the A1111 client `webuiapi` must get the very pixels `pipe.generate`
gives for the same seed (PNG is lossless: exact equality, no tolerance). Long runs (thousands of 64 px
steps, minutes if left alone) are only ever cancelled, so every test stays short; every wait is bounded.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from sd35m_mlx import StableDiffusion35  # noqa: E402
from sd35m_mlx.server.spec import Limits  # noqa: E402
from tests.server_helpers import RunningServer, b64, pixels, png, wait_until  # noqa: E402

LONG = 1000  # steps: ~40 s at 64 px here; long enough to be caught running, never run to the end (and the
# schedule's per-step modulations, precomputed before step 1, stay quick to build)
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server_options():
    return dict(model_name="sd35m-tiny", limits=Limits(max_steps=LONG), max_body_bytes=1 << 20)


def start_in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["result"] = fn(*args, **kwargs)
        except Exception as e:  # handed to the test to assert on
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def running_step(http) -> int:
    return http.get("/sdapi/v1/progress").json()["state"]["sampling_step"]


# --- the clients apps use, pixel for pixel --------------------------------------------------------


def test_openai_client_generate_equals_pipeline(server, pipe, http):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.images.generate(
        prompt="a red cube",
        size="64x64",
        n=2,
        model="dall-e-3",
        quality="hd",  # OpenAI fields we do not use are ignored
        extra_body={"seed": 11, "steps": 2, "negative_prompt": "blurry", "guidance_scale": 3.0},
    )
    assert len(r.data) == 2 and r.model == "dall-e-3"  # accepted and echoed, never loaded
    for item, seed in zip(r.data, (11, 12), strict=True):
        want = pipe.generate("a red cube", negative_prompt="blurry", guidance_scale=3.0, seed=seed, **SMALL)[0]
        assert np.array_equal(pixels(item.b64_json), pixels(want))

    # response_format="url": served from the server's own output folder
    extensions = {"seed": 11, "steps": 2, "negative_prompt": "blurry", "guidance_scale": 3.0}
    r = client.images.generate(prompt="a red cube", size="64x64", response_format="url", extra_body=extensions)
    got = http.get(r.data[0].url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    want = pipe.generate("a red cube", negative_prompt="blurry", guidance_scale=3.0, seed=11, **SMALL)[0]
    assert np.array_equal(pixels(Image.open(io.BytesIO(got.content))), pixels(want))


def test_openai_client_edit_equals_pipeline_img2img(server, pipe):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8))
    r = client.images.edit(
        image=("in.png", png(source), "image/png"),
        prompt="in watercolor",
        size="64x64",
        extra_body={"seed": 5, "steps": 2, "strength": 0.5},
    )
    want = pipe.generate("in watercolor", image=source, strength=0.5, seed=5, **SMALL)[0]
    assert np.array_equal(pixels(r.data[0].b64_json), pixels(want))


def test_edits_without_size_generate_at_the_image_size(server, http):
    source = Image.new("RGB", (256, 272), (10, 200, 30))  # in the trained range: its own size (pixels: test above)
    r = http.post("/v1/images/edits", data={"prompt": "p", "steps": "1", "seed": "4"},
                  files=[("image", ("in.png", png(source), "image/png"))])  # fmt: skip
    assert r.json()["size"] == "256x272"
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).size == (256, 272)


def test_webuiapi_default_payload_equals_pipeline(server, pipe):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)  # default sampler "Euler a", scheduler automatic
    r = api.txt2img(prompt="a blue ball", width=64, height=64, steps=2, seed=21, cfg_scale=5.0, batch_size=2)
    assert r.info["all_seeds"] == [21, 22]
    assert r.info["warnings"] == [] and r.info["sampler_name"] == "Euler a"  # run as asked
    for image, seed in zip(r.images, (21, 22), strict=True):
        want = pipe.generate("a blue ball", guidance_scale=5.0, seed=seed, sampler="euler_ancestral", **SMALL)[0]
        assert np.array_equal(pixels(image), pixels(want))
        start = "a blue ball\nSteps: 2, Sampler: Euler a, Schedule type: Normal, CFG scale: 5.0"
        assert image.text["parameters"].startswith(start)
        assert json.loads(image.text["sd35m-mlx"])["seed"] == seed

    r = api.txt2img(prompt="a blue ball", width=64, height=64, steps=2, seed=3, sampler_name="DPM++ 2M")
    assert r.info["warnings"] == [] and r.info["sampler_name"] == "DPM++ 2M"
    want = pipe.generate("a blue ball", guidance_scale=7.0, seed=3, sampler="dpmpp_2m", **SMALL)[0]
    assert np.array_equal(pixels(r.image), pixels(want))


def test_webuiapi_img2img_equals_pipeline(server, pipe):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler")
    source = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    r = api.img2img(images=[source], prompt="a fox", width=64, height=64, steps=2, seed=8, denoising_strength=0.6)
    want = pipe.generate("a fox", image=source, strength=0.6, seed=8, guidance_scale=7.0, **SMALL)[0]
    assert np.array_equal(pixels(r.image), pixels(want))
    assert r.info["denoising_strength"] == 0.6


@pytest.mark.parametrize(
    "fields, sampler, scheduler",
    [
        ({"sampler_name": "DPM++ 2M Karras"}, "dpmpp_2m", "karras"),  # A1111's old style: the schedule folded in
        ({"sampler_name": "UniPC", "scheduler": "SGM Uniform"}, "uni_pc", "sgm_uniform"),
        ({"sampler_name": "LCM", "scheduler": "Automatic"}, "lcm", "normal"),
        ({"sampler_name": "Heun", "scheduler": "karras"}, "heun", "karras"),
        ({"sampler_name": "DDIM", "scheduler": "DDIM"}, "ddim", "ddim_uniform"),
        ({"sampler_name": "dpmpp_2m_sde", "scheduler": "Exponential"}, "dpmpp_2m_sde", "exponential"),
    ],
)
def test_a1111_sampler_and_scheduler_labels_map_to_ours(fields, sampler, scheduler):
    from sd35m_mlx.server.a1111_api import map_sampler

    assert map_sampler(fields.get("sampler_name"), fields.get("scheduler")) == (sampler, scheduler)


def test_a1111_unknown_sampler_or_scheduler_is_a_400_naming_ours(server, http):
    base = {"prompt": "p", "width": 64, "height": 64, "steps": 1}
    r = http.post("/sdapi/v1/txt2img", json={**base, "sampler_name": "DPM fast"})
    assert r.status_code == 400 and "unknown sampler 'DPM fast'" in r.text and "Euler a" in r.text
    r = http.post("/sdapi/v1/txt2img", json={**base, "scheduler": "Align Your Steps"})
    assert r.status_code == 400 and "unknown scheduler 'Align Your Steps'" in r.text and "Karras" in r.text


def test_openai_sampling_extensions(server, pipe, http):
    body = {"prompt": "p", "size": "64x64", "steps": 2, "seed": 9, "sampler": "euler_ancestral"}
    body |= {"scheduler": "karras", "shift": 2.0, "rng": "nv"}
    r = http.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    kw = dict(width=64, height=64, num_inference_steps=2, guidance_scale=4.5)
    want = pipe.generate("p", seed=9, sampler="euler_ancestral", scheduler="karras", shift=2.0, rng="nv", **kw)[0]
    assert np.array_equal(pixels(r.json()["data"][0]["b64_json"]), pixels(want))
    assert http.post("/v1/images/generations", json={**body, "shift": 0}).status_code in (400, 422)
    assert http.post("/v1/images/generations", json={**body, "rng": "gpu"}).status_code in (400, 422)


def test_a1111_random_seed_is_reported(server, pipe, http):
    r = http.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 64, "height": 64, "steps": 1, "seed": -1})
    seed = json.loads(r.json()["info"])["seed"]
    want = pipe.generate("p", guidance_scale=4.5, seed=seed, width=64, height=64, num_inference_steps=1)[0]
    assert np.array_equal(pixels(r.json()["images"][0]), pixels(want))


def test_every_field_real_clients_send_is_accepted(server, http):
    payload = {
        "prompt": "p", "width": 64, "height": 64, "steps": 1, "enable_hr": True, "hr_scale": 2,
        "hr_upscaler": "Latent", "hr_checkpoint_name": "/etc/passwd", "subseed": 4, "subseed_strength": 0.3,
        "restore_faces": True, "tiling": True, "script_name": "x/y/z plot", "script_args": [1, "a"],
        "alwayson_scripts": {"ControlNet": {"args": []}, "ADetailer": {"args": []}},  # ControlNet: acted on
        "override_settings": {"CLIP_stop_at_last_layers": 2},
        "sampler_name": "DPM++ 2M SDE", "scheduler": "Karras", "styles": ["s"], "eta": 1.0, "s_churn": 0,
        "send_images": True, "save_images": True, "some_future_field": {"nested": [1, 2]},
    }  # fmt: skip
    r = http.post("/sdapi/v1/txt2img", json=payload)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["sd_model_name"] == "sd35m-tiny"  # (an unknown sd_model_checkpoint is a 400: test_server_a1111.py)
    assert not any("DPM++ 2M SDE" in w or "Karras" in w for w in info["warnings"])  # both run
    assert info["sampler_name"] == "DPM++ 2M SDE" and "Schedule type: Karras" in info["infotexts"][0]
    assert r.json()["parameters"]["some_future_field"] == {"nested": [1, 2]}
    ignored = {w.split("=")[0] for w in info["warnings"] if w.endswith("is not supported here; ignored")}
    assert not any("Latent" in w for w in info["warnings"])  # A1111's Latent upscaler runs (server/hires.py)
    assert ignored == {"hr_checkpoint_name", "subseed", "subseed_strength",
                       "restore_faces", "tiling", "script_name", "script_args", "alwayson_scripts",
                       "override_settings.CLIP_stop_at_last_layers", "styles", "some_future_field"}  # fmt: skip
    quiet = {**payload, "subseed": -1, "tiling": False, "styles": [], "alwayson_scripts": {}, "enable_hr": False}
    quiet = {
        k: v
        for k, v in quiet.items()
        if k
        in (
            "prompt",
            "width",
            "height",
            "steps",
            "subseed",
            "tiling",
            "styles",
            "alwayson_scripts",
            "enable_hr",
            "send_images",
        )
    }
    assert json.loads(http.post("/sdapi/v1/txt2img", json=quiet).json()["info"])["warnings"] == []


def test_info_endpoints(server, http):
    assert http.get("/health").json()["status"] == "ok"
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["sd35m-tiny"]
    assert [m["model_name"] for m in http.get("/sdapi/v1/sd-models").json()] == ["sd35m-tiny"]
    samplers = http.get("/sdapi/v1/samplers").json()
    assert len(samplers) == 18 and samplers[:2] == [
        {"name": "Euler", "aliases": ["euler", "k_euler"], "options": {}},
        {"name": "Euler a", "aliases": ["euler_ancestral", "k_euler_ancestral"], "options": {}},
    ]
    schedulers = {s["name"]: s for s in http.get("/sdapi/v1/schedulers").json()}
    assert len(schedulers) == 9 and schedulers["karras"]["label"] == "Karras"
    assert set(schedulers["normal"]) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    r = http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "/some/other.safetensors"})
    assert r.status_code == 400 and "the choices: sd35m-tiny" in r.text
    assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd35m-tiny", "x": 1}).status_code == 200
    assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "sd35m-tiny"  # read-only
    page = http.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()


# --- progress, interrupt, queue, disconnect --------------------------------------------------------


def test_progress_during_a_run_and_interrupt(server, http, monkeypatch):
    from sd35m_mlx.server.jobs import Job

    finish = Job.finish

    def slow_finish(job, *args, **kwargs):  # the worker thread lags after the answer, as under heavy load
        finish(job, *args, **kwargs)
        time.sleep(1.0)

    monkeypatch.setattr(Job, "finish", slow_finish)
    body = {"prompt": "p", "width": 64, "height": 64, "steps": LONG, "seed": 1, "batch_size": 2}
    t, out = start_in_thread(http.post, "/sdapi/v1/txt2img", json=body)
    wait_until(lambda: running_step(http) >= 2, what="steps to run")
    p = http.get("/sdapi/v1/progress").json()
    assert 0 < p["progress"] < 0.5 and p["eta_relative"] > 0  # step k of 5000 on image 1 of 2
    assert p["state"]["sampling_steps"] == LONG and p["state"]["job_count"] == 2 and p["state"]["job_no"] == 0
    preview = Image.open(io.BytesIO(base64.b64decode(p["current_image"])))  # the live x0 preview (latent size)
    assert preview.size == (64 // 8, 64 // 8) and preview.mode == "RGB"
    assert http.post("/sdapi/v1/interrupt").status_code == 200
    t.join(60)
    assert not t.is_alive()
    r = out["result"]
    # A1111: an interrupted job answers the image as it stood (its current latents, decoded), not nothing
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    partial = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert partial.size == (64, 64) and np.asarray(partial).std() > 0  # decoded pixels, not a blank
    assert json.loads(r.json()["info"])["interrupted"] is True
    # answered, so idle to the client at once, even while the worker thread has not yet let go of the job
    assert server.worker.current is not None and http.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_an_interrupted_openai_request_is_409(server, http):
    t, out = start_in_thread(http.post, "/v1/images/generations", json={"prompt": "p", "size": "64x64", "steps": LONG})
    wait_until(lambda: running_step(http) >= 1, what="the job to run")
    http.post("/sdapi/v1/interrupt")
    t.join(60)
    r = out["result"]
    assert r.status_code == 409 and "interrupted" in r.json()["error"]["message"]


def test_url_images_expire_after_an_hour_and_only_ours(server, http):
    folder = server.app.state.server.url_dir  # a temporary folder, apart from the history (test_server_studio.py)
    old, other = folder / ("a" * 32 + ".png"), folder / "notes.txt"
    old.write_bytes(b"x"), other.write_text("keep")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    r = http.post("/v1/images/generations", json={"prompt": "p", "size": "64x64", "steps": 1, "response_format": "url"})
    assert http.get(r.json()["data"][0]["url"]).status_code == 200
    assert not old.exists() and other.exists()


def test_a_url_image_expiring_between_the_look_and_the_answer_is_never_a_500(server, http, monkeypatch):
    path = server.app.state.server.url_dir / ("b" * 32 + ".png")
    path.write_bytes(b"png bytes")
    real_stat = os.stat

    def stat_then_expire(p, *args, **kwargs):  # the first look at the file, then the hourly clean-up removes it
        st = real_stat(p, *args, **kwargs)
        if os.fspath(p) == os.fspath(path) and path.exists():
            path.unlink()
        return st

    monkeypatch.setattr(os, "stat", stat_then_expire)
    r = http.get(f"/v1/images/files/{path.name}")
    assert (r.status_code, r.content) == (200, b"png bytes") or r.status_code == 404


@pytest.mark.parametrize("fmt,pil,media", [("jpeg", "JPEG", "image/jpeg"), ("webp", "WEBP", "image/webp")])
def test_output_format_jpeg_and_webp_as_b64_and_url(server, http, fmt, pil, media):
    from sd35m_mlx.record import stored_text

    body = {"prompt": "p", "size": "64x64", "steps": 1, "seed": 3, "output_format": fmt}
    r = http.post("/v1/images/generations", json=body)
    assert r.status_code == 200 and r.json()["output_format"] == fmt
    best = base64.b64decode(r.json()["data"][0]["b64_json"])
    with Image.open(io.BytesIO(best)) as im:
        assert im.format == pil and im.size == (64, 64)
        assert "Seed: 3" in stored_text(im)["parameters"]  # the settings travel in EXIF
    r = http.post("/v1/images/generations", json={**body, "output_compression": 10, "response_format": "url"})
    image = http.get(r.json()["data"][0]["url"])
    assert image.headers["content-type"] == media and r.json()["data"][0]["url"].endswith(f".{fmt}")
    assert Image.open(io.BytesIO(image.content)).format == pil and len(image.content) < len(best)


def test_queue_full_is_503_with_retry_after(pipe):
    with RunningServer(pipe, max_queue=1, limits=Limits(max_steps=LONG)) as s:
        with httpx.Client(base_url=s.url, timeout=60) as http:
            long = {"prompt": "p", "size": "64x64", "steps": LONG}
            t1, out1 = start_in_thread(http.post, "/v1/images/generations", json=long)
            wait_until(lambda: s.worker.current is not None, what="the first job to run")
            t2, out2 = start_in_thread(http.post, "/v1/images/generations", json={**long, "steps": 1, "seed": 2})
            wait_until(lambda: s.worker.queued == 1, what="the second job to queue")
            r = http.post("/v1/images/generations", json=long)
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "server_error"
            assert http.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 64, "height": 64}).status_code == 503
            s.worker.interrupt()  # the long job ends; the queued one runs
            t1.join(60), t2.join(60)
            assert out2["result"].status_code == 200 and out2["result"].json()["data"][0]["seed"] == 2


def test_client_disconnect_cancels_its_job(server, http):
    long = {"prompt": "p", "size": "64x64", "steps": LONG}
    for _ in range(2):  # the second time it waits behind the first: a queued job leaves the queue too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/images/generations", json=long, timeout=httpx.Timeout(60, read=1.0))
    wait_until(lambda: server.worker.current is None and server.worker.queued == 0, 20, what="jobs cancelled")
    r = http.post("/v1/images/generations", json={"prompt": "p", "size": "64x64", "steps": 1})
    assert r.status_code == 200  # and the server goes on


def test_disconnect_of_a_queued_client_frees_its_slot(server, http):
    long = {"prompt": "p", "size": "64x64", "steps": LONG}
    t, out = start_in_thread(http.post, "/v1/images/generations", json=long)
    wait_until(lambda: server.worker.current is not None, what="a running job")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/images/generations", json=long, timeout=httpx.Timeout(60, read=1.0))
    wait_until(lambda: server.worker.queued == 0, 20, what="the queued job to leave")
    assert server.worker.current is not None  # the other client's job runs on
    server.worker.interrupt()
    t.join(60)


# --- auth -------------------------------------------------------------------------------------------


def test_api_key(pipe):
    with RunningServer(pipe, api_key="s3cret") as s:
        with httpx.Client(base_url=s.url, timeout=60) as http:
            assert http.get("/health").status_code == 200  # open
            assert http.get("/").status_code == 200  # the page is static; its calls carry the key
            for path, kind in (("/studio.css", "text/css"), ("/studio.js", "text/javascript")):  # and its files
                assert http.get(path).status_code == 200 and http.get(path).headers["content-type"].startswith(kind)
            assert http.get("/studio.py", headers={"Authorization": "Bearer s3cret"}).status_code == 404
            for path in ("/v1/models", "/sdapi/v1/progress", "/sdapi/v1/sd-models"):
                assert http.get(path).status_code == 401
                assert http.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
                assert http.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
            r = http.post("/v1/images/generations", json={"prompt": "p"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert http.post("/sdapi/v1/txt2img", json={"prompt": "p"}).json()["detail"].startswith("a valid API key")
            assert http.get("/sdapi/v1/progress", auth=("any", "s3cret")).status_code == 200  # A1111 --api-auth style

        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert len(client.images.generate(prompt="p", size="64x64", extra_body={"steps": 1}).data) == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="nope", max_retries=0).models.list()


# --- bad input: 4xx in each dialect's shape, and the server goes on ----------------------------------


def bomb_png(side: int = 100_000) -> bytes:
    """A valid PNG header claiming side x side pixels: a few bytes that would decode to 3 x side^2 bytes."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


GOOD_PNG = png(Image.new("RGB", (64, 64), (200, 10, 10)))
OPENAI_BAD = [
    ({"prompt": "p", "size": "100x64"}, 400, "width", "multiple of 16"),
    ({"prompt": "p", "size": "64x64", "steps": 0}, 400, "steps", "steps must be between 1"),
    ({"prompt": "p", "size": "big"}, 400, "size", "WIDTHxHEIGHT"),
    ({"prompt": "p", "size": "64x64", "n": 0}, 400, "n", "n must be between 1"),
    ({"prompt": "p", "size": "64x64", "seed": -5}, 400, "seed", "seed must be between"),
    ({"prompt": "p", "size": "64x64", "guidance_scale": "nan"}, 400, "guidance_scale", "guidance scale"),
    ({"prompt": "p", "size": "64x64", "response_format": "gif"}, 400, "response_format", "b64_json"),
    ({"prompt": "p", "size": "64x64", "output_format": "gif"}, 400, "output_format", "webp"),
    ({"prompt": "p", "size": "64x64", "output_compression": 101}, 400, "output_compression", "100"),
    ({"size": "64x64"}, 400, "prompt", "prompt is required"),
    ({"prompt": "p", "size": "64x64", "stream": True}, 400, "stream", "streaming"),
    ({"prompt": "p" * 20_001, "size": "64x64"}, 400, "prompt", "too long"),
]


@pytest.mark.parametrize("body,status,param,message", OPENAI_BAD, ids=[c[3] for c in OPENAI_BAD])
def test_openai_bad_input(server, http, body, status, param, message):
    r = http.post("/v1/images/generations", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"] and err["type"] == "invalid_request_error"


EDITS_BAD = [
    ({"prompt": "p", "strength": "1.5"}, [("image", GOOD_PNG)], 400, "strength must be in (0, 1]"),
    ({"prompt": "p", "strength": "0"}, [("image", GOOD_PNG)], 400, "strength must be in (0, 1]"),
    ({"prompt": "p"}, [("image", b"not an image at all")], 400, "not an image"),
    ({"prompt": "p"}, [("image", bomb_png())], 413, "too large"),
    ({"prompt": "p"}, [("image", bomb_png(5000))], 413, "too large"),  # under Pillow's own limit, over ours
    ({"prompt": "p"}, [], 400, "image is required"),
    ({"prompt": "p", "size": "72x64"}, [("image", GOOD_PNG)], 400, "multiple of 16"),
]


@pytest.mark.parametrize("fields,files,status,message", EDITS_BAD, ids=[c[3] for c in EDITS_BAD])
def test_openai_edits_bad_input(server, http, fields, files, status, message):
    multipart = [(name, (f"{name}.png", data, "image/png")) for name, data in files] or [("x", ("x", b"", "a/b"))]
    r = http.post("/v1/images/edits", data={"steps": "1", "size": "64x64", **fields}, files=multipart)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


A1111_BAD = [
    ("txt2img", {"width": 100, "height": 64}, 400, "multiple of 16"),
    ("txt2img", {"steps": 0}, 400, "steps must be between"),
    ("txt2img", {"steps": "many"}, 422, "steps"),
    ("txt2img", {"batch_size": 5, "n_iter": 5}, 400, "batch_size must be between"),
    ("img2img", {"init_images": [b64(GOOD_PNG)], "denoising_strength": 1.5}, 400, "strength must be in (0, 1]"),
    ("img2img", {"init_images": ["%%% not base64 %%%"]}, 400, "not valid base64"),
    ("img2img", {"init_images": [b64(b"hello")]}, 400, "not an image"),
    ("img2img", {"init_images": ["data:image/png;base64," + b64(bomb_png())]}, 413, "too large"),
    ("img2img", {"init_images": [b64(bomb_png(5000))]}, 413, "5000x5000 pixels"),
    ("img2img", {}, 400, "init_images is required"),
]


@pytest.mark.parametrize("route,fields,status,message", A1111_BAD, ids=[f"{c[0]}-{c[3]}" for c in A1111_BAD])
def test_a1111_bad_input(server, http, route, fields, status, message):
    r = http.post(f"/sdapi/v1/{route}", json={"prompt": "p", "width": 64, "height": 64, "steps": 1, **fields})
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail", "body", "errors"} and message in body["detail"]


def test_body_size_limit_is_413(server, http):
    big = {"prompt": "p", "init_images": ["A" * (2 << 20)]}  # over the 1 MiB limit this server was given
    r = http.post("/sdapi/v1/img2img", json=big)
    assert r.status_code == 413 and "too large" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    r = http.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_our_own_fault_is_500_and_the_server_goes_on(server, http, pipe, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated fault")

    monkeypatch.setattr(pipe, "generate", broken)
    r = http.post("/v1/images/generations", json={"prompt": "p", "size": "64x64", "steps": 1})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert http.post("/v1/images/generations", json={"prompt": "p", "size": "64x64", "steps": 1}).status_code == 200


def test_no_request_names_a_path_or_a_model(server, http, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a request made the server load a model")

    monkeypatch.setattr(StableDiffusion35, "from_pretrained", no_loading)
    r = http.post("/v1/images/generations", json={"prompt": "p", "size": "64x64", "steps": 1, "model": "/etc/passwd"})
    assert r.status_code == 200 and r.json()["model"] == "/etc/passwd"  # echoed, nothing else
    override = {"sd_model_checkpoint": "../../x.safetensors"}
    r = http.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 64, "height": 64, "steps": 1,
                                            "override_settings": override})  # fmt: skip
    assert r.status_code == 400 and "the choices: sd35m-tiny" in r.text  # only titles listed at start
    for name in ("..%2F..%2Fetc%2Fpasswd", "../server.py", "0" * 32 + ".png"):
        assert http.get(f"/v1/images/files/{name}").status_code == 404


# --- the command --------------------------------------------------------------------------------------


def test_serve_without_the_extra_says_how_to_install(monkeypatch):
    import importlib.util

    from click.testing import CliRunner

    from sd35m_mlx_cli.main import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    result = CliRunner().invoke(cli, ["serve", "--model", "x"])
    assert result.exit_code == 1
    assert 'pip install "sd35m-mlx[server]"' in result.output and "Traceback" not in result.output


def test_serve_on_a_taken_port_is_a_one_line_error(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from sd35m_mlx_cli import model as model_io
    from sd35m_mlx_cli.main import cli

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(model_io, "load_pipeline", never)  # binding fails first, in a second, not after loading
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path), "--port", str(port)])
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output


def test_serve_downloads_hub_controlnets_with_the_model_after_binding(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from sd35m_mlx.loading import controlnet
    from sd35m_mlx.server import run
    from sd35m_mlx_cli import model as model_io
    from sd35m_mlx_cli.main import cli

    order, served = [], {}
    monkeypatch.setattr(model_io, "load_pipeline", lambda *a, **k: order.append("model") or object())
    monkeypatch.setattr(controlnet, "fetch_controlnet", lambda repo, rev=None: order.append(repo) or tmp_path)
    monkeypatch.setattr(run, "bind", lambda *a: order.append("bind"))
    monkeypatch.setattr(run, "serve", lambda pipe, config, **k: served.update(config.controlnets))
    result = CliRunner().invoke(cli, ["serve", "--model", "tiny-random", "--controlnet", "owner/canny-net"])
    assert result.exit_code == 0, result.output
    assert order == ["bind", "model", "owner/canny-net"] and served == {"canny-net": str(tmp_path)}


def test_open_bind_without_key_warns():
    from sd35m_mlx.server.run import open_warning

    assert "no API key" in open_warning("0.0.0.0", None)
    assert open_warning("0.0.0.0", "k") is None
    assert open_warning("127.0.0.1", None) is None and open_warning("::1", None) is None
    assert open_warning("localhost", None) is None


# Both signals go through the same handler (run.py); SIGINT's real delivery is the slow variant.
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGTERM", "SIGINT"]
)
def test_serve_signal_cancels_the_running_job_and_exits_0(tiny_pipeline, sig):
    code = "import sys; from sd35m_mlx_cli.main import cli; cli(sys.argv[1:], prog_name='sd35m-mlx')"
    args = ["serve", "--model", str(tiny_pipeline), "--dtype", "float32", "--port", "0", "--max-steps", str(LONG)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any("Serving" in line for line in lines):
            line = proc.stderr.readline()
            assert line, "server exited early:\n" + "".join(lines)
            lines.append(line)
        url = lines[-1].split(" on ")[1].split()[0].rstrip("/")
        with httpx.Client(base_url=url, timeout=60) as http:
            t, out = start_in_thread(http.post, "/v1/images/generations",
                                     json={"prompt": "p", "size": "64x64", "steps": LONG})  # fmt: skip
            wait_until(lambda: running_step(http) >= 1, what="the job to run")
            proc.send_signal(sig)
            assert proc.wait(60) == 0
            t.join(10)
        assert out["result"].status_code == 503 and "shutting down" in out["result"].json()["error"]["message"]
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
