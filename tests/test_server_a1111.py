"""The rest of A1111's API that clients call: png-info for our PNGs and A1111's, and the start-up endpoints
(webuiapi, SillyTavern, Open WebUI and Krita's plugin list these on connect and fail when one is missing)."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

pytest.importorskip("fastapi")

from tests.server_helpers import pixels  # noqa: E402


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
     ("/sdapi/v1/extensions", list), ("/sdapi/v1/script-info", list), ("/sdapi/v1/memory", dict),
     ("/sdapi/v1/sd-modules", list), ("/internal/quicksettings-hint", list)],
)  # fmt: skip
def test_startup_endpoints_answer_as_a1111(http, path, shape):
    r = http.get(path)
    assert r.status_code == 200 and isinstance(r.json(), shape), (path, r.text)


def test_internal_ping_sysinfo_and_refreshes_answer_as_a1111(http, tiny_pipeline):
    r = http.get("/internal/ping")
    assert r.status_code == 200 and r.json() == {}  # A1111's lambda: {}
    r = http.get("/internal/sysinfo")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'filename="sysinfo-' in r.headers["content-disposition"]
    facts = json.loads(r.text)
    assert facts["Version"].startswith("sd35m-mlx ") and facts["RAM"]["total"] > 0 and "mlx" in facts["Environment"]
    assert str(tiny_pipeline) not in r.text and "/venv" not in r.text  # no local path
    for path in ("/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-vae", "/sdapi/v1/refresh-embeddings"):
        assert http.post(path).status_code == 200, path


def test_options_hold_the_keys_clients_read(http, server):
    options = http.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == server.worker.model.name and options["sd_vae"] == "Automatic"
    assert options["CLIP_stop_at_last_layers"] == 1 and options["samples_format"] == "png"
    assert options["live_previews_enable"] is True and options["sd_checkpoints_limit"] == 1


def test_webuiapi_startup_calls(server):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert api.get_prompt_styles() == [] and api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_cmd_flags()["api"] is True and api.get_memory()["ram"]["total"] > 0
    assert api.get_sd_vae() == [] and api.get_latent_upscale_modes()[0] == {"name": "Latent"}
    assert api.util_get_model_names() == [m["title"] for m in api.get_sd_models()]
    api.refresh_checkpoints()


# -- several models ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_models(tiny_pipeline):
    """A server started on the tiny fixture that may switch to `tiny-random`; `loaded` keeps a weakref to
    every pipeline a loader made, to see them released."""
    import gc
    import weakref

    from sd35m_mlx import StableDiffusion35
    from tests.server_helpers import RunningServer

    loaded, alive_at_load = [], []

    def loader(source):
        def load():
            gc.collect()
            alive_at_load.append(sum(ref() is not None for ref in loaded))
            pipe = StableDiffusion35.from_pretrained(source, dtype="float32")
            loaded.append(weakref.ref(pipe))
            return pipe

        return load

    first = loader(tiny_pipeline)()
    loaders = {"sd35m-tiny": loader(tiny_pipeline), "tiny-random": loader("tiny-random")}
    with RunningServer(first, model_name="sd35m-tiny", loaders=loaders) as s:
        del first
        s.loaded, s.alive_at_load = loaded, alive_at_load
        yield s


def direct(source, **kwargs):
    from sd35m_mlx import StableDiffusion35

    pipe = StableDiffusion35.from_pretrained(source, dtype="float32")
    return np.asarray(pipe.generate(**kwargs)[0].convert("RGB"))


TINY = dict(prompt="a red cube", width=64, height=64, steps=1, seed=5, cfg_scale=4.0)
KWARGS = dict(prompt="a red cube", width=64, height=64, num_inference_steps=1, seed=5, guidance_scale=4.0)


def test_models_listed_without_paths(two_models, tiny_pipeline):
    with two_models.client() as http:
        models = http.get("/sdapi/v1/sd-models").json()
        assert [(m["title"], m["filename"], m["hash"]) for m in models] == [
            ("sd35m-tiny", "sd35m-tiny", None), ("tiny-random", "tiny-random", None)]  # fmt: skip
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["sd35m-tiny", "tiny-random"]
        for bad in ("nope", str(tiny_pipeline), "/etc/passwd", "../sd35m-tiny"):
            r = http.post("/sdapi/v1/options", json={"sd_model_checkpoint": bad})
            assert r.status_code == 400 and "sd35m-tiny, tiny-random" in r.text, r.text
            r = http.post("/sdapi/v1/txt2img", json={**TINY, "override_settings": {"sd_model_checkpoint": bad}})
            assert r.status_code == 400 and "the choices" in r.text, r.text
        assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "sd35m-tiny"


def test_switching_gives_the_other_models_pixels_and_releases_memory(two_models, tiny_pipeline):
    import gc

    with two_models.client() as http:
        before = pixels(http.post("/sdapi/v1/txt2img", json=TINY).json()["images"][0])
        np.testing.assert_array_equal(before, direct(tiny_pipeline, **KWARGS))
        old = two_models.worker.pipe
        import weakref

        old_ref = weakref.ref(old)
        del old
        assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-random"}).status_code == 200
        assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-random"
        gc.collect()
        assert old_ref() is None  # the previous pipeline is gone, not kept beside the new one
        assert sum(ref() is not None for ref in two_models.loaded) == 1  # one model resident, never two
        assert two_models.alive_at_load[-1] == 0  # released before the next one loaded
        r = http.post("/sdapi/v1/txt2img", json=TINY).json()
        np.testing.assert_array_equal(pixels(r["images"][0]), direct("tiny-random", **KWARGS))
        assert json.loads(r["info"])["sd_model_name"] == "tiny-random"
        assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd35m-tiny"}).status_code == 200
        np.testing.assert_array_equal(pixels(http.post("/sdapi/v1/txt2img", json=TINY).json()["images"][0]), before)


def test_override_settings_applies_to_one_request(two_models):
    random_pixels = direct("tiny-random", **KWARGS)
    with two_models.client() as http:
        payload = {**TINY, "override_settings": {"sd_model_checkpoint": "tiny-random"}}
        r = http.post("/sdapi/v1/txt2img", json=payload).json()
        np.testing.assert_array_equal(pixels(r["images"][0]), random_pixels)
        info = json.loads(r["info"])
        assert info["sd_model_name"] == "tiny-random" and info["warnings"] == []
        assert "Model: tiny-random" in info["infotexts"][0]
    two_models.wait_idle()
    assert two_models.worker.model.name == "sd35m-tiny"  # switched back (A1111's restore_afterwards default)
    with two_models.client() as http:
        payload["override_settings_restore_afterwards"] = False
        assert http.post("/sdapi/v1/txt2img", json=payload).status_code == 200
    assert two_models.worker.model.name == "tiny-random"  # kept
    with two_models.client() as http:
        assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd35m-tiny"}).status_code == 200


def test_webuiapi_switches_models(two_models):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=two_models.port)
    assert api.util_get_model_names() == ["sd35m-tiny", "tiny-random"]
    api.util_set_model("tiny-random")
    assert api.util_get_current_model() == "tiny-random"
    api.util_set_model("sd35m-tiny")
    assert two_models.worker.model.name == "sd35m-tiny"


def test_serve_takes_several_models(monkeypatch, tiny_pipeline):
    from click.testing import CliRunner

    import sd35m_mlx.server.run as run
    from sd35m_mlx_cli.main import cli

    got = {}
    monkeypatch.setattr(run, "serve", lambda pipe, **kw: got.update(pipe=pipe, **kw))
    args = ["serve", "--model", "tiny-random", "--model", str(tiny_pipeline), "--port", "0", "--dtype", "float32"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    config = got["config"]
    assert config.model_name == "tiny-random" and list(config.loaders) == ["tiny-random", "sd35m-tiny"]
    assert str(tiny_pipeline.parent) not in repr(list(config.loaders))
    other = config.loaders["sd35m-tiny"]()  # loaded only when a client switches
    assert other.transformer_config.num_layers == got["pipe"].transformer_config.num_layers
    twice = CliRunner().invoke(cli, ["serve", "--model", str(tiny_pipeline), "--model", str(tiny_pipeline)])
    assert twice.exit_code == 2 and "same name" in twice.output


# -- hires fix -----------------------------------------------------------------------------------------------


def test_enable_hr_equals_upscale_generate(server, pipe, http, tiny_pipeline, tmp_path):
    """hr_prompt / hr_negative_prompt and "Nearest" run as A1111 runs them: the library's second-pass options."""
    from sd35m_mlx.upscale import upscale_generate

    payload = {**TINY, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2, "denoising_strength": 0.5,
               "hr_upscaler": "Nearest", "hr_prompt": "another", "hr_negative_prompt": "dull"}  # fmt: skip
    r = http.post("/sdapi/v1/txt2img", json=payload)
    assert r.status_code == 200, r.text
    got = pixels(r.json()["images"][0])
    kwargs = {k: v for k, v in KWARGS.items() if k != "prompt"}
    want = upscale_generate(pipe, "a red cube", factor=1.5, strength=0.5, upscale_steps=2, upscaler="nearest",
                            upscale_prompt="another", upscale_negative_prompt="dull", **kwargs).images[0]  # fmt: skip
    assert got.shape == (96, 96, 3)
    np.testing.assert_array_equal(got, np.asarray(want.convert("RGB")))
    info = json.loads(r.json()["info"])
    assert info["warnings"] == []  # nothing substituted
    text = info["infotexts"][0]
    assert "Hires upscale: 1.5" in text and "Hires steps: 2" in text and "Hires denoising strength: 0.5" in text
    assert "Hires upscaler: Nearest" in text and "Hires prompt: another" in text
    assert "Hires negative prompt: dull" in text
    # the CLI replays it, second-pass prompts and upscaler included
    from click.testing import CliRunner

    from sd35m_mlx_cli.main import cli

    png = tmp_path / "hires.png"
    png.write_bytes(base64.b64decode(r.json()["images"][0]))
    args = ["--from-image", str(png), "--model", str(tiny_pipeline), "-o", str(tmp_path / "replay.png")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(pixels(Image.open(tmp_path / "replay.png")), got)


def test_enable_hr_latent_upscalers_equal_upscale_generate(server, pipe, http, tiny_pipeline, tmp_path):
    """A1111's Latent modes (and its default, "Latent", when hr_upscaler is left out) run as A1111 runs them: the
    library's latent upscalers, nothing substituted; the PNG says "Hires upscaler: Latent" and the CLI replays it."""
    from click.testing import CliRunner

    from sd35m_mlx.upscale import upscale_generate
    from sd35m_mlx_cli.main import cli

    modes = http.get("/sdapi/v1/latent-upscale-modes").json()
    names = ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
             "Latent (nearest-exact)"]  # fmt: skip
    assert modes == [{"name": n} for n in names]  # A1111's shared.latent_upscale_modes, in its order
    kwargs = {k: v for k, v in KWARGS.items() if k != "prompt"}
    for asked, ours, label in ((None, "latent", "Latent"), ("Latent (nearest-exact)", "latent-nearest-exact", None)):
        payload = {**TINY, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2}
        if asked is not None:
            payload["hr_upscaler"] = asked
        r = http.post("/sdapi/v1/txt2img", json=payload)
        assert r.status_code == 200, r.text
        got = pixels(r.json()["images"][0])
        want = upscale_generate(pipe, "a red cube", factor=1.5, strength=0.7, upscale_steps=2, upscaler=ours,
                                **kwargs).images[0]  # fmt: skip
        np.testing.assert_array_equal(got, np.asarray(want.convert("RGB")))
        info = json.loads(r.json()["info"])
        assert info["warnings"] == []  # nothing substituted
        assert f"Hires upscaler: {label or asked}" in info["infotexts"][0]
    png = tmp_path / "latent.png"
    png.write_bytes(base64.b64decode(r.json()["images"][0]))
    args = ["--from-image", str(png), "--model", str(tiny_pipeline), "-o", str(tmp_path / "replay.png")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(pixels(Image.open(tmp_path / "replay.png")), got)
    assert "Hires upscaler: Latent (nearest-exact)" in Image.open(tmp_path / "replay.png").text["parameters"]


def test_enable_hr_unknown_upscalers_run_lanczos_and_say_so(server, pipe, http):
    from sd35m_mlx.upscale import upscale_generate

    kwargs = {k: v for k, v in KWARGS.items() if k != "prompt"}
    want = upscale_generate(pipe, "a red cube", factor=1.5, strength=0.7, **kwargs).images[0]
    for upscaler, said in (("R-ESRGAN 4x+", "not available"), ("None", None)):
        payload = {**TINY, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": upscaler, "hr_prompt": "a red cube"}
        r = http.post("/sdapi/v1/txt2img", json=payload)
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["images"][0]), np.asarray(want.convert("RGB")))
        info = json.loads(r.json()["info"])
        if said:
            assert len(info["warnings"]) == 1 and said in info["warnings"][0] and "ran Lanczos" in info["warnings"][0]
        else:  # A1111's "None" is a Lanczos resize: nothing substituted
            assert info["warnings"] == []
        assert "Hires prompt" not in info["infotexts"][0]  # the same as the prompt: not recorded (A1111)
    r = http.post("/sdapi/v1/txt2img", json={**TINY, "enable_hr": True, "hr_prompt": ["a"]})
    assert r.status_code == 400 and "hr_prompt must be a string" in r.text


