"""Several ranks on 127.0.0.1 with the ring backend (tiny random-weight pipeline): data-parallel seeds and
--split cfg give the same files and pixels as one process; failures and mismatches stop every rank.

Every process runs with SD35M_MLX_NO_OPENBLAS=1: MLX's own CPU matmul gives each row of a batch the
same result whatever the batch size, OpenBLAS's sgemm does not (~1e-6 apart), and --split cfg runs the
transformer on half the batch. With the same matmul the comparisons here are exact, no tolerance.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sd35m_mlx.distributed import differences, fingerprint, rounds
from sd35m_mlx.distributed.watchdog import Watchdog
from sd35m_mlx_cli.main import cli

REPO = Path(__file__).resolve().parents[1]
CLI = "from sd35m_mlx_cli.main import main; main()"
TIMEOUT = 120  # seconds a whole multi-process run may take before the test gives up on it
COMMON = ["a red cube", "--model", "model", "--width", "64", "--height", "64", "--dtype", "float32", "-q"]
REFERENCE_ARGS = [*COMMON, "--steps", "3", "--seed", "7", "-n", "3"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update(PYTHONPATH=str(REPO), SD35M_MLX_NO_OPENBLAS="1", SD35M_MLX_PEER_TIMEOUT="60", HF_HUB_OFFLINE="1")
    e.pop("MLX_RANK", None)
    e.pop("MLX_HOSTFILE", None)
    e.update(extra)
    return e


def workdir(path: Path, model: Path | None) -> Path:
    """A fresh folder with `model` linked in as ./model (a rank's own machine)."""
    path.mkdir(parents=True)
    if model is not None:
        (path / "model").symlink_to(model)
    return path


@pytest.fixture(scope="module")
def reference(tiny_pipeline, tmp_path_factory):
    """One process's files for REFERENCE_ARGS, to compare the ranks' with."""
    one = workdir(tmp_path_factory.mktemp("reference") / "one", tiny_pipeline)
    single = one_process(REFERENCE_ARGS, one)
    assert single.returncode == 0, single.stderr
    assert single.stdout == "sd35m-7.png\nsd35m-8.png\nsd35m-9.png\n"
    return one


def one_process(args, cwd):
    return subprocess.run([sys.executable, "-c", CLI, *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=TIMEOUT)  # fmt: skip


class Rank:
    """One rank started by hand (as mlx.launch would: MLX_RANK and a hostfile), its stderr read live."""

    def __init__(self, rank, hostfile, args, cwd, code=CLI, **extra_env):
        self.p = subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, text=True,
                                  env=env(MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile), **extra_env),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        self.err_lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.err_lines.extend(self.p.stderr), daemon=True)
        self._reader.start()

    def wait(self, timeout=TIMEOUT):
        out = self.p.stdout.read()
        self.p.wait(timeout)
        self._reader.join(5)
        self.out, self.err, self.rc = out, "".join(self.err_lines), self.p.returncode
        return self


def ranks(tmp_path, args_per_rank, cwds, code=CLI, **extra_env) -> list[Rank]:
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(len(cwds))]))
    pairs = zip(args_per_rank, cwds, strict=True)
    return [Rank(r, hostfile, a, c, code, **extra_env) for r, (a, c) in enumerate(pairs)]


def pixels(path):
    return np.asarray(Image.open(path))


def pngs(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.suffix == ".png")


def leftovers(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.startswith(".") or p.suffix == ".part"]


def assert_same_files(a: Path, b: Path, names):
    assert pngs(a) == pngs(b) == sorted(names)
    for name in names:
        assert np.array_equal(pixels(a / name), pixels(b / name)), name
        assert Image.open(a / name).text == Image.open(b / name).text, name


# ---------------------------------------------------------------------------------------------------
# Pieces, in one process


def test_rounds_spread_uneven_counts_in_order():
    assert [list(r) for r in rounds(5, 2)] == [[0, 1], [2, 3], [4]]
    assert [list(r) for r in rounds(2, 3)] == [[0, 1]]


def test_a_single_process_is_a_group_of_one(monkeypatch):
    import mlx.core as mx

    from sd35m_mlx.distributed import Ranks, launched_backend

    for name in ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launched_backend() is None
    ranks = Ranks.join()
    assert (ranks.rank, ranks.size, ranks.primary) == (0, 1, True)
    assert ranks.check(None, "loading", seeds=[1]) == [{"error": None, "seeds": [1]}]
    assert ranks.all_gather(mx.ones((2, 3)), "x").shape == (1, 2, 3)
    with pytest.raises(ValueError, match="boom"):
        ranks.check(ValueError("boom"), "loading")
    assert ranks.sent_bytes == 0


