"""benchmarks/bench_speed.py keeps running: every section at toy size on the tiny fixture.

Timings here mean nothing; what is pinned is that the script's functions run against the current
model code and diffusers, feed both sides the same inputs (outputs agree), and report every figure.
"""

import json

import pytest

from benchmarks import bench_speed, torch_side
from benchmarks.speed_report import print_report

# Same weights and inputs on both sides in float32: only summation order differs (~1e-5 of the
# output std on the tiny fixture). A wrong input layout or a missing CFG step fails by O(1).
TOL = 1e-3


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    return bench_speed.parse_args(
        ["--quick", "--sizes", "128", "--ctx-len", "16", "--vae-size", "64", "--torch-in-process",
         "--json", str(tmp_path_factory.mktemp("bench") / "speed.json")]
    )  # fmt: skip


def test_bench_speed_sections_run_and_agree_with_diffusers(tiny_pipeline, args, capsys):
    run = torch_side.TorchRunner(isolate=False)
    steps = bench_speed.bench_transformer(tiny_pipeline / "transformer", args.sizes, args, run, "cpu")
    text = bench_speed.bench_text(tiny_pipeline, args, run, "cpu", full_size=False)
    vae = bench_speed.bench_vae(tiny_pipeline / "vae", args.vae_size, args, run, "cpu", full_size=False)

    (r,) = steps
    assert r["max_abs_err_over_std"] < TOL
    assert text["max_abs_err_over_std"] < TOL
    assert vae["max_abs_err_over_std"] < TOL
    # the tiny transformer has every block kind (dual, plain, context-pre-only): 24 blocks extrapolate
    assert set(r["ours"]["block_s"]) == {"dual", "plain", "pre_only"}
    assert r["ours"]["step_24_s"] > r["ours"]["step_s"] and r["diffusers"]["step_24_s"] > 0
    assert r["kernels"]["sum_s"] > 0 and r["efficiency"] > 0 and r["efficiency_24"] > 0
    assert set(r["kernels"]["by_kind_s"]) == {"linear", "attention", "norm", "elementwise"}
    assert r["diffusers"]["by_kind_s"].get("linear", 0) > 0

    results = {"meta": bench_speed._meta(args, torch_side.process_info("cpu")), "transformer": steps}
    results |= {"text": text, "vae": vae}
    print_report(results)
    out = capsys.readouterr().out
    for title in ("Transformer step", "Backend efficiency", "Step by kind of work", "Prompt encoding", "VAE decode"):
        assert title in out
    json.dumps(results, default=str)


def _openblas_after_importing_sd35m_mlx() -> bool:
    import sd35m_mlx  # noqa: F401  (as bench_speed's child does when it re-imports the script)

    return torch_side.openblas_loaded()


def test_diffusers_side_runs_without_our_openblas():
    """The spawned diffusers process imports sd35m_mlx yet must not load the system OpenBLAS: with it,
    torch's CPU attention runs ~60x slower and diffusers' figures would be wrong."""
    run = torch_side.TorchRunner(isolate=True)
    try:
        assert run(_openblas_after_importing_sd35m_mlx) is False
        assert run(torch_side.process_info, "cpu")["torch_process_openblas"] is False
    finally:
        run.close()


def test_bench_step_memory_runs_every_mode_and_restores_the_model(tiny_pipeline):
    import mlx.core as mx
    import numpy as np

    from benchmarks import bench_step_memory
    from sd35m_mlx.loading.transformer import load_transformer

    model = load_transformer(tiny_pipeline / "transformer", mx.float32)
    cfg, blocks, limit = model.config, list(model.transformer_blocks), mx.get_memory_limit()
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, 8, 8, cfg.in_channels), dtype=np.float32))
    ctx = mx.array(rng.standard_normal((2, 7, cfg.joint_attention_dim), dtype=np.float32))
    pooled = mx.array(rng.standard_normal((2, cfg.pooled_projection_dim), dtype=np.float32))
    for mode in bench_step_memory.MODES:
        r = bench_step_memory.run_mode(model, mode, x, ctx, pooled, mx.float32, 1, 1 << 30)
        assert r["mode"] == mode and r["step_s"] > 0 and r["work_gib"] >= 0
        assert all(a is b for a, b in zip(model.transformer_blocks, blocks, strict=True))
        assert mx.get_memory_limit() == limit


def test_bench_controlnet_runs_on_the_tiny_fixture(tiny_pipeline, tmp_path):
    """bench_controlnet keeps running against the current pipeline pieces (its timings mean nothing here)."""
    import mlx.core as mx

    from benchmarks import bench_controlnet
    from scripts.build_fixture import build_controlnet

    net = build_controlnet(tmp_path / "cn")
    r = bench_controlnet.bench(tiny_pipeline / "transformer", net, 64, mx.float32, None, 16, 0, 1)
    assert r["controlnet_step_s"] > 0 and r["plain_step_s"] > 0 and "extrapolated_ratio" in r
    assert r["controlnet_step_work_bytes"] > 0 and r["plain_step_work_bytes"] > 0
    assert r["flop_ratio_24_23_blocks"] > 1.5