def test_enable_hr_by_size_and_too_big(server, http):
    r = http.post("/sdapi/v1/txt2img", json={**TINY, "enable_hr": True, "hr_resize_x": 128, "hr_resize_y": 128})
    assert r.status_code == 200, r.text
    assert pixels(r.json()["images"][0]).shape == (128, 128, 3)
    server.wait_idle()
    submitted = []
    real = server.worker.submit
    server.worker.submit = lambda *a: submitted.append(a) or real(*a)
    try:
        r = http.post("/sdapi/v1/txt2img", json={**TINY, "enable_hr": True, "hr_scale": 1000})
    finally:
        server.worker.submit = real
    assert r.status_code == 400 and "hires size" in r.text and submitted == []  # refused before any work
    r = http.post("/sdapi/v1/txt2img", json={**TINY, "enable_hr": True, "hr_scale": 0.5})
    assert r.status_code == 400 and "hr_scale" in r.text
    # hr_second_pass_steps are the steps run (A1111): their schedule, steps / strength, is bounded, said before work
    server.worker.submit = lambda *a: submitted.append(a) or real(*a)
    try:
        payload = {**TINY, "enable_hr": True, "hr_second_pass_steps": 150, "denoising_strength": 0.1}
        r = http.post("/sdapi/v1/txt2img", json=payload)
    finally:
        server.worker.submit = real
    assert r.status_code == 400 and "makes a schedule of 1500 steps" in r.text and submitted == []
    r = http.post("/sdapi/v1/txt2img", json={**TINY, "enable_hr": True, "denoising_strength": 0})
    assert r.status_code == 400 and "denoising_strength must be in (0, 1]" in r.text