def test_cfg_split_needs_two_ranks_and_guidance():
    from types import SimpleNamespace

    from sd35m_mlx.distributed import CfgSplitDenoiser
    from sd35m_mlx.sampling.guidance import GuidanceConfig

    def make(size, scale):
        ranks = SimpleNamespace(size=size, rank=0)
        return CfgSplitDenoiser(None, None, None, [1.0], GuidanceConfig(scale=scale), 0, None, ranks=ranks)

    with pytest.raises(ValueError, match="exactly 2 ranks, got 3"):
        make(3, 4.5)
    with pytest.raises(ValueError, match="needs guidance_scale > 1"):
        make(2, 1.0)


def test_watchdog_ends_a_process_stuck_past_its_limit():
    code = (
        "import time\nfrom sd35m_mlx.distributed.watchdog import Watchdog\n"
        "w = Watchdog()\nwith w.armed(0.5, 'rank 0: stuck'):\n    time.sleep(30)\n"
    )
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=30)
    assert p.returncode == -signal.SIGTERM and "Error: rank 0: stuck" in p.stderr
    assert time.perf_counter() - t0 < 15


def test_watchdog_disarmed_in_time_does_nothing():
    w = Watchdog()
    with w.armed(5, "never"):
        pass
    w.close()


def test_fingerprint_tells_copies_from_other_weights(tiny_pipeline, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_pipeline, copy)
    settings = {"steps": 2}
    a = fingerprint(settings, tiny_pipeline)
    assert differences(a, fingerprint(settings, copy)) == []  # a copy (new file times) is the same model
    assert differences(a, fingerprint({"steps": 3}, copy)) == ["setting steps"]
    vae = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(vae.read_bytes())
    data[-4:] = bytes(4)  # other weights, same size and header
    vae.write_bytes(bytes(data))
    assert differences(a, fingerprint(settings, copy)) == ["model files"]


def test_split_cfg_in_one_process_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MLX_RANK", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["p", "--split", "cfg"])
    assert result.exit_code == 2
    assert "--split cfg shares each image between two processes" in result.output


# ---------------------------------------------------------------------------------------------------
# Two ranks


def test_seeds_spread_over_two_ranks_match_one_process(tiny_pipeline, reference, tmp_path):
    cwds = [workdir(tmp_path / f"rank{r}", tiny_pipeline) for r in range(2)]
    r0, r1 = [r.wait() for r in ranks(tmp_path, [REFERENCE_ARGS] * 2, cwds)]  # 3 images: 2, then 1
    assert r0.rc == 0 and r1.rc == 0, r0.err + r1.err
    assert r0.out == "sd35m-7.png\nsd35m-8.png\nsd35m-9.png\n"
    assert_same_files(reference, cwds[0], ["sd35m-7.png", "sd35m-8.png", "sd35m-9.png"])  # 8 was made on rank 1
    assert pngs(cwds[1]) == [] and r1.out == "" and r1.err == ""  # rank 1 writes and says nothing


