"""The studio page's server side: A1111 save_images into the output folder, /studio/history (listed across
restarts, filtered, paged, opened, deleted, never outside the folder) and /studio/config (the resident model's
limits and defaults), on the tiny fixture. Also: img2img at another size than its init image equals the library's
Lanczos resize (the page's "upscale" is that request)."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import time

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from sd35m_mlx.server.spec import Limits  # noqa: E402
from tests.server_helpers import RunningServer, b64, pixels, png  # noqa: E402

ONE = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 1, "seed": 11, "save_images": True}
A1111_TEXT = "a castle on a hill\nNegative prompt: blurry\nSteps: 30, Sampler: DPM++ 2M, CFG scale: 7, Seed: 42"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("history")


@pytest.fixture(scope="module")
def server_options(folder):
    return dict(model_name="sd35m-tiny", output_dir=str(folder))


def write_png(path, prompt: str | None, mtime: float | None = None, size=(8, 8)) -> None:
    info = PngInfo()
    if prompt is not None:
        info.add_text("parameters", f"{prompt}\nSteps: 30, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8")
    Image.new("RGB", size, (1, 2, 3)).save(path, format="PNG", pnginfo=info)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def clear(folder) -> None:
    for p in folder.iterdir():
        p.unlink()


# -- save_images --------------------------------------------------------------------------------------------


def test_save_images_writes_numbered_files_with_the_answers_metadata_and_never_overwrites(http, folder):
    clear(folder)
    write_png(folder / "00007-99.png", "older")  # A1111's counter goes on from the highest number
    before = (folder / "00007-99.png").read_bytes()
    r = http.post("/sdapi/v1/txt2img", json={**ONE, "batch_size": 2})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["saved"] == ["00008-11.png", "00009-12.png"]
    for name, image in zip(info["saved"], r.json()["images"], strict=True):
        assert (folder / name).read_bytes() == base64.b64decode(image)  # the answer's bytes, metadata included
        with Image.open(folder / name) as im:
            assert im.text["parameters"].startswith("a red cube\n") and json.loads(im.text["sd35m-mlx"])["seed"]
    assert (folder / "00007-99.png").read_bytes() == before
    again = json.loads(http.post("/sdapi/v1/txt2img", json=ONE).json()["info"])["saved"]
    assert again == ["00010-11.png"]  # same seed, a new number: nothing overwritten
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_save_images_off_by_default_and_on_img2img(http, folder):
    clear(folder)
    r = http.post("/sdapi/v1/txt2img", json={k: v for k, v in ONE.items() if k != "save_images"})
    assert json.loads(r.json()["info"])["saved"] == [] and list(folder.iterdir()) == []
    init = b64(png(Image.new("RGB", (64, 64), (200, 10, 10))))
    r = http.post("/sdapi/v1/img2img", json={**ONE, "init_images": [init], "denoising_strength": 0.5})
    assert json.loads(r.json()["info"])["saved"] == ["00000-11.png"] and (folder / "00000-11.png").is_file()


def test_url_images_stay_out_of_the_history(http, folder):
    clear(folder)
    body = {"prompt": "p", "size": "64x64", "steps": 1, "response_format": "url"}
    assert http.get(http.post("/v1/images/generations", json=body).json()["data"][0]["url"]).status_code == 200
    assert list(folder.iterdir()) == [] and http.get("/studio/history").json()["total"] == 0


def test_a_save_never_replaces_a_file_that_appears_meanwhile(tmp_path, monkeypatch):
    from sd35m_mlx.server.history import History

    h = History(tmp_path)
    (tmp_path / "00000-5.png").write_bytes(b"theirs")
    monkeypatch.setattr(h, "_next_number", lambda: 0)  # as if another writer took 00000 after our scan
    assert h.save([(b"ours", 5)]) == ["00001-5.png"]
    assert (tmp_path / "00000-5.png").read_bytes() == b"theirs" and (tmp_path / "00001-5.png").read_bytes() == b"ours"


def test_a_huge_number_in_the_folder_does_not_stop_saving(tmp_path):
    from sd35m_mlx.server.history import History

    (tmp_path / ("9" * 249 + "-1.png")).write_bytes(b"theirs")  # counting on from it: a name too long to create
    (tmp_path / "00041-7.png").write_bytes(b"theirs")
    assert History(tmp_path).save([(b"ours", 5)]) == ["00042-5.png"]


def test_saved_files_honour_the_umask(tmp_path):
    from sd35m_mlx.server.history import History

    old = os.umask(0o027)
    try:
        (name,) = History(tmp_path / "made" / "here").save([(b"x", 1)])  # the folder is made at the first save
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "made" / "here" / name).stat().st_mode) == 0o640


def test_a_folder_that_cannot_be_made_is_a_one_line_error_before_generating(pipe, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with RunningServer(pipe, output_dir=str(blocker / "sub")) as s, s.client() as http:
        r = http.post("/sdapi/v1/txt2img", json=ONE)
        assert r.status_code == 500 and "output folder is not writable" in r.json()["detail"]
        assert str(tmp_path) not in r.text and "\n" not in r.json()["detail"]
        assert http.get("/studio/history").json() == {"total": 0, "items": []}


def test_save_images_without_an_output_folder_is_said_in_warnings(pipe):
    with RunningServer(pipe) as s, s.client() as http:
        info = json.loads(http.post("/sdapi/v1/txt2img", json=ONE).json()["info"])
        assert info["saved"] == [] and any("save_images" in w for w in info["warnings"])
        assert http.get("/studio/config").json()["output_dir"] is False
        assert http.get("/studio/history/00000-1.png").status_code == 404


# -- history ------------------------------------------------------------------------------------------------


def test_history_lists_saved_images_with_their_prompts_after_a_restart(pipe, folder, server, http):
    clear(folder)
    http.post("/sdapi/v1/txt2img", json={**ONE, "prompt": "a blue sphere", "negative_prompt": "fog"})
    old = time.time() - 100
    jpeg = Image.new("RGB", (16, 8))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + A1111_TEXT.encode("utf-16-be")  # as A1111 writes a JPEG
    jpeg.save(folder / "a1111.jpg", exif=exif)
    os.utime(folder / "a1111.jpg", (old, old))
    write_png(folder / "plain.png", None, old - 10)  # no metadata: listed, prompt ""
    (folder / "notes.txt").write_text("not an image")
    write_png(folder / ".hidden.png", "hidden")
    (folder / "sub").mkdir()
    write_png(folder / "sub" / "nested.png", "nested")
    with RunningServer(pipe, output_dir=str(folder)) as again, again.client() as http2:  # a new server, same folder
        r = http2.get("/studio/history")
    (folder / "sub" / "nested.png").unlink()
    (folder / "sub").rmdir()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == 3 and [i["name"] for i in body["items"]] == ["00000-11.png", "a1111.jpg", "plain.png"]
    ours, theirs, plain = body["items"]
    assert ours["prompt"] == "a blue sphere" and ours["negative_prompt"] == "fog" and ours["url"].endswith(ours["name"])
    assert (ours["width"], ours["height"]) == (64, 64) and ours["info"].startswith("a blue sphere\n")
    assert ours["parameters"]["Seed"] == "11" and ours["parameters"]["Size-1"] == "64"
    assert http.get(ours["url"]).content == (folder / "00000-11.png").read_bytes()
    assert theirs["prompt"] == "a castle on a hill" and theirs["parameters"]["Sampler"] == "DPM++ 2M"
    assert (theirs["width"], theirs["height"]) == (16, 8) and abs(theirs["mtime"] - old) < 1
    assert http.get(theirs["url"]).headers["content-type"] == "image/jpeg"
    assert plain["prompt"] == "" and plain["info"] == "" and plain["parameters"] == {}


def test_history_filter_and_pages(http, folder):
    clear(folder)
    now = time.time()
    for i in range(7):
        write_png(folder / f"{i:05}-1.png", f"a {'Red' if i % 2 else 'blue'} cube number {i}", now - 100 + i)
    everything = http.get("/studio/history").json()
    newest_first = [f"{i:05}-1.png" for i in range(6, -1, -1)]
    assert everything["total"] == 7 and [i["name"] for i in everything["items"]] == newest_first
    red = http.get("/studio/history", params={"q": "rED cube"}).json()
    assert red["total"] == 3 and [i["prompt"][-1] for i in red["items"]] == ["5", "3", "1"]
    page = http.get("/studio/history", params={"offset": 2, "limit": 2}).json()
    assert page["total"] == 7 and [i["name"] for i in page["items"]] == ["00004-1.png", "00003-1.png"]
    assert http.get("/studio/history", params={"offset": 7}).json() == {"total": 7, "items": []}
    for bad in ({"limit": 0}, {"limit": 100000}, {"offset": -1}):
        r = http.get("/studio/history", params=bad)
        assert r.status_code == 400 and list(bad)[0] in r.json()["detail"]


def test_history_rereads_a_file_that_changed(http, folder):
    clear(folder)
    write_png(folder / "x.png", "first", time.time() - 10)
    assert http.get("/studio/history").json()["items"][0]["prompt"] == "first"
    write_png(folder / "x.png", "second")
    assert http.get("/studio/history").json()["items"][0]["prompt"] == "second"


def test_delete_and_hostile_names(http, folder, tmp_path):
    clear(folder)
    write_png(folder / "gone.png", "bye")
    outside = tmp_path / "secret.png"
    write_png(outside, "secret")
    (folder / "link.png").symlink_to(outside)
    (folder / "notes.txt").write_text("keep")
    r = http.delete("/studio/history/gone.png")
    assert r.status_code == 200 and r.json() == {"deleted": "gone.png"} and not (folder / "gone.png").exists()
    assert http.delete("/studio/history/gone.png").status_code == 404
    hostile = ["link.png", "..%2Fsecret.png", "%2E%2E%2Fsecret.png", "%2E%2E/secret.png", "..%5Csecret.png",
               ".hidden.png", "notes.txt", "secret.png%00.png", f"%2F{str(outside)[1:].replace('/', '%2F')}",
               "%252E%252E%252Fsecret.png"]  # fmt: skip
    for name in hostile:
        for method in ("GET", "DELETE"):
            r = http.request(method, f"/studio/history/{name}")
            assert r.status_code in (400, 404), (method, name, r.status_code)
            assert r.headers["content-type"] == "application/json" and "\n" not in r.json()["detail"]
    assert outside.exists() and (folder / "link.png").is_symlink() and (folder / "notes.txt").exists()
    assert "link.png" not in [i["name"] for i in http.get("/studio/history").json()["items"]]
    (folder / "link.png").unlink()


def test_a_file_deleted_while_it_is_being_opened_is_a_404(http, folder, monkeypatch):
    """The page asks for images a delete in another tab may just have removed: a 404, never a 500."""
    from sd35m_mlx.server.history import History

    clear(folder)
    write_png(folder / "racing.png", "gone soon")
    checked = History.path_of

    def then_deleted(self, name):
        path = checked(self, name)
        path.unlink()  # between the check and the read
        return path

    monkeypatch.setattr(History, "path_of", then_deleted)
    r = http.get("/studio/history/racing.png")
    assert r.status_code == 404 and r.json()["detail"] == "no such image in the history"


@pytest.mark.parametrize("name", ["../secret.png", "/etc/passwd.png", "a/b.png", "a\\b.png", "x\0.png", ".h.png",
                                  "x.txt", "x", "", "..", "x.png/"])  # fmt: skip
def test_path_of_refuses_what_is_not_a_plain_image_name(tmp_path, name):
    from sd35m_mlx.server.errors import RequestError
    from sd35m_mlx.server.history import History

    (tmp_path / "in").mkdir()
    write_png(tmp_path / "secret.png", "secret")
    with pytest.raises(RequestError) as e:
        History(tmp_path / "in").path_of(name)
    assert e.value.status == 400


def test_history_urls_are_signed_for_img_src_and_deleting_needs_the_key(pipe, tmp_path):
    write_png(tmp_path / "a b é.png", "p")
    key = {"Authorization": "Bearer k"}
    with RunningServer(pipe, output_dir=str(tmp_path), api_key="k", signed_urls=True) as s:
        with httpx.Client(base_url=s.url, timeout=60) as http:
            assert http.get("/studio/history").status_code == 401 and http.get("/studio/config").status_code == 401
            (item,) = http.get("/studio/history", headers=key).json()["items"]
            assert "sig=" in item["url"] and http.get(item["url"]).status_code == 200  # no key: an <img src>
            assert http.get(item["url"].split("?")[0]).status_code == 401
            assert http.delete(item["url"]).status_code == 401 and (tmp_path / "a b é.png").exists()
            assert http.get("/studio/history", headers={**key, "Origin": "http://evil.example"}).status_code == 403
            assert http.delete(item["url"], headers=key).status_code == 200 and not (tmp_path / "a b é.png").exists()


def test_listing_2000_images_is_fast_once_read(tmp_path):
    from sd35m_mlx.server.history import History

    buf = io.BytesIO()
    info = PngInfo()
    info.add_text("parameters", A1111_TEXT)
    Image.new("RGB", (64, 64)).save(buf, format="PNG", pnginfo=info)
    for i in range(2000):
        (tmp_path / f"{i:05}-1.png").write_bytes(buf.getvalue())
    h = History(tmp_path)
    t0 = time.perf_counter()
    assert len(h.entries()) == 2000
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert h.entries()[0].prompt == "a castle on a hill"
    cached = time.perf_counter() - t0
    print(f"\nlisting 2000 PNGs: {first * 1000:.0f} ms first, {cached * 1000:.0f} ms cached")
    assert cached < first / 2  # the cache is what makes paging cheap


def trailing_text_png(size, text: str) -> bytes:
    """A PNG whose parameters text comes after the pixels (before IEND), as some tools write it."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, format="PNG")
    data = buf.getvalue()
    body = b"parameters\0" + text.encode("latin-1")
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    return data[:-12] + chunk + data[-12:]


