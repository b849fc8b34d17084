"""`xlkernels shift --method itlc|incline` and `steer` with those plans, end to end on a tiny model;
the plan's itlc / incline sections: round trip and validation against the model."""
import json

import pytest
import torch

import xlkernels
from xlkernels.analysis.steering.incline import INCLINE
from xlkernels.analysis.steering.itlc import ITLC
from xlkernels.analysis.steering.plan import SteeringPlan
from xlkernels.cli import main
from xlkernels.models import tiny_model

TINY = ["--tiny", "llama", "--no-progress", "--device", "cpu"]
PROMPTS = ["Hello there", "Guten Tag"]


def _greedy(model, tok, prompt, n, ctx):
    b = tok(prompt, return_tensors="pt")
    b = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=pad, num_beams=1, temperature=None, top_p=None,
              top_k=None)
    if ctx == "incline":
        return b, kw
    with ctx:
        out = model.generate(**b, **kw)
    return tok.decode(out[0, b["input_ids"].shape[1]:], skip_special_tokens=True)


def _patched():
    model, tok = tiny_model("llama")
    return model, tok, xlkernels.patch(model)


def test_itlc_shift_then_steer_matches_api(tmp_path, capsys):
    out, g = tmp_path / "itlc", tmp_path / "g"
    assert main(["shift", *TINY, "--method", "itlc", "--langs", "en,de,fr", "--n", "10", "--epochs", "5",
                 "--lr", "0.01", "--alpha", "3", "--out", str(out)]) == 0
    assert "probe accuracy" in capsys.readouterr().out
    info = json.loads((out / "shift.json").read_text())
    assert info["method"] == "itlc" and info["layer"] == 1 and set(info["u_norm"]) == {"en", "de", "fr"}
    js = json.loads((out / "plan.json").read_text())
    assert js["itlc"]["langs"] == ["en", "de", "fr"] and js["itlc"]["alpha"] == 3.0 and js["version"] == 2
    model, tok, st = _patched()
    plan = SteeringPlan.load(out, model=st)
    assert plan.itlc.layer == 1 and plan.itlc_alpha == 3.0 and plan.gate is None and plan.shift is None
    # explicit source: same as ITLC.inject through the API
    assert main(["steer", *TINY, "--plan", str(out), "--target-lang", "de", "--source-lang", "en,fr",
                 "--alpha", "20", "--compare", "--max-new-tokens", "4", "--out", str(g), *PROMPTS]) == 0
    res = json.loads((g / "steer.json").read_text())
    assert [r["source"] for r in res["results"]] == ["en", "fr"] and res["itlc_alpha"] == 20
    for r, src in zip(res["results"], ["en", "fr"]):
        assert r["steered"] == _greedy(model, tok, r["prompt"], 4, plan.itlc.inject(model, "de", src, alpha=20.0))
        assert r["plain"] == _greedy(model, tok, r["prompt"], 4, st.disabled())
    assert any(r["plain"] != r["steered"] for r in res["results"])
    # default source: the probe's language per prompt
    assert main(["steer", *TINY, "--plan", str(out), "--target-lang", "fr", "--max-new-tokens", "2",
                 "--out", str(g), *PROMPTS]) == 0
    from xlkernels.analysis.align import embed
    res = json.loads((g / "steer.json").read_text())
    for r in res["results"]:
        x = embed(model, tok, [r["prompt"]], "mean", batch_size=1)[1]
        assert r["source"] == plan.itlc.langs[int(plan.itlc.predict(x)[0])]
        assert r["steered"] == _greedy(model, tok, r["prompt"], 2,
                                       plan.itlc.inject(model, "fr", r["source"], alpha=3.0))
    capsys.readouterr()
    assert main(["steer", *TINY, "--plan", str(out), "--prompt", "x"]) == 1
    assert "--target-lang" in capsys.readouterr().err
    assert main(["steer", *TINY, "--plan", str(out), "--target-lang", "ja", "--prompt", "x"]) == 1
    assert "'ja'" in capsys.readouterr().err
    assert main(["shift", *TINY, "--method", "itlc", "--langs", "en,de", "--n", "6", "--layer", "2",
                 "--out", str(out)]) == 1
    assert "--layer" in capsys.readouterr().err