@pytest.mark.parametrize("source, rng, label", [("CPU", "cpu", "CPU"), ("NV", "nv", "NV"), ("GPU", "nv", "NV")])
def test_override_randn_source_picks_the_noise(http, pipe, source, rng, label):
    """A1111's modules/rng.py: CPU is torch's CPU generator, NV the Philox port, GPU (CUDA) the stream NV ports."""
    payload = {**TINY, "override_settings": {"randn_source": source, "CLIP_stop_at_last_layers": 2}}
    r = http.post("/sdapi/v1/txt2img", json=payload)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), pixels(pipe.generate(**KWARGS, rng=rng)[0]))
    assert f"RNG: {label}" in info["infotexts"][0]
    assert info["warnings"] == ["override_settings.CLIP_stop_at_last_layers=2 is not supported here; ignored"]


def test_unknown_randn_source_is_a_400_naming_the_choices(http):
    r = http.post("/sdapi/v1/txt2img", json={**TINY, "override_settings": {"randn_source": "XPU"}})
    assert r.status_code == 400 and "choose one of GPU, CPU, NV" in r.text


@pytest.mark.parametrize("path", ["/sdapi/v1/txt2img", "/v1/images/generations"])
def test_text_encoding_extension_encodes_as_comfyui(http, pipe, path):
    if path.startswith("/sdapi"):
        payload = {**TINY, "prompt": "a (red:1.3) cube", "text_encoding": "comfyui"}
    else:
        payload = {"prompt": "a (red:1.3) cube", "size": "64x64", "steps": 1, "seed": 5, "guidance_scale": 4.0,
                   "text_encoding": "comfyui", "response_format": "b64_json"}  # fmt: skip
    r = http.post(path, json=payload)
    assert r.status_code == 200, r.text
    image = r.json()["images"][0] if path.startswith("/sdapi") else r.json()["data"][0]["b64_json"]
    kwargs = {**KWARGS, "prompt": "a (red:1.3) cube", "prompt_syntax": "weighted"}
    np.testing.assert_array_equal(pixels(image), pixels(pipe.generate(**kwargs, text_encoding="comfyui")[0]))
    assert not np.array_equal(pixels(image), pixels(pipe.generate(**kwargs)[0]))
    assert "Text encoding: comfyui" in Image.open(io.BytesIO(base64.b64decode(image))).text["parameters"]
    assert http.post(path, json={**payload, "text_encoding": "comfy"}).status_code in (400, 422)
