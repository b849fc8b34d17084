"""The benchmark infrastructure keeps working (CPU, temporary directories, tiny sizes)."""
import json
import math

import pytest
import torch

from bench import common, report, run_all


def test_timeit_cpu_quantiles_ordered():
    x = torch.randn(256, 256)
    t = common.timeit(lambda: x @ x, warmup=1, rep=7, device="cpu")
    assert set(t) == {"p50", "p20", "p80"}
    assert 0 < t["p20"] <= t["p50"] <= t["p80"] and all(math.isfinite(v) for v in t.values())


def test_timeit_budget_stops_early():
    import time
    calls = []
    t = common.timeit(lambda: (calls.append(1), time.sleep(0.01)), warmup=0, rep=1000, device="cpu", budget_s=0.05)
    assert 3 <= len(calls) < 100 and t["p50"] >= 9


def test_rate_swaps_quantiles():
    r = common.rate({"p50": 2.0, "p20": 1.0, "p80": 4.0}, 1e9)
    assert r["p50"] == pytest.approx(500) and r["p20"] == pytest.approx(250) and r["p80"] == pytest.approx(1000)


def test_ceilings_and_memory_cpu():
    bw = common.copy_bandwidth("cpu", nbytes=2**22, rep=3)
    tf = common.matmul_tflops("cpu", torch.float32, n=128, rep=2)
    assert bw["p50"] > 0 and tf["p50"] > 0
    mb = common.memory(lambda: torch.ones(2**23).add_(1), device="cpu")  # 32 MB
    assert mb is None or mb >= 0


def test_device_info_fields():
    info = common.device_info("cpu")
    for k in ("device", "torch", "triton", "transformers", "python", "cuda", "cpu_count", "commit", "dirty", "date"):
        assert k in info
    assert common.device_slug(info).startswith("cpu")


def _rows():
    t = {"p50": 2.0, "p20": 1.5, "p80": 2.5}
    return [common.row("toy", "torch", "forward", {"B": 2, "T": 8}, "ms", t),
            common.row("toy", "xlkernels", "forward", {"B": 2, "T": 8}, "ms", {"p50": 1.0}),
            common.row("toy", "xlkernels", "forward", "B2-T16", "GB/s", {"p50": float("nan")}, note="x")]


def test_record_and_report(tmp_path):
    path = common.record(_rows(), "selftest", out_dir=str(tmp_path))
    assert path.endswith("-selftest.json") and str(tmp_path) in path
    data = json.loads(open(path).read())  # strict JSON: NaN became null
    assert data["meta"]["torch"] == torch.__version__ and len(data["rows"]) == 3
    assert data["rows"][1]["p20"] == 1.0 and data["rows"][2]["p50"] is None
    sp = common.ratio(data["rows"], "torch")
    assert sp[1]["speedup"] == pytest.approx(2.0) and sp[0]["speedup"] == pytest.approx(1.0)
    out = report.report([path], str(tmp_path / "README.md"))
    md = open(out).read()
    assert "xlkernels vs torch" in md and "**2.00x**" in md
    assert list((tmp_path / "plots").glob("*.png"))


def test_record_rejects_bad_rows(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        common.record([{"op": "x"}], "bad", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="name"):
        common.record([], "a/b", out_dir=str(tmp_path))


def test_run_all_continues_after_failure(monkeypatch, capsys):
    import sys
    import types
    good = types.ModuleType("bench.bench_zz_good")
    good.main = lambda argv: 0
    bad = types.ModuleType("bench.bench_zz_bad")
    bad.main = lambda argv: 1 / 0
    monkeypatch.setitem(sys.modules, "bench.bench_zz_good", good)
    monkeypatch.setitem(sys.modules, "bench.bench_zz_bad", bad)
    monkeypatch.setattr(run_all, "discover", lambda: ["bench_zz_bad", "bench_zz_good"])
    assert run_all.main(["--quick"]) == 1
    out = capsys.readouterr().out
    assert "1 ok, 1 failed" in out and "ZeroDivisionError" in out


def test_run_all_discovers_benchmarks(capsys):
    assert "bench_head_steer" in run_all.discover()
    assert run_all.main(["--list", "--only", "head_steer"]) == 0
    assert capsys.readouterr().out.strip() == "bench_head_steer"


def test_timeit_cpu_clock_and_bad_clock():
    t = common.timeit(lambda: sum(range(10000)), warmup=1, rep=5, device="cpu", clock="cpu")
    assert t["p50"] >= 0
    with pytest.raises(ValueError, match="clock"):
        common.timeit(lambda: None, device="cpu", clock="gpu")
