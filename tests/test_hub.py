"""Hugging Face Hub repo ids: a real HF cache folder laid out in the test, offline; error paths raise
huggingface_hub's own exceptions, built as huggingface_hub builds them. Nothing here reaches the network."""

import hashlib
import os
import socket
from pathlib import Path

import httpx2
import numpy as np
import pytest
from click.testing import CliRunner
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects, hf_raise_for_status
from PIL import Image

from sd35m_mlx import StableDiffusion35
from sd35m_mlx.loading import hub
from sd35m_mlx_cli import model as model_io
from sd35m_mlx_cli.main import cli

REPO = "stabilityai/stable-diffusion-3.5-medium"
COMMIT = "b940f670f0eda2d07fbb75229e779da1ad11eb80"
GATED = (
    f"{REPO} is gated: accept the licence at https://huggingface.co/{REPO} "
    "and log in with `hf auth login` (or set HF_TOKEN)"
)

# The repo's files as the Hub lists them, plus (marked *) what other diffusers repos carry: variants, pickles.
REPO_FILES = """
.gitattributes LICENSE.md README.md SD3.5M_example_workflow.json mmdit-x.png sd3.5_medium.safetensors
model_index.json scheduler/scheduler_config.json
text_encoder/config.json text_encoder/model.safetensors text_encoder/model.fp16.safetensors*
text_encoder/pytorch_model.bin* text_encoder_2/config.json text_encoder_2/model.safetensors
text_encoder_3/config.json text_encoder_3/model-00001-of-00002.safetensors
text_encoder_3/model-00002-of-00002.safetensors text_encoder_3/model.safetensors.index.json
text_encoder_3/model.fp16-00001-of-00002.safetensors*
text_encoders/README.md text_encoders/clip_g.safetensors text_encoders/clip_l.safetensors
text_encoders/t5xxl_fp16.safetensors text_encoders/t5xxl_fp8_e4m3fn.safetensors
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
tokenizer_2/merges.txt tokenizer_2/special_tokens_map.json tokenizer_2/tokenizer_config.json tokenizer_2/vocab.json
tokenizer_3/special_tokens_map.json tokenizer_3/spiece.model tokenizer_3/tokenizer.json
tokenizer_3/tokenizer_config.json transformer/config.json transformer/diffusion_pytorch_model.safetensors
transformer/diffusion_pytorch_model.fp16.safetensors* transformer/diffusion_pytorch_model.ckpt*
vae/config.json vae/diffusion_pytorch_model.safetensors vae/diffusion_pytorch_model.bin*
""".replace("*", "").split()


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty cache in tmp. huggingface_hub reads both env vars once, at import,
    into `constants`: patch those too."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def lay_out_cache(cache: Path, source: Path, skip: tuple[str, ...] = ()) -> Path:
    """The HF cache layout: blobs/<sha256>, snapshots/<commit>/<path> -> relative symlink to the blob,
    refs/main holding the commit. Returns the snapshot folder."""
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = file.relative_to(source)
        if rel.parts[0] in skip:
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def hub_error(status: int, url: str, error_code: str | None = None, error_message: str | None = None) -> Exception:
    """The exception huggingface_hub raises for this response (it builds them in `hf_raise_for_status`)."""
    headers = {"X-Error-Code": error_code} if error_code else {}
    headers |= {"X-Error-Message": error_message} if error_message else {}
    response = httpx2.Response(status, headers=headers, request=httpx2.Request("GET", url))
    try:
        hf_raise_for_status(response)
    except HfHubHTTPError as e:
        return e
    raise AssertionError(f"no error for HTTP {status}")


def raising(error: BaseException, cause: BaseException | None = None):
    def snapshot_download(*args, **kwargs):
        raise error from cause

    return snapshot_download


def test_hub_id_loads_from_the_offline_cache_and_generates(tiny_pipeline, offline):
    snapshot = lay_out_cache(offline, tiny_pipeline)
    assert hub.download(REPO) == snapshot

    pipe = StableDiffusion35.from_pretrained(REPO, dtype="float32")
    kw = dict(width=64, height=96, num_inference_steps=1, seed=3, output_type="np")
    image = pipe.generate("a red cube", **kw)
    assert image.shape == (1, 96, 64, 3) and np.isfinite(image).all()
    # The snapshot holds the fixture's files: same weights, same pixels (exact: same code, same inputs).
    local = StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32").generate("a red cube", **kw)
    assert np.array_equal(image, local)


