"""benchmarks/bench_soak.py keeps running: a handful of mixed requests (its growth figure means nothing here)."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


def test_bench_soak_runs_every_kind_of_request_without_5xx(capsys):
    from benchmarks import bench_soak

    r = bench_soak.main(["--requests", "12", "--warmup", "6", "--every", "6", "--long-steps", "200"])
    assert r["requests"] == 12 and r["server_errors"] == 0
    assert r["statuses"]["bad input"] == {400: 2} and r["statuses"]["disconnect"] == {499: 2}
    assert all(r["statuses"][k] == {200: 2} for k in ("txt2img", "generations", "edits"))
    assert [s["requests"] for s in r["samples"]] == [6, 12]
    assert all(s["rss_bytes"] and s["mlx_active_bytes"] > 0 for s in r["samples"])
    assert set(r["growth_after_warmup"]) == {"rss_bytes", "mlx_active_bytes"}
    assert "server errors" in capsys.readouterr().out
