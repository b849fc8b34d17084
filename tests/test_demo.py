"""`xlkernels demo`: a smoke run on a tiny random model, and `demo --quick` on the embedded real model."""
import json
import os

import pytest

from xlkernels import cli
from xlkernels.analysis.evaluation.langid import detect


def test_demo_tiny_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--tiny", "llama", "--quick", "--n", "8", "--max-new-tokens", "4", "--no-progress",
                   "--prompt", "Hello", "--shift", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    for needle in ("language attention heads", "language neurons", "steering English prompts toward de",
                   "heads_shift_de", "neurons_en_to_de", "artifacts"):
        assert needle in text
    assert "FAILED" not in text
    for fn in ("heads.png", "neurons.png", "neuron_stats.safetensors", "demo.json"):
        assert os.path.getsize(out / fn) > 0
    summary = json.loads((out / "demo.json").read_text())
    assert summary["failed"] == [] and summary["neurons"]["languages"] == ["en", "de", "fr"]
    assert len(summary["steering"]["generations"]) == 1


def test_demo_reports_a_failing_step(tmp_path, capsys, monkeypatch):
    from xlkernels.analysis.steering import shift
    monkeypatch.setattr(shift, "shift_bank", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    rc = cli.main(["demo", "--tiny", "llama", "--quick", "--n", "8", "--max-new-tokens", "2", "--no-progress",
                   "--prompt", "Hi", "--shift", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 1
    assert "steering English prompts toward de FAILED: RuntimeError: boom" in text
    assert "Traceback" in text and "neurons.png" in text


def test_demo_bad_arguments(capsys):
    assert cli.main(["demo", "--tiny", "llama", "--target", "xx"]) == 1
    assert "--target" in capsys.readouterr().err


@pytest.mark.model
def test_demo_quick_real_model(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--quick", "--no-progress", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    summary = json.loads((out / "demo.json").read_text())
    assert summary["model"].startswith("gemma-3-270m")
    assert sum(summary["neurons"]["lape"]["per_language"].values()) > 0
    gens = summary["steering"]["generations"]
    assert gens and all(g["plain"] != g["neurons_en_to_de"] for g in gens)
    # the neuron intervention moves the continuation of an English prompt into German
    assert "de" in detect([g["neurons_en_to_de"] for g in gens]), gens
    assert "de" not in detect([g["plain"] for g in gens]), gens
