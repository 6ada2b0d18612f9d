"""benchmarks/bench_soak.py keeps running: a handful of mixed requests (its growth figure means nothing here)."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


def test_bench_soak_runs_every_kind_of_request_without_5xx(capsys):
    from benchmarks import bench_soak

    args = ["--requests", "16", "--warmup", "8", "--every", "8", "--long-steps", "200", "--switch-runs", "1"]
    r = bench_soak.main(args)
    assert r["requests"] == 16 and r["server_errors"] == 0
    assert r["statuses"]["bad input"] == {400: 2} and r["statuses"]["disconnect"] == {499: 2}
    assert all(r["statuses"][k] == {200: 2} for k in ("txt2img", "generations", "edits", "lora a", "lora b"))
    assert [s["requests"] for s in r["samples"]] == [8, 16]
    assert all(s["rss_bytes"] and s["mlx_active_bytes"] > 0 for s in r["samples"])
    assert set(r["growth_after_warmup"]) == {"rss_bytes", "mlx_active_bytes"}
    assert set(r["lora_switch_s"]) == {"no LoRA", "switch, cached", "switch, uncached", "use_loras, cached",
                                       "use_loras, uncached"}  # fmt: skip
    assert all(t > 0 for t in r["lora_switch_s"].values())
    assert "server errors" in capsys.readouterr().out