def test_no_t5_neither_asks_for_nor_needs_text_encoder_3(tiny_pipeline, offline, monkeypatch):
    lay_out_cache(offline, tiny_pipeline, skip=("text_encoder_3", "tokenizer_3"))
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    real = hub.snapshot_download
    monkeypatch.setattr(hub, "snapshot_download", spy)
    pipe = StableDiffusion35.from_pretrained(REPO, dtype="float32", load_t5=False)
    assert pipe.prompt_encoder.text_encoder_3 is None
    assert calls and not [p for p in calls[0]["allow_patterns"] if "_3/" in p]


def test_allow_patterns_fetch_only_the_diffusers_safetensors():
    with_t5 = set(filter_repo_objects(REPO_FILES, allow_patterns=hub.allow_patterns()))
    assert with_t5 == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        *(f"{c}/config.json" for c in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")),
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "text_encoder_3/model.safetensors.index.json",
        "text_encoder_3/model-00001-of-00002.safetensors",
        "text_encoder_3/model-00002-of-00002.safetensors",
        *(f for f in REPO_FILES if f.startswith("tokenizer")),
    }
    no_t5 = set(filter_repo_objects(REPO_FILES, allow_patterns=hub.allow_patterns(load_t5=False)))
    assert no_t5 == {f for f in with_t5 if "_3/" not in f}
    tokenizers = set(filter_repo_objects(REPO_FILES, allow_patterns=["model_index.json", *hub.tokenizer_patterns()]))
    assert tokenizers == {"model_index.json", *(f for f in REPO_FILES if f.startswith("tokenizer"))}


def test_download_tokenizers_asks_only_for_tokenizer_folders(tiny_pipeline, offline, monkeypatch):
    snapshot = lay_out_cache(offline, tiny_pipeline)
    calls = []
    real = hub.snapshot_download
    monkeypatch.setattr(hub, "snapshot_download", lambda *a, **k: calls.append(k) or real(*a, **k))
    assert hub.download_tokenizers(REPO) == snapshot and (snapshot / "tokenizer_3" / "spiece.model").exists()
    assert all(p == "model_index.json" or p.startswith("tokenizer") for p in calls[0]["allow_patterns"])


def test_a_local_path_wins_over_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.is_hub_id(REPO)
    (tmp_path / "stabilityai" / "stable-diffusion-3.5-medium").mkdir(parents=True)
    assert not hub.is_hub_id(REPO)
    for not_an_id in ("./a/b", "~/models", "/models/sd", "a/b/c", "a--b/c", "models/sd3.5_medium.safetensors"):
        assert not hub.is_hub_id(not_an_id), not_an_id
    assert not hub.is_hub_id(Path("owner/name"))  # a Path is a path


def test_offline_and_not_cached_names_the_cache(offline):
    with pytest.raises(hub.ModelSourceError) as info:
        hub.download(REPO, revision="v2")  # the real snapshot_download: offline mode stops it before any request
    assert str(info.value) == (
        f"{REPO} (revision v2) is not in the Hugging Face cache ({offline}) and offline mode (HF_HUB_OFFLINE=1) "
        "forbids downloading it: unset HF_HUB_OFFLINE to download it once, or pass a local diffusers-layout "
        "folder instead"
    )
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)


def test_connection_refused_says_no_network(offline, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on: a real refused connection, on loopback only
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(hub.ModelSourceError, match=r"^cannot reach the Hugging Face Hub \(no network\?\)") as info:
        hub.download(REPO)
    assert f"not in its cache ({offline})" in str(info.value) and "HF_HUB_OFFLINE=1" in str(info.value)


RESOLVE = f"https://huggingface.co/{REPO}/resolve/{COMMIT}/model_index.json"


@pytest.mark.parametrize(
    "error, cause, message",
    [
        (hub_error(401, RESOLVE, "GatedRepo"), None, GATED),  # not logged in
        (hub_error(403, RESOLVE, "GatedRepo"), None, GATED),  # logged in, licence not accepted
        (hub_error(403, RESOLVE), None, GATED),
        (
            hub_error(401, RESOLVE, error_message="Invalid credentials in Authorization header"),
            None,
            "the Hugging Face token (HF_TOKEN, or from `hf auth login`) is invalid: run `hf auth login` again",
        ),
        (
            hub_error(401, f"https://huggingface.co/api/models/{REPO}x/revision/main"),
            None,
            f"{REPO}: no such repo on the Hugging Face Hub (if it is private, log in with `hf auth login` or set "
            "HF_TOKEN)",
        ),
        (
            hub_error(404, f"https://huggingface.co/api/models/{REPO}/revision/v9", "RevisionNotFound"),
            None,
            f"{REPO} has no revision 'v9' on the Hugging Face Hub (give a branch, tag or commit hash)",
        ),
        (
            hub_error(503, f"https://huggingface.co/api/models/{REPO}/revision/v9"),
            None,
            f"the Hugging Face Hub failed to serve {REPO} (revision v9) (HTTP 503): try again later, or pass a "
            "local diffusers-layout folder instead",
        ),
        (
            LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder ..."),
            httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"),
            f"cannot reach the Hugging Face Hub (no network?) and {REPO} (revision v9) is not in its cache",
        ),
        (
            httpx2.ConnectTimeout("timed out"),  # while fetching files, after the listing
            None,
            "cannot reach the Hugging Face Hub (no network?)",
        ),
        (
            LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder ..."),
            OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."),
            f"{REPO} (revision v9) is not in the Hugging Face cache (",
        ),
    ],
    ids="gated-401 gated-403 plain-403 bad-token not-found revision hub-down no-dns timeout offline".split(),
)
def test_hub_failures_become_one_line(monkeypatch, error, cause, message):
    monkeypatch.setattr(hub, "snapshot_download", raising(error, cause))
    with pytest.raises(hub.ModelSourceError) as info:
        hub.download(REPO, revision="v9")
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError) and info.value.__cause__ is error


