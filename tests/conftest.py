# Import the package first so the system OpenBLAS is loaded before mlx.core (see sd35m_mlx/_blas.py).
import sd35m_mlx  # noqa: F401

# isort: split
import time

import pytest


@pytest.fixture(autouse=True)
def _no_hub_access(monkeypatch, tmp_path_factory):
    """No test may reach the Hugging Face Hub or a developer's real cache: offline, empty cache."""
    import huggingface_hub.constants as hf_constants

    cache = str(tmp_path_factory.getbasetemp() / "empty-hf-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", cache)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A tiny SD3.5-Medium-shaped pipeline with random weights, in the diffusers layout."""
    from scripts.build_fixture import build_tiny_pipeline

    t0 = time.perf_counter()
    folder = build_tiny_pipeline(tmp_path_factory.mktemp("fixtures") / "sd35m-tiny")
    print(f"\nbuilt tiny pipeline in {time.perf_counter() - t0:.2f}s")
    return folder


@pytest.fixture(scope="module")
def ours(tiny_pipeline):
    """Our pipeline on the tiny fixture, in float32 as every parity check. One per test module: a module
    that loads LoRAs, sets ControlNets or releases weights cannot leak that into another."""
    from sd35m_mlx import StableDiffusion35

    return StableDiffusion35.from_pretrained(tiny_pipeline, dtype="float32")


@pytest.fixture(scope="module")
def pipe(ours):
    """`ours` under the name the tests without a reference side use (CLI, server, threads, previews)."""
    return ours


@pytest.fixture(scope="session")
def tiny_sd3_medium_transformer(tmp_path_factory):
    """SD3-Medium-style transformer folder: no dual attention, no qk norm."""
    from scripts.build_fixture import build_transformer

    out = tmp_path_factory.mktemp("fixtures") / "sd3m-transformer"
    return build_transformer(out, seed=1, dual_attention_layers=(), qk_norm=None)


@pytest.fixture
def behind_cli(monkeypatch, tmp_path):
    """`behind_cli(pipe)`: the CLI gets `pipe` from load_pipeline (or calls `load` instead), and runs in a fresh
    current folder holding an empty `model` folder; returns `pipe`."""
    from sd35m_mlx_cli import model as model_io

    def use(pipe, load=None):
        monkeypatch.setattr(model_io, "load_pipeline", load or (lambda *a, **k: pipe))
        monkeypatch.chdir(tmp_path)
        (tmp_path / "model").mkdir()
        return pipe

    return use


@pytest.fixture(scope="module")
def server_options() -> dict:
    """Options of the module's `server` (`create_app`'s keywords); a server test module overrides this."""
    return {}


@pytest.fixture(scope="module")
def server(pipe, server_options):
    """A real uvicorn server on `pipe`, one per test module (tests/server_helpers.py)."""
    from tests.server_helpers import RunningServer

    with RunningServer(pipe, **server_options) as s:
        yield s


@pytest.fixture
def http(server):
    """An httpx client on `server`; on exit it waits for the server to be idle, ready for the next test."""
    with server.client() as client:
        yield client
