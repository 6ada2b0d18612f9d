"""ControlNet and outpainting through the server: the A1111 ControlNet extension's units
(`alwayson_scripts.controlnet.args`, as webuiapi's ControlNetUnit sends them) and its /controlnet endpoints, and our
img2img `outpaint` field, pixel for pixel against the library calls the CLI makes (PNG is lossless: exact equality).
Bad units are 400 one-liners, refused before queueing, and the server goes on serving.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from tests.server_helpers import b64, pixels, png  # noqa: E402

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}
A1111 = {"width": 64, "height": 64, "steps": 2, "cfg_scale": 4.5, "sampler_name": "Euler"}
PHOTO = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _edges(size=(64, 64), seed=0) -> Image.Image:
    """An edge-map-like control image: white strokes on black."""
    a = np.zeros((size[1], size[0]), np.uint8)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        r, c = rng.integers(0, size[1]), rng.integers(0, size[0] - 20)
        a[r, c : c + 20] = 255
        a[rng.integers(0, size[1] - 16) :, rng.integers(0, size[0])][:16] = 255
    return Image.fromarray(a).convert("RGB")


def _shapes(size=(64, 64)) -> Image.Image:
    """A picture canny finds edges in: blocks of flat colour."""
    a = np.full((size[1], size[0], 3), 30, np.uint8)
    a[8:40, 10:30] = (200, 40, 40)
    a[30:60, 34:60] = (40, 200, 90)
    a[44:60, 4:28] = 60  # low contrast: edges at canny's thresholds 50/150, none at 100/200
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    from scripts.build_fixture import build_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    return {"edges": build_controlnet(root / "edges", seed=1), "depth": build_controlnet(root / "depth", seed=2)}


@pytest.fixture(scope="module")
def server_options(nets):
    return dict(model_name="sd35m-tiny", controlnets={name: str(folder) for name, folder in nets.items()})


@pytest.fixture
def with_nets(pipe, nets):
    """`with_nets(*names)`: the pipeline generating with exactly these ControlNets (loaded from the same folders)."""
    from sd35m_mlx.loading.controlnet import load_controlnet

    held = pipe.controlnets

    def use(*names):
        pipe.controlnets = [load_controlnet(nets[n]) for n in names]
        return pipe

    yield use
    pipe.controlnets = held


def unit(image: Image.Image | None, **fields) -> dict:
    return {"enabled": True, "module": "none", "model": "edges", "weight": 1.0, "resize_mode": "Just Resize",
            **({"image": b64(png(image))} if image is not None else {}), **fields}  # fmt: skip


def txt2img(http, prompt: str, seed: int, *units, **extra):
    body = {"prompt": prompt, "seed": seed, **A1111, "alwayson_scripts": {"controlnet": {"args": list(units)}}}
    return http.post("/sdapi/v1/txt2img", json={**body, **extra})


# --- ControlNet units, pixel for pixel ------------------------------------------------------------------------


def test_controlnet_unit_equals_pipeline_generate_with_that_controlnet(server, http, with_nets):
    control = _edges()
    r = txt2img(http, "a house", 4, unit(control, weight=0.7, guidance_start=0.0, guidance_end=0.5))
    assert r.status_code == 200, r.text
    pipe = with_nets("edges")
    want = pipe.generate("a house", control_image=control, controlnet_conditioning_scale=0.7,
                         control_guidance_start=0.0, control_guidance_end=0.5, seed=4, **SMALL)[0]  # fmt: skip
    assert np.array_equal(pixels(r.json()["images"][0]), pixels(want))
    pipe.controlnets = []
    plain = pipe.generate("a house", seed=4, **SMALL)[0]
    assert not np.array_equal(pixels(want), pixels(plain))  # the ControlNet matters on this fixture
    info = json.loads(r.json()["info"])
    assert info["warnings"] == []
    recorded = 'ControlNet 0: "Module: none, Model: edges, Image: (uploaded), Weight: 0.7, Guidance Start: 0.0, '
    assert recorded + 'Guidance End: 0.5"' in info["infotexts"][0]
    assert "image" not in r.json()["parameters"]["alwayson_scripts"]["controlnet"]["args"][0]  # not echoed back


def test_webuiapi_controlnet_unit_with_canny_equals_library_canny(server, with_nets):
    webuiapi = pytest.importorskip("webuiapi")
    pytest.importorskip("cv2")
    from sd35m_mlx.editing.preprocess import canny

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler")
    picture = _shapes()
    cn = webuiapi.ControlNetUnit(image=picture, module="canny", model="edges", weight=1.2, threshold_a=50,
                                 threshold_b=150, guidance_start=0.25, guidance_end=1.0)  # fmt: skip
    r = api.txt2img(prompt="a cat", width=64, height=64, steps=2, seed=7, cfg_scale=4.5, controlnet_units=[cn])
    edges = canny(picture, 50, 150)
    assert not np.array_equal(pixels(edges), pixels(canny(picture)))  # the thresholds matter on this picture
    want = with_nets("edges").generate("a cat", control_image=edges, controlnet_conditioning_scale=1.2,
                                       control_guidance_start=0.25, seed=7, guidance_scale=4.5, **SMALL)[0]  # fmt: skip
    assert np.array_equal(pixels(r.image), pixels(want))
    raw = with_nets("edges").generate("a cat", control_image=picture, controlnet_conditioning_scale=1.2,
                                      control_guidance_start=0.25, seed=7, guidance_scale=4.5, **SMALL)[0]  # fmt: skip
    assert not np.array_equal(pixels(raw), pixels(want))
    recorded = 'ControlNet 0: "Module: canny, Model: edges, Image: (uploaded), Weight: 1.2, Threshold A: 50, '
    assert recorded + 'Threshold B: 150, Guidance Start: 0.25, Guidance End: 1.0"' in r.info["infotexts"][0]
    from sd35m_mlx_cli.metadata import checked_fields

    stored, invalid = checked_fields(json.loads(r.image.info["sd35m-mlx"]))  # what --from-image restores
    assert stored["control_thresholds"] == (50, 150) and stored["control_preprocess"] == "canny" and not invalid
    assert r.info["warnings"] == []


def test_two_enabled_units_run_both_controlnets_and_disabled_ones_are_skipped(server, http, with_nets):
    a, b = _edges(seed=1), _edges(seed=2)
    off = unit(_edges(seed=3), model="edges", enabled=False, weight=2.0)
    r = txt2img(http, "a tree", 5, unit(a, weight=0.8), off, unit(b, model="depth [1a2b3c4d]", weight=0.6))
    assert r.status_code == 200, r.text
    both = with_nets("edges", "depth")
    want = both.generate("a tree", control_image=[a, b], controlnet_conditioning_scale=[0.8, 0.6], seed=5, **SMALL)[0]
    assert np.array_equal(pixels(r.json()["images"][0]), pixels(want))
    one = with_nets("edges").generate("a tree", control_image=a, controlnet_conditioning_scale=0.8, seed=5, **SMALL)[0]
    assert not np.array_equal(pixels(one), pixels(want))


def test_crop_and_resize_is_the_default_and_crops_the_centre(server, http, with_nets):
    wide = _edges(size=(128, 64), seed=4)
    r = txt2img(http, "a boat", 6, {k: v for k, v in unit(wide).items() if k != "resize_mode"})
    assert r.status_code == 200, r.text
    want = with_nets("edges").generate("a boat", control_image=wide.crop((32, 0, 96, 64)), seed=6, **SMALL)[0]
    assert np.array_equal(pixels(r.json()["images"][0]), pixels(want))


# --- the extension's endpoints --------------------------------------------------------------------------------


def test_controlnet_model_and_module_lists(http):
    assert http.get("/controlnet/model_list").json() == {"model_list": ["edges", "depth"]}
    modules = http.get("/controlnet/module_list").json()
    assert modules["module_list"] == ["none", "canny"]
    assert [s["value"] for s in modules["module_detail"]["canny"]["sliders"]] == [100, 200]
    assert http.get("/controlnet/version").json() == {"version": 3}
    assert http.get("/studio/config").json()["controlnets"] == ["edges", "depth"]  # what the page offers


def test_controlnet_detect_shows_the_canny_map_a_unit_conditions_on(http):
    pytest.importorskip("cv2")
    from sd35m_mlx.editing.preprocess import canny

    body = {"controlnet_module": "canny", "controlnet_input_images": [b64(png(_shapes()))],
            "controlnet_threshold_a": 50, "controlnet_threshold_b": 150}  # fmt: skip
    r = http.post("/controlnet/detect", json=body)
    assert r.status_code == 200 and r.json()["info"] == "Success", r.text[:300]
    assert np.array_equal(pixels(r.json()["images"][0]), pixels(canny(_shapes(), 50, 150)))
    r = http.post("/controlnet/detect", json={**body, "controlnet_module": "depth"})
    assert r.status_code == 422 and "none, canny" in r.json()["detail"]


# --- bad units: 400 one-liners before queueing, and the server goes on -----------------------------------------


@pytest.fixture
def queued(server, monkeypatch):
    """The jobs that reached the queue during the test."""
    jobs, submit = [], server.worker.submit

    def spy(spec, loop=None):
        jobs.append(spec)
        return submit(spec, loop)

    monkeypatch.setattr(server.worker, "submit", spy)
    return jobs


def test_bad_units_are_400_one_liners_and_the_server_goes_on(server, http, queued, monkeypatch):
    cases = [
        (unit(_edges(), model="canny-sd15"), "alwayson_scripts.controlnet.args[0].model", "edges, depth"),
        ({**unit(None), "image": b64(b"not an image")}, "args[0].image", "not an image"),
        (unit(_edges(), module="openpose"), "args[0].module", "none, canny"),
        (unit(_edges(), weight=3), "args[0].weight", "0 to 2"),
        (unit(_edges(), guidance_start=0.6, guidance_end=0.4), "guidance_start", "below"),
        (unit(None), "args[0].image is required", "base64"),
    ]
    for bad, *expected in cases:
        r = txt2img(http, "x", 1, bad)
        assert r.status_code == 400, (bad, r.text)
        detail = r.json()["detail"]
        assert "\n" not in detail and all(e in detail for e in expected), detail
    monkeypatch.setitem(sys.modules, "cv2", None)  # OpenCV missing: import cv2 raises ImportError
    r = txt2img(http, "x", 1, unit(_shapes(), module="canny"))
    assert r.status_code == 400 and 'pip install "sd35m-mlx[control]"' in r.json()["detail"], r.text
    assert queued == []  # all refused before queueing
    monkeypatch.delitem(sys.modules, "cv2")
    r = txt2img(http, "x", 1, unit(_edges()))
    assert r.status_code == 200, r.text


def test_hires_fix_with_a_controlnet_is_refused(http, queued):
    r = txt2img(http, "x", 1, unit(_edges()), enable_hr=True, hr_scale=2)
    assert r.status_code == 400 and "enable_hr" in r.json()["detail"]
    assert queued == []


def test_other_alwayson_scripts_are_still_named_in_warnings(http):
    body = {
        "prompt": "x",
        "seed": 1,
        **A1111,
        "alwayson_scripts": {"controlnet": {"args": []}, "ADetailer": {"args": [1]}},
    }
    r = http.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    warnings = json.loads(r.json()["info"])["warnings"]
    assert len(warnings) == 1 and "ADetailer" in warnings[0] and "controlnet" not in warnings[0]


# --- outpainting ----------------------------------------------------------------------------------------------


def test_outpaint_equals_library_outpaint_generate_composite(server, http, pipe):
    from sd35m_mlx.editing.outpaint import outpaint

    field = {"left": 16, "top": 0, "right": 32, "bottom": 16, "fill": "blur", "feather": 8}
    body = {"prompt": "a field", "seed": 3, **A1111, "init_images": [b64(png(PHOTO))], "outpaint": field}
    r = http.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    job = outpaint(PHOTO, (16, 0, 32, 16), fill="blur", feather=8)
    raw = pipe.generate("a field", image=job.image, mask_image=job.mask, strength=1.0, seed=3, width=112, height=80,
                        num_inference_steps=2)  # fmt: skip
    got = pixels(r.json()["images"][0])
    assert got.shape == (80, 112, 3)
    assert np.array_equal(got, pixels(job.composite(raw)[0]))
    assert not np.array_equal(got, pixels(raw[0]))  # the composite matters
    info = json.loads(r.json()["info"])
    assert 'Outpaint: "16,0,32,16", Outpaint fill: blur, Outpaint feather: 8' in info["infotexts"][0]
    assert len(info["warnings"]) == 1 and "112x80" in info["warnings"][0]  # width/height 64x64 were overridden


def test_a1111_outpainting_scripts_run_as_the_outpaint_field(server, http):
    init = {"prompt": "a field", "seed": 3, **A1111, "init_images": [b64(png(PHOTO))]}
    r = http.post("/sdapi/v1/img2img", json={**init, "outpaint": {"left": 16, "right": 16, "top": 16}})
    want = pixels(r.json()["images"][0])
    for name, args in (("Poor man's outpainting", [16, 4, 1, ["left", "right", "up"]]),
                       ("Outpainting mk2", ["", 16, 8, ["left", "up", "right"], 1.0, 0.05])):  # fmt: skip
        r = http.post("/sdapi/v1/img2img", json={**init, "script_name": name, "script_args": args})
        assert r.status_code == 200, r.text[:300]
        assert np.array_equal(pixels(r.json()["images"][0]), want), name
        warnings = json.loads(r.json()["info"])["warnings"]
        assert any("ran as one outpainting pass" in w for w in warnings), warnings
        assert not any(w.startswith(("script_name=", "script_args=")) for w in warnings), warnings  # not ignored
    r = http.post("/sdapi/v1/img2img", json={**init, "script_name": "Poor man's outpainting", "script_args": ["x"]})
    assert r.status_code == 400 and "script_args" in r.json()["detail"]


def test_outpaint_beyond_the_model_or_off_the_size_multiple_is_refused_before_queueing(http, queued):
    init = [b64(png(PHOTO))]
    for field, expected in (({"left": 336}, "400x64"), ({"right": 8}, "72x64"), ({}, "at least one margin"),
                            ({"left": 16, "fill": "mirror"}, "edge, blur")):  # fmt: skip
        r = http.post("/sdapi/v1/img2img", json={"prompt": "x", **A1111, "init_images": init, "outpaint": field})
        assert r.status_code == 400, r.text[:300]
        assert expected in r.json()["detail"] and "\n" not in r.json()["detail"], r.text
    r = http.post("/sdapi/v1/img2img", json={"prompt": "x", **A1111, "init_images": init, "outpaint": {"left": -16}})
    assert r.status_code == 422 and "outpaint.left" in r.json()["detail"]
    assert queued == []


# --- serve --controlnet ---------------------------------------------------------------------------------------


def test_serve_names_controlnets_by_stem_and_refuses_clashes_and_missing_files(nets, tmp_path):
    from sd35m_mlx_cli.errors import UsageError
    from sd35m_mlx_cli.serve import controlnet_names

    single = tmp_path / "canny-v2.safetensors"
    single.write_bytes(b"")
    hub = "tensorart/SD3.5M-Controlnet-Canny"
    named = controlnet_names((str(nets["edges"]), str(single), hub))
    assert named == {"edges": str(nets["edges"]), "canny-v2": str(single), "SD3.5M-Controlnet-Canny": hub}
    (tmp_path / "other" / "edges").mkdir(parents=True)
    with pytest.raises(UsageError, match="both be named 'edges'"):
        controlnet_names((str(nets["edges"]), str(tmp_path / "other" / "edges")))
    with pytest.raises(UsageError, match="no such folder"):
        controlnet_names((str(tmp_path / "missing.safetensors"),))


def test_the_controlnet_conditions_whichever_model_is_resident(pipe, nets, with_nets):
    """serve --model A --model B: a request switching to B runs the cached ControlNet on B, then A again on A."""
    from sd35m_mlx import StableDiffusion35
    from tests.server_helpers import RunningServer

    def other():
        return StableDiffusion35.from_pretrained("tiny-random", dtype="float32")

    control = _edges(seed=5)
    loaders = {"sd35m-tiny": lambda: pipe, "tiny-random": other}
    with RunningServer(pipe, model_name="sd35m-tiny", loaders=loaders, controlnets={"edges": str(nets["edges"])}) as s:
        with s.client() as http:
            switch = {"override_settings": {"sd_model_checkpoint": "tiny-random"}}
            r = txt2img(http, "a lamp", 8, unit(control, weight=0.9), **switch)
            assert r.status_code == 200, r.text[:300]
            on_a = txt2img(http, "a lamp", 8, unit(control, weight=0.9))
            assert on_a.status_code == 200, on_a.text[:300]
    from sd35m_mlx.loading.controlnet import load_controlnet

    b = other()
    b.controlnets = [load_controlnet(nets["edges"])]
    want = b.generate("a lamp", control_image=control, controlnet_conditioning_scale=0.9, seed=8, **SMALL)[0]
    assert np.array_equal(pixels(r.json()["images"][0]), pixels(want))
    want = with_nets("edges").generate("a lamp", control_image=control, controlnet_conditioning_scale=0.9, seed=8,
                                       **SMALL)[0]  # fmt: skip
    assert np.array_equal(pixels(on_a.json()["images"][0]), pixels(want))
    assert "Model: tiny-random" in json.loads(r.json()["info"])["infotexts"][0]


def test_the_controlnet_cache_keeps_the_least_recently_used_within_its_budget(pipe, nets):
    from sd35m_mlx.server.controlnets import ControlNetLibrary

    library = ControlNetLibrary({n: str(f) for n, f in nets.items()}, cache_bytes=0)  # each over the budget
    first = library.load(pipe, "edges")
    assert library.load(pipe, "depth") is not first and library.loaded() == ["depth"]  # the one asked for stays
    library.cache_bytes = 1 << 40
    library.load(pipe, "edges"), library.load(pipe, "depth"), library.load(pipe, "edges")
    assert library.loaded() == ["depth", "edges"]  # both fit: kept, the most recently used last


def test_hub_controlnets_are_downloaded_before_serving_not_in_the_worker(nets, monkeypatch):
    from sd35m_mlx.loading import controlnet
    from sd35m_mlx.server.controlnets import local_sources

    fetched = []
    monkeypatch.setattr(controlnet, "fetch_controlnet", lambda repo, rev=None: fetched.append(repo) or nets["edges"])
    sources = {"local": str(nets["depth"]), "canny": "tensorart/SD3.5M-Controlnet-Canny"}
    assert local_sources(sources) == {"local": str(nets["depth"]), "canny": str(nets["edges"])}
    assert fetched == ["tensorart/SD3.5M-Controlnet-Canny"]