def test_incline_shift_then_steer_matches_api(tmp_path, capsys):
    out, g = tmp_path / "inc", tmp_path / "g"
    assert main(["shift", *TINY, "--method", "incline", "--langs", "en,de", "--n", "8", "--sigma", "0.8",
                 "--out", str(out)]) == 0
    info = json.loads((out / "shift.json").read_text())
    assert info["src"] == "de" and len(info["W_norm"]) == 2 and all(0 <= r < 1 for r in info["rel_residual"])
    model, tok, st = _patched()
    plan = SteeringPlan.load(out / "plan.safetensors", model=st)
    assert plan.incline.W.shape == (2, 64, 64) and plan.incline.src == "de" and plan.sigma == 0.8
    # the plan's W is INCLINE.fit on the same pairs
    from xlkernels.analysis.data import parallel_corpus
    c = parallel_corpus(["en", "de"], n=8)
    ref = INCLINE.fit(model, tok, c["de"], c["en"], batch_size=8, max_length=128)
    torch.testing.assert_close(plan.incline.W, ref.W, rtol=1e-4, atol=1e-4)
    assert main(["steer", *TINY, "--plan", str(out), "--sigma", "1.5", "--compare", "--max-new-tokens", "4",
                 "--out", str(g), *PROMPTS]) == 0
    res = json.loads((g / "steer.json").read_text())
    assert res["sigma"] == 1.5
    for r in res["results"]:
        b, kw = _greedy(model, tok, r["prompt"], 4, "incline")
        got = plan.incline.generate(model, b, 1.5, **kw)
        assert r["steered"] == tok.decode(got[0, b["input_ids"].shape[1]:], skip_special_tokens=True)
    assert any(r["plain"] != r["steered"] for r in res["results"])
    capsys.readouterr()
    assert main(["shift", *TINY, "--method", "incline", "--langs", "de,fr", "--n", "4", "--out", str(out)]) == 1
    assert "en" in capsys.readouterr().err
    assert main(["shift", *TINY, "--method", "incline", "--langs", "en,de", "--src", "en", "--n", "4",
                 "--out", str(out)]) == 1
    assert "--src" in capsys.readouterr().err


def _latent_plan(D=64, L=2, meta=None):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, D, generator=g, dtype=torch.float64) + 3 * torch.arange(3).repeat_interleave(20)[:, None]
    it = ITLC.fit_features(X, torch.arange(3).repeat_interleave(20), ["en", "de", "fr"], layer=1, epochs=3)
    inc = INCLINE(torch.randn(L, D, D, generator=g), site="mlp", src="de")
    return SteeringPlan(itlc=it, itlc_alpha=0.7, incline=inc, sigma=-0.4, gate=torch.rand(2, 4, generator=g),
                        meta=dict(meta or {}))


def test_plan_latent_roundtrip(tmp_path):
    p = _latent_plan(meta={"num_layers": 2, "num_heads": 4, "head_dim": 16, "hidden_size": 64})
    st = p.save(tmp_path / "p")
    q = SteeringPlan.load(st, model=tiny_model("llama")[0])
    assert q.itlc_alpha == 0.7 and q.sigma == -0.4 and q.incline.site == "mlp" and q.incline.src == "de"
    assert torch.equal(q.incline.W, p.incline.W) and torch.equal(q.gate, p.gate)
    for k in ITLC._TENSORS:
        a, b = getattr(q.itlc, k), getattr(p.itlc, k)
        assert a.dtype == b.dtype and torch.equal(a, b), k
    assert q.itlc.langs == ["en", "de", "fr"] and q.itlc.layer == 1 and q.itlc.accuracy == p.itlc.accuracy
    torch.testing.assert_close(q.itlc.shift("de", "en"), p.itlc.shift("de", "en"))
    raw = st.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert {"itlc.scalings", "itlc.active", "incline.W", "gate"} <= set(header)
    # a plan without latent sections stays version 1
    SteeringPlan(gate=torch.rand(2, 4)).save(tmp_path / "v1")
    assert json.loads((tmp_path / "v1" / "plan.json").read_text())["version"] == 1


@pytest.mark.parametrize("case,field", [("itlc_dim", "itlc.mean"), ("incline_layers", "incline.W"),
                                        ("meta", "hidden_size=32"), ("itlc_layer", "itlc.layer")])
def test_plan_latent_mismatch_names_field(tmp_path, capsys, case, field):
    model = tiny_model("llama")[0]   # 2 layers, hidden 64
    if case == "itlc_dim":
        p = _latent_plan(D=32)
        p.incline = None
    elif case == "incline_layers":
        p = _latent_plan(L=3)
    elif case == "meta":
        p = _latent_plan(D=32, meta={"hidden_size": 32})
        p.incline = None
    else:
        p = _latent_plan()
        p.itlc.layer = 2
    p.save(tmp_path / "p")
    with pytest.raises(ValueError, match=field):
        SteeringPlan.load(tmp_path / "p", model=model)
    capsys.readouterr()
    assert main(["steer", *TINY, "--plan", str(tmp_path / "p"), "--target-lang", "de", "--prompt", "x"]) == 1
    assert field in capsys.readouterr().err


def test_plan_inject_needs_target_and_batch():
    p = _latent_plan()
    model = tiny_model("llama")[0]
    with pytest.raises(ValueError, match="target"):
        p.inject(model, batch={"input_ids": torch.ones(1, 2, dtype=torch.long)})
    with pytest.raises(ValueError, match="batch"):
        p.inject(model, target="de")
    assert SteeringPlan().inject(model) is not None      # empty plan: a no-op context
