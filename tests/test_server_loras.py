"""LoRAs by name in the server (issue 25): `<lora:NAME:W>` tags and OpenAI's `loras` extension resolved in
`serve --lora-dir`, A1111's /sdapi/v1/loras and refresh-loras, adapters switched per request."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from lora_writers import save  # noqa: E402
from PIL import Image  # noqa: E402

from sd35m_mlx import StableDiffusion35  # noqa: E402
from tests.server_helpers import RunningServer, pixels  # noqa: E402

TXT = {"width": 64, "height": 64, "steps": 2, "seed": 5, "cfg_scale": 5.0}


def _lora(path, seed: int, metadata=None):
    rng = np.random.default_rng(seed)
    t = {}
    for i in range(4):
        t[f"transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight"] = rng.standard_normal((4, 32)) / 6
        t[f"transformer.transformer_blocks.{i}.attn.to_q.lora_B.weight"] = rng.standard_normal((32, 4)) * 0.3
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(path, t, metadata)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    _lora(folder / "styles" / "ink.safetensors", 0, {"ss_output_name": "inky", "ss_tag_frequency": '{"a": {"b": 1}}'})
    return folder


@pytest.fixture(scope="module")
def server_options(lora_dir) -> dict:
    return {"lora_dir": str(lora_dir)}


def _txt2img(http, prompt: str, **extra) -> np.ndarray:
    r = http.post("/sdapi/v1/txt2img", json={"prompt": prompt, **TXT, **extra})
    assert r.status_code == 200, r.text
    return pixels(r.json()["images"][0])


def test_tag_request_equals_the_library_with_that_lora_and_the_next_runs_without(http, tiny_pipeline, lora_dir, pipe):
    base = _txt2img(http, "a red cube")
    tagged = _txt2img(http, "a red cube <lora:ink:0.7>")
    reference = StableDiffusion35.from_pretrained(
        tiny_pipeline, dtype="float32", loras=[(lora_dir / "styles" / "ink.safetensors", 0.7)]
    )
    want = reference.generate("a red cube", guidance_scale=5.0, seed=5, width=64, height=64, num_inference_steps=2)
    assert np.array_equal(tagged, pixels(want[0]))
    assert not np.array_equal(tagged, base)
    assert np.array_equal(_txt2img(http, "a red cube"), base), "a LoRA not named must be inactive"
    assert np.array_equal(_txt2img(http, "a red cube <lora:styles/ink:0.7>"), tagged)  # cached adapter reused
    assert len(pipe._loras.adapters) == 1

    body = {"prompt": "a red cube", "size": "64x64", "steps": 2, "seed": 5, "guidance_scale": 5.0}
    r = http.post("/v1/images/generations", json={**body, "loras": [{"name": "ink", "weight": 0.7}]})
    assert r.status_code == 200, r.text
    assert np.array_equal(pixels(r.json()["data"][0]["b64_json"]), tagged)


def test_tagged_png_records_the_prompt_as_sent(http):
    r = http.post("/sdapi/v1/txt2img", json={"prompt": "a (red:1.2) cube <lora:ink:0.5>", **TXT})
    png = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    stored = json.loads(png.text["sd35m-mlx"])
    assert stored["prompt"] == "a (red:1.2) cube <lora:ink:0.5>" and stored["prompt_syntax"] == "weighted"
    assert stored["lora_tags"][0][:2] == ["styles/ink", 0.5] and len(stored["lora_tags"][0][2]) == 10
    assert png.text["parameters"].startswith("a (red:1.2) cube <lora:ink:0.5>\n")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a\\b", "nothing"])
def test_path_like_and_unknown_names_are_400(http, lora_dir, name):
    for path, body in (
        ("/sdapi/v1/txt2img", {"prompt": f"x <lora:{name}>", **TXT}),
        ("/v1/images/generations", {"prompt": "x", "size": "64x64", "loras": [{"name": name}]}),
    ):
        r = http.post(path, json=body)
        assert r.status_code == 400, r.text
        assert str(lora_dir) not in r.text and "\\n" not in r.text  # one line, no local path


def test_1000_tags_and_negative_tags_are_400_in_one_line(http):
    r = http.post("/sdapi/v1/txt2img", json={"prompt": "x" + " <lora:a>" * 1000, **TXT})
    assert r.status_code == 400 and "at most 32" in r.text
    r = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "negative_prompt": "<lora:ink>", **TXT})
    assert r.status_code == 400 and "not in the negative prompt" in r.text


def test_loras_lists_relative_paths_and_metadata_and_refresh_finds_new_files(http, lora_dir):
    listed = http.get("/sdapi/v1/loras").json()
    assert listed == [
        {"name": "styles/ink", "alias": "inky", "path": "styles/ink.safetensors",
         "metadata": {"ss_output_name": "inky", "ss_tag_frequency": {"a": {"b": 1}}}}
    ]  # fmt: skip
    assert str(lora_dir) not in http.get("/sdapi/v1/loras").text
    _lora(lora_dir / "new.safetensors", 1)
    assert [e["name"] for e in http.get("/sdapi/v1/loras").json()] == ["styles/ink"]
    assert http.post("/sdapi/v1/refresh-loras").status_code == 200
    assert [e["name"] for e in http.get("/sdapi/v1/loras").json()] == ["new", "styles/ink"]
    assert _txt2img(http, "x <lora:new>").shape == (64, 64, 3)


def test_a_lora_that_does_not_fit_is_400_without_paths_and_the_server_goes_on(http, lora_dir):
    rng = np.random.default_rng(2)
    save(lora_dir / "wide.safetensors", {  # a width-64 model's LoRA; the tiny transformer is 32 wide
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": rng.standard_normal((4, 64)),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": rng.standard_normal((64, 4)),
    })  # fmt: skip
    assert http.post("/sdapi/v1/refresh-loras").status_code == 200
    r = http.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:wide>", **TXT})
    assert r.status_code == 400 and "wide" in r.text and str(lora_dir) not in r.text, r.text
    assert _txt2img(http, "a red cube").shape == (64, 64, 3)


def test_a_server_without_a_folder_refuses_tags(pipe):
    with RunningServer(pipe) as s, s.client() as http:
        r = http.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:ink>", **TXT})
        assert r.status_code == 400 and "serve with --lora-dir" in r.text
        assert http.get("/sdapi/v1/loras").json() == []


def test_webuiapi_get_loras(server):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    assert "styles/ink" in [e["name"] for e in api.get_loras()]


def test_hr_prompt_loras_apply_to_the_second_pass_only(http, lora_dir, pipe, server):
    """As A1111 (processing.py: the hires pass activates the hr_prompt's own extra networks): hr_prompt's tags are
    the second pass's LoRAs, and an hr_prompt without tags runs the second pass without the prompt's."""
    from sd35m_mlx.upscale import upscale_generate

    ink = [(str(lora_dir / "styles" / "ink.safetensors"), 0.7)]
    # (hr_upscaler left out is A1111's "Latent": named here, as upscale_generate's default below)
    hires = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "hr_upscaler": "Lanczos"}
    common = dict(factor=1.5, strength=0.5, guidance_scale=5.0, seed=5, width=64, height=64, num_inference_steps=2)
    cases = [("a red cube", "a red cube <lora:ink:0.7>", [], ink), ("a red cube <lora:ink:0.7>", "a red cube", ink, [])]
    for prompt, hr_prompt, first, second in cases:
        got = _txt2img(http, prompt, hr_prompt=hr_prompt, **hires)
        server.wait_idle()
        pipe.use_loras(first)
        want = upscale_generate(pipe, "a red cube", upscale_loras=second, **common).images[0]
        pipe.use_loras([])
        assert np.array_equal(got, pixels(want)), (prompt, hr_prompt)
        no_switch = upscale_generate(pipe, "a red cube", **common).images[0]
        assert not np.array_equal(got, pixels(no_switch)), (prompt, hr_prompt)  # the LoRA made a difference
    base = _txt2img(http, "a red cube", **hires)
    assert np.array_equal(base, pixels(upscale_generate(pipe, "a red cube", **common).images[0]))
    r = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "hr_prompt": "x <lora:../y>", **TXT, **hires})
    assert r.status_code == 400 and str(lora_dir) not in r.text


def test_lora_cache_budget_from_serve_reaches_the_pipeline(monkeypatch, lora_dir, tiny_pipeline):
    """serve --lora-cache-mb -> ServerConfig.lora_cache_bytes -> the worker's use_loras budget."""
    from click.testing import CliRunner

    import sd35m_mlx.server.run as run
    from sd35m_mlx_cli.main import cli

    got = {}
    monkeypatch.setattr(run, "serve", lambda pipe, **kw: got.update(pipe=pipe, **kw))
    args = ["serve", "--model", str(tiny_pipeline), "--port", "0", "--dtype", "float32", "--lora-cache-mb", "0",
            "--lora-dir", str(lora_dir)]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert got["config"].lora_cache_bytes == 0
    with RunningServer(got["pipe"], config=got["config"]) as s, s.client() as http:
        _txt2img(http, "x <lora:ink:0.5>")
        _txt2img(http, "x")  # budget 0: nothing stays loaded once no request names it
        s.wait_idle()
        assert got["pipe"].lora_cache_bytes == 0 and got["pipe"]._loras.adapters == {}