def test_gated_error_types_are_what_huggingface_hub_raises():
    assert type(hub_error(403, RESOLVE, "GatedRepo")) is GatedRepoError
    assert type(hub_error(401, f"https://huggingface.co/api/models/{REPO}x")) is RepositoryNotFoundError
    assert type(hub_error(404, RESOLVE, "RevisionNotFound")) is RevisionNotFoundError


def test_partly_cached_offline_says_t5_was_never_downloaded(tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    (snapshot / "transformer").mkdir(parents=True)
    error = IncompleteSnapshotError("The cached snapshot ... is incomplete: 3 file(s) are missing", str(snapshot))
    monkeypatch.setattr(hub, "snapshot_download", raising(error, OfflineModeIsEnabled("offline")))
    with pytest.raises(hub.ModelSourceError, match="only partly in the Hugging Face cache .* --no-t5"):
        hub.download(REPO)


def test_other_errors_pass_through(monkeypatch):
    monkeypatch.setattr(hub, "snapshot_download", raising(PermissionError(13, "Permission denied")))
    with pytest.raises(PermissionError):
        hub.download(REPO)


def test_a_repo_without_model_index_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "snapshot_download", lambda *a, **k: str(tmp_path))
    with pytest.raises(hub.ModelSourceError, match="has no model_index.json: not a diffusers-layout repo"):
        hub.download("someone/sdxl-single-file")


# The CLI: `--model` takes a hub id through hub.download; load_pipeline stays its door (replaced here).


class FakePipeline:
    def generate(self, prompt, *, callback=None, **kwargs):
        return [Image.new("RGB", (kwargs["width"], kwargs["height"]))]


@pytest.fixture
def loads(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(
        model_io, "load_pipeline", lambda folder, dtype, t5, **options: calls.append((folder, t5)) or FakePipeline()
    )
    monkeypatch.chdir(tmp_path)
    return calls


def invoke(*args):
    return CliRunner().invoke(cli, ["a red cube", "--width", "64", "--height", "64", "--steps", "1", *args])


def test_cli_default_model_comes_from_the_cache(tiny_pipeline, offline, loads):
    snapshot = lay_out_cache(offline, tiny_pipeline, skip=("text_encoder_3", "tokenizer_3"))
    result = invoke("--no-t5", "--seed", "1")
    assert result.exit_code == 0, result.stderr
    assert loads == [(snapshot, False)] and result.stdout == "sd35m-1.png\n"


def test_cli_gated_repo_is_one_line_exit_1_without_traceback(monkeypatch, loads):
    monkeypatch.setattr(hub, "snapshot_download", raising(hub_error(403, RESOLVE, "GatedRepo")))
    result = invoke("--model", REPO)
    assert result.exit_code == 1 and result.stderr == f"Error: {GATED}\n"
    assert loads == [] and not list(Path().glob("*.png"))


def test_cli_offline_and_not_cached(offline, loads):
    result = invoke("--revision", "v2")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"Error: {REPO} (revision v2) is not in the Hugging Face cache ({offline})")


def test_cli_revision_is_for_hub_ids_only(loads):
    Path("model").mkdir()
    result = invoke("--model", "model", "--revision", "v2")
    assert result.exit_code == 2 and "--revision applies to a Hugging Face Hub --model" in result.stderr
    result = invoke("--model", "no/such/folder")
    assert result.exit_code == 2 and "no such folder (nor a Hugging Face Hub id" in result.stderr
