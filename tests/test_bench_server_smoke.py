"""benchmarks/bench_server.py keeps running (toy run: its figures mean nothing here, only that each is there)."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.mark.slow
def test_bench_server_reports_every_figure(tiny_pipeline, capsys):
    from benchmarks import bench_server

    r = bench_server.main(["--model", str(tiny_pipeline), "--runs", "1"])
    for key in ("direct", "direct_with_preview", "openai", "a1111", "health", "serialise_1024"):
        assert r[key]["min_s"] > 0
    assert r["rss_server_idle_bytes"] > 0 and r["rss_pipeline_only_bytes"] > 0
    assert "memory held by the idle server" in capsys.readouterr().out