def test_split_cfg_under_mlx_launch_matches_one_process(tiny_pipeline, reference, tmp_path):
    launcher = shutil.which("mlx.launch") or str(Path(sys.executable).with_name("mlx.launch"))
    args = [*COMMON, "--steps", "3", "--seed", "8", "--split", "cfg"]
    both = workdir(tmp_path / "both", tiny_pipeline)
    port = free_ports(1)[0]
    p = subprocess.run([launcher, "-n", "2", "--backend", "ring", "--starting-port", str(port),
                        "--", sys.executable, "-c", CLI, *args],
                       cwd=both, env=env(), capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    # mlx.launch itself exits 0 even when a rank fails; a failed rank shows as "[WARN] Node with rank ..."
    assert "WARN" not in p.stderr and p.stdout == "sd35m-8.png\n", p.stderr
    assert pngs(both) == ["sd35m-8.png"]
    assert np.array_equal(pixels(reference / "sd35m-8.png"), pixels(both / "sd35m-8.png"))
    assert Image.open(reference / "sd35m-8.png").text == Image.open(both / "sd35m-8.png").text


SPLIT_WORKER = """
import sys
import numpy as np
import pytest
from sd35m_mlx import StableDiffusion35
from sd35m_mlx.distributed import Ranks, split_cfg

ranks = Ranks.join()
pipe = StableDiffusion35.from_pretrained(sys.argv[1], dtype="float32")
if ranks.size > 1:
    split_cfg(pipe, ranks)
# SLG on a real layer (the tiny model has 4) over steps 1-2 of 4: the cond rank's extra pass is exchanged
x = pipe.generate("a red cube", height=64, width=64, num_inference_steps=4, seed=3, output_type="np",
                  skip_guidance_layers=[1], skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.75)
if ranks.rank == 0:
    np.save(sys.argv[2], x)
ranks.close()
"""


def test_split_cfg_with_skip_layer_guidance_is_exact(tiny_pipeline, tmp_path):
    single = subprocess.run([sys.executable, "-c", SPLIT_WORKER, str(tiny_pipeline), str(tmp_path / "one.npy")],
                            env=env(), capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert single.returncode == 0, single.stderr
    args = [str(tiny_pipeline), str(tmp_path / "split.npy")]
    results = [r.wait() for r in ranks(tmp_path, [args, args], [tmp_path, tmp_path], SPLIT_WORKER)]
    assert all(r.rc == 0 for r in results), "".join(r.err for r in results)
    one, split = np.load(tmp_path / "one.npy"), np.load(tmp_path / "split.npy")
    assert one.std() > 0.01
    np.testing.assert_array_equal(split, one)  # bit for bit: same float32 arithmetic (see module docstring)


@pytest.mark.parametrize(
    "how, message",
    [
        ("kill", "lost the connection to rank 1 while making images 1-2"),  # its sockets close: at once
        pytest.param(  # sockets stay open: the watchdog ends the wait (10 s at least, hence slow)
            "freeze", "no answer from rank 1 for 10 s while making images 1-2", marks=pytest.mark.slow
        ),
    ],
    ids=["kill", "freeze"],
)
def test_rank_that_dies_or_hangs_stops_the_other_naming_it_and_nothing_is_written(tiny_pipeline, tmp_path, how,
                                                                                   message):  # fmt: skip
    args = [*COMMON[:-1], "--steps", "20", "--seed", "1", "-n", "2"]  # rank 0 reports progress
    cwds = [workdir(tmp_path / f"rank{r}", tiny_pipeline) for r in range(2)]
    r0, r1 = ranks(tmp_path, [args, args], cwds, SD35M_MLX_PEER_TIMEOUT="10")
    deadline = time.monotonic() + TIMEOUT
    while not any("denoising" in line for line in r0.err_lines):  # both ranks are making their image
        assert r0.p.poll() is None and time.monotonic() < deadline, "".join(r0.err_lines)
        time.sleep(0.05)
    r1.p.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    t0 = time.monotonic()
    r0.wait()
    r1.p.kill()
    assert r0.rc == (1 if how == "kill" else -signal.SIGTERM) and time.monotonic() - t0 < 60
    assert f"Error: rank 0: {message}" in r0.err
    assert pngs(cwds[0]) == [] and leftovers(cwds[0]) == []


def test_rank_that_cannot_load_stops_every_rank_before_generating(tiny_pipeline, tmp_path):
    args = [*COMMON, "--steps", "2", "--seed", "1"]
    cwds = [workdir(tmp_path / "rank0", tiny_pipeline), workdir(tmp_path / "rank1", None)]  # no model on rank 1
    r0, r1 = [r.wait() for r in ranks(tmp_path, [args, args], cwds)]
    assert r1.rc == 2 and "Error: rank 1: --model model: no such folder" in r1.err
    assert r0.rc == 1
    assert "Error: rank 0: stopped because rank 1 failed loading the model: --model model: no such folder" in r0.err
    assert pngs(cwds[0]) == [] and leftovers(cwds[0]) == []


def test_mismatched_settings_are_detected_before_generating(tiny_pipeline, tmp_path):
    args = [*COMMON, "--seed", "1"]
    cwds = [workdir(tmp_path / f"rank{r}", tiny_pipeline) for r in range(2)]
    r0, r1 = [r.wait() for r in ranks(tmp_path, [[*args, "--steps", "2"], [*args, "--steps", "3"]], cwds)]
    for r in (r0, r1):
        assert r.rc == 2 and "rank 1 differs from rank 0 in setting steps" in r.err, r.err
    assert pngs(cwds[0]) == [] and leftovers(cwds[0]) == []
