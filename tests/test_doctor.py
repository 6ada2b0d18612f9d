"""`sd35m-mlx doctor` and `--model tiny-random`: the newcomer's first commands, offline and without torch."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import sd35m_mlx.doctor as doctor
from sd35m_mlx.doctor.environment import Check, recommendations
from sd35m_mlx_cli.main import cli


def test_doctor_passes_every_check_on_this_machine():
    result = CliRunner().invoke(cli, ["doctor"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in ("build", "generate", "cancel", "quantize", "preview"):
        assert any(line.startswith(f"ok     {name}:") for line in lines), (name, result.output)
    for fact in ("mlx:", "device:", "memory:", "recommended:", "M5 neural accelerators:"):
        assert fact in result.output
    assert "FAILED" not in result.output and lines[-1] == "all checks passed"


def test_doctor_exits_1_naming_a_failed_check(monkeypatch):
    monkeypatch.setattr(doctor, "self_test", lambda: iter([Check("build", True, "x"), Check("cancel", False, "boom")]))
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 1
    assert "FAILED cancel: boom" in result.output and "1 check(s) FAILED" in result.output


def test_self_test_catches_a_broken_generate(monkeypatch):
    """A check that raises is reported FAILED with the reason, and the checks after it still run."""
    from sd35m_mlx.pipeline import StableDiffusion35

    real = StableDiffusion35.generate

    def broken(self, *args, **kwargs):
        if kwargs.get("preview") is None and kwargs.get("callback") is None:
            raise RuntimeError("no GPU stream on this thread")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusion35, "generate", broken)
    checks = {c.name: c for c in doctor.self_test()}
    assert checks["generate"].ok is False and "no GPU stream on this thread" in checks["generate"].detail
    assert checks["preview"].ok is True and checks["quantize"].ok is True


@pytest.mark.parametrize(
    "gb, flags",
    [(8, "--quantize 4 --t5-quantize 4 --low-memory"), (16, "--quantize 8 --t5-quantize 4 --low-memory"),
     (24, "--quantize 8 --t5-quantize 4"), (64, "defaults")],
)  # fmt: skip
def test_recommendations_follow_memory(gb, flags):
    assert flags in recommendations(gb * 10**9)[0].detail


def test_tiny_random_generates_offline_from_the_cli(tmp_path):
    out = tmp_path / "cat.png"
    args = ["a cat", "--model", "tiny-random", "--steps", "2", "--width", "64", "--height", "64", "-o", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "images are noise" in result.output
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 64, 3) and image.std() > 0


def test_tiny_random_is_the_same_model_every_build():
    from mlx.utils import tree_flatten

    from sd35m_mlx.loading.tiny_random import build_parts

    a, b = (dict(tree_flatten(build_parts().transformer.parameters())) for _ in range(2))
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_empty_model_is_refused():
    result = CliRunner().invoke(cli, ["a cat", "--model", ""])
    assert result.exit_code == 2
    assert "--model is empty" in result.output and "Traceback" not in result.output


def test_bench_skips_an_uncached_model_and_exits_0():
    """conftest keeps the HF cache empty and offline: the real model is not there, so nothing is measured."""
    result = CliRunner().invoke(cli, ["doctor", "--bench"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "stabilityai/stable-diffusion-3.5-medium is not in the Hugging Face cache; skipped" in result.output
    assert "| chip |" not in result.output and "build:" not in result.output  # no self-test, no table


def test_bench_table_row_on_tiny_random():
    from sd35m_mlx.doctor import bench

    args = ["doctor", "--bench", "--bench-model", "tiny-random", "--bench-size", "64"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    header, row = result.output.strip().splitlines()[-2:]
    assert header == bench.HEADER and row.startswith("| ") and row.count("|") == header.count("|")
    cells = [c.strip() for c in row.strip("|").split("|")]
    steps, images, peaks = ([float(v) for v in cells[i].split(" / ")] for i in (3, 4, 5))
    assert len(steps) == len(images) == len(peaks) == 3 and all(s > 0 for s in steps)  # tiny: peaks round to 0.0
    timings = bench.bench("tiny-random", 64, say=lambda m: None)
    assert all(t.peak_bytes > 0 and t.step_s > 0 and t.decode_s > 0 for t in timings.values())
    # seconds per image = text encoders + 40 steps + decode, from the same measurement
    t = bench.Timing(step_s=0.5, encode_s=2.0, decode_s=1.0, peak_bytes=int(3e9))
    assert t.image_s() == 23.0
    row = bench.table_row({"bf16": t, "q8": t, "q4": t}, memory=int(16e9), chip="Apple M4")
    assert row.startswith("| Apple M4 | 16 GB | ") and "| 0.50 / 0.50 / 0.50 | 23 / 23 / 23 | 3.0 / 3.0 / 3.0 |" in row