def test_history_reads_text_after_the_pixels_without_decoding_them(tmp_path, monkeypatch):
    """A stranger's 6000x6000 PNG is a 100 kB file; decoding it to reach a trailing text chunk cost 100 MB."""
    from PIL import ImageFile

    from sd35m_mlx.server.history import read_entry

    (tmp_path / "big.png").write_bytes(trailing_text_png((6000, 6000), A1111_TEXT))
    (tmp_path / "plain.png").write_bytes(trailing_text_png((6000, 6000), "")[:-12])  # truncated, no IEND

    def no_decoding(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    entry = read_entry(tmp_path / "big.png", 0.0)
    assert (entry.width, entry.height, entry.prompt) == (6000, 6000, "a castle on a hill")
    assert entry.parameters["Steps"] == "30"
    assert read_entry(tmp_path / "plain.png", 0.0).info == ""


def test_history_lists_broken_huge_and_odd_files_in_one_bounded_answer(http, folder):
    clear(folder)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage" * 10)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    write_png(folder / "huge-text.png", "a cat, " * 200_000)  # 1.4 MB of prompt
    (folder / "dir.png").mkdir()
    os.mkfifo(folder / "fifo.png")
    write_png(folder / "fine.png", "fine")
    write_png(folder / os.fsdecode(b"latin-\xe9.png"), "a name in another encoding")  # JSON cannot carry it
    try:
        r = http.get("/studio/history", params={"limit": 200})
        assert r.status_code == 200 and len(r.content) < 20_000, len(r.content)  # megabytes of "settings" unsent
        items = {i["name"]: i for i in r.json()["items"]}
        assert set(items) == {"corrupt.png", "truncated.jpg", "huge-text.png", "fine.png"}
        assert items["corrupt.png"]["width"] is None and items["fine.png"]["prompt"] == "fine"
        assert items["huge-text.png"]["width"] == 8 and items["huge-text.png"]["info"] == ""
        for name in ("dir.png", "fifo.png"):
            assert http.get(f"/studio/history/{name}").status_code == 404
            assert http.delete(f"/studio/history/{name}").status_code == 404
    finally:
        (folder / "dir.png").rmdir()
        (folder / "fifo.png").unlink()


@pytest.mark.parametrize("swap", ["deleted", "a folder", "a fifo"])
def test_an_image_removed_while_it_is_being_opened_or_deleted_is_a_404_not_a_500(http, folder, monkeypatch, swap):
    """The page deletes images whose <img> may still be loading: the file goes between the name check and the
    answer (it was a 500 with a traceback in the log, or a connection cut half way)."""
    from sd35m_mlx.server.history import History

    clear(folder)
    write_png(folder / "going.png", "going")
    checked = History.path_of

    def path_of_then_swap(self, name):
        path = checked(self, name)
        path.unlink()
        if swap == "a folder":
            path.mkdir()
        elif swap == "a fifo":
            os.mkfifo(path)
        return path

    monkeypatch.setattr(History, "path_of", path_of_then_swap)
    for method in ("GET", "DELETE") if swap != "a fifo" else ("GET",):  # (a FIFO at the name is deleted: fine)
        if method == "DELETE":
            if (folder / "going.png").is_dir():
                (folder / "going.png").rmdir()
            clear(folder)
            write_png(folder / "going.png", "going")
        r = http.request(method, "/studio/history/going.png")
        assert r.status_code == 404 and r.json() == {"detail": "no such image in the history"}, method
    monkeypatch.undo()
    if (folder / "going.png").is_dir():
        (folder / "going.png").rmdir()
    clear(folder)
    write_png(folder / "kept.png", "kept")
    r = http.get("/studio/history/kept.png")
    assert r.status_code == 200 and r.content == (folder / "kept.png").read_bytes()
    assert r.headers["content-type"] == "image/png" and int(r.headers["content-length"]) == len(r.content)


def test_a_folder_that_refuses_a_delete_is_one_line_naming_the_image(tmp_path, monkeypatch):
    from pathlib import Path

    from sd35m_mlx.server.errors import RequestError
    from sd35m_mlx.server.history import History

    write_png(tmp_path / "kept.png", "kept")

    def refuse(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)  # a read-only folder (the tests may run as root)
    with pytest.raises(RequestError) as e:
        History(tmp_path).delete("kept.png")
    assert (e.value.status, e.value.message) == (500, "cannot delete kept.png: Permission denied")
    assert str(tmp_path) not in e.value.message


def test_a_file_replaced_by_a_fifo_while_listing_does_not_block(tmp_path):
    import threading

    from sd35m_mlx.server.history import read_entry

    os.mkfifo(tmp_path / "x.png")  # what read_entry meets when x.png was swapped after the folder was scanned
    done = []
    worker = threading.Thread(target=lambda: done.append(read_entry(tmp_path / "x.png", 0.0)), daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock the reader before failing
        os.close(os.open(tmp_path / "x.png", os.O_WRONLY | os.O_NONBLOCK))
    assert done and done[0].width is None


# -- config ---------------------------------------------------------------------------------------------------


def test_config_offers_the_tiny_models_limits(http):
    c = http.get("/studio/config").json()
    assert c == {
        "model": {"title": "sd35m-tiny", "max_width": 384, "max_height": 384, "multiple": 16, "default_width": 384,
                  "default_height": 384, "default_steps": 40, "max_steps": 200, "default_guidance": 4.5,
                  "max_count": 16},
        "output_dir": True, "lora_dir": False, "api_key": False, "controlnets": [],
    }  # fmt: skip


def test_config_takes_the_lower_of_the_servers_limits_and_the_models(pipe):
    with RunningServer(pipe, limits=Limits(max_side=200, max_steps=20, max_images=4)) as s, s.client() as http:
        m = http.get("/studio/config").json()["model"]
    assert (m["max_width"], m["default_width"], m["max_steps"], m["default_steps"], m["max_count"]) == (
        192, 192, 20, 20, 4)  # fmt: skip


def test_config_follows_a_model_switch(tiny_pipeline, pipe):
    from sd35m_mlx import StableDiffusion35

    loaders = {"sd35m-tiny": lambda: pipe, "tiny-random": lambda: StableDiffusion35.from_pretrained("tiny-random")}
    with RunningServer(pipe, model_name="sd35m-tiny", loaders=loaders) as s, s.client() as http:
        assert http.get("/studio/config").json()["model"]["max_width"] == 384
        assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-random"}).status_code == 200
        m = http.get("/studio/config").json()["model"]
        assert (m["title"], m["max_width"], m["default_width"]) == ("tiny-random", 2048, 1024)
        http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd35m-tiny"})


# -- the page's upscale: img2img to another size ----------------------------------------------------------------


def test_img2img_to_another_size_equals_the_librarys_lanczos_resize(http, pipe):
    from sd35m_mlx.upscale import lanczos

    source = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    body = {"prompt": "a fox", "width": 128, "height": 96, "steps": 2, "seed": 4, "cfg_scale": 5.0,
            "sampler_name": "Euler", "denoising_strength": 0.5, "init_images": [b64(png(source))]}  # fmt: skip
    r = http.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    got = pixels(r.json()["images"][0])
    assert got.shape == (96, 128, 3)
    want = pipe.generate("a fox", image=lanczos(source, (128, 96)), strength=0.5, width=128, height=96,
                         num_inference_steps=2, seed=4, guidance_scale=5.0)[0]  # fmt: skip
    assert np.array_equal(got, pixels(want))  # upscale_generate's second pass, pixel for pixel


# -- serve --output-dir -----------------------------------------------------------------------------------------


def test_serve_output_dir_default_env_and_a_folder_it_cannot_make(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import sd35m_mlx.server.run as run
    from sd35m_mlx_cli.main import cli

    got = {}
    monkeypatch.setattr(run, "serve", lambda pipe, **kw: got.update(kw))
    args = ["serve", "--model", "tiny-random", "--port", "0"]
    result = CliRunner().invoke(cli, args, env={"HOME": str(tmp_path), "SD35M_MLX_OUTPUT_DIR": None})
    assert result.exit_code == 0, result.output
    default = tmp_path / "Pictures" / "sd35m-mlx"
    assert got["config"].output_dir == str(default) and not default.exists()  # made at the first save only
    result = CliRunner().invoke(cli, args, env={"SD35M_MLX_OUTPUT_DIR": str(tmp_path / "env" / "out")})
    assert result.exit_code == 0 and got["config"].output_dir == str(tmp_path / "env" / "out")
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):
        result = CliRunner().invoke(cli, [*args, "--output-dir", str(bad)])
        assert result.exit_code == 2 and "--output-dir" in result.output and "Traceback" not in result.output
