"""analysis.evaluate (`xlkernels eval`): rates, fluency, repetition and speed of steering plans, on a tiny
model with a planted effect: a head shift that forces one known token."""
import json
import math
import os

import pytest
import torch

import xlkernels
from xlkernels import cli
from xlkernels.analysis.evaluation import evaluate as ev
from xlkernels.analysis.steering.plan import SteeringPlan, model_meta
from xlkernels.models.tiny import tiny_model

PROMPTS = ["Hello there", "Guten Tag, wie", "abc", "The weather today is", "x"]


def planted(seed=0):
    """Tiny llama whose last-layer head 0 writes, through o_proj column 0, the lm_head row of byte 'x'
    (made the longest row): a large shift on that head's dim 0 makes every next token 'x'."""
    model, tok = tiny_model("llama", seed=seed)
    t = tok("x", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        W = model.lm_head.weight
        W[t] *= 1.2 * W.norm(dim=1).max() / W[t].norm()
        model.model.layers[-1].self_attn.o_proj.weight[:, 0] = W[t] / W[t].norm()
    st = xlkernels.patch(model)
    shift = torch.zeros(st.num_layers, st.num_heads, st.head_dim)
    shift[-1, 0, 0] = 1.0
    return model, tok, st, SteeringPlan(shift=shift, alpha=1000.0, meta=model_meta(st)), t


def fake_detect(texts, langs=None, min_confidence=None):
    """Identifier stub: all-'x' text is German, other text with a letter English, the rest unknown."""
    return ["de" if t and set(t) == {"x"} else "en" if any(c.isalpha() for c in t) else "unknown" for t in texts]


def reference_nll(model, tok, prompts, gens):
    """Token-weighted mean NLL of the generated ids after each prompt, one text at a time, full logits."""
    tot = n = 0.0
    for p, g in zip(prompts, gens):
        a = tok(p)["input_ids"]
        ids = torch.tensor([a + g])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        for j, tokid in enumerate(g):
            tot -= float(logp[len(a) + j - 1, tokid])
            n += 1
    return tot / n


def test_planted_token_gives_expected_rates(monkeypatch):
    model, tok, st, plan, t = planted()
    monkeypatch.setattr(ev.langid, "detect", fake_detect)
    monkeypatch.setattr(ev.langid, "degenerate", lambda text: False)   # the stub's 'xxxxxx' stands for German
    res = ev.evaluate(model, tok, {"force_x": plan}, PROMPTS, source="en", target="de",
                      strengths=[0.0, 1000.0], max_new_tokens=6, batch_size=2)
    rows = {(r["plan"], r["strength"]): r for r in res["rows"]}
    base, off, on = rows[("unsteered", None)], rows[("force_x", 0.0)], rows[("force_x", 1000.0)]
    assert res["rows"][0] is base and base["method"] == "none" and on["method"] == "shift"
    # the plan forces 'x' everywhere: every generation is German to the stub, none English
    assert on["generations"] == ["xxxxxx"] * len(PROMPTS)
    assert on["target_rate"] == 1.0 and on["source_rate"] == 0.0 and on["unknown_rate"] == 0.0
    assert on["languages"] == {"de": len(PROMPTS)}
    assert on["repetition"] == pytest.approx(1 - 1 / 4)          # 6 tokens: 4 trigrams, one distinct
    assert on["new_tokens"] == 6 * len(PROMPTS) and on["tokens_per_s"] > 0
    # alpha 0 is the unsteered model
    assert off["generations"] == base["generations"] and off["nll"] == pytest.approx(base["nll"], abs=1e-5)
    assert base["target_rate"] < 1.0
    assert base["target_rate"] + base["source_rate"] + base["unknown_rate"] == pytest.approx(1.0)
    # fluency: NLL of the generated tokens under the UNSTEERED model, against a one-text full-logits reference
    st.reset()
    gens = [[t] * 6] * len(PROMPTS)
    assert on["nll"] == pytest.approx(reference_nll(model, tok, PROMPTS, gens), rel=1e-4)
    base_ids = [tok(g, add_special_tokens=False)["input_ids"] for g in base["generations"]]
    if all(len(b) == 6 for b in base_ids):   # decode/encode round trip of random bytes can differ
        assert base["nll"] == pytest.approx(reference_nll(model, tok, PROMPTS, base_ids), rel=1e-4)
    assert on["nll_delta"] == pytest.approx(on["nll"] - base["nll"])
    assert on["nll"] > base["nll"]
    # the steerer is left clean
    assert float(st.shift.abs().sum()) == 0.0 and st._bank is None
    assert ev.best(res)["force_x"] is on
    assert ev.best(res, max_nll_delta=0.01)["force_x"] is off


def test_degenerate_generations_never_count_as_a_language():
    texts = ["Die Sonne scheint heute über der Stadt.", ". Die 1.000.0000000", "-A-Wochen-Wochen-Wochen-W",
             "Wochen Wochen Wochen Wochen", "The weather is nice and warm today."]
    counts = ev.language_counts(texts, ["en", "de"])
    assert counts == {"de": 1, "degenerate": 3, "en": 1}


def test_prompt_only_and_generated_only(monkeypatch):
    model, tok, st, plan, t = planted()
    monkeypatch.setattr(ev.langid, "detect", fake_detect)
    monkeypatch.setattr(ev.langid, "degenerate", lambda text: False)   # the stub's 'xxxxxx' stands for German
    x = tok.decode([t])
    kw = dict(source="en", target="de", strengths=[1000.0], max_new_tokens=5, batch_size=5)
    base = ev.evaluate(model, tok, {}, PROMPTS, **kw)["rows"][0]["generations"]
    prompt = ev.evaluate(model, tok, {"p": plan}, PROMPTS, steer_tokens="prompt", baseline=False, **kw)
    gen = ev.evaluate(model, tok, {"p": plan}, PROMPTS, steer_tokens="generated", baseline=False, **kw)
    # prompt only: the first token comes from the steered prefill, the rest is unsteered
    assert all(g.startswith(x) for g in prompt["rows"][0]["generations"])
    assert prompt["rows"][0]["target_rate"] < 1.0 and prompt["steer_tokens"] == "prompt"
    # generated only: the first token is the unsteered one, every later one is 'x'
    for g, b in zip(gen["rows"][0]["generations"], base):
        assert g[0] == b[0] and g[1:] == x * 4


def test_neuron_forcing_and_gate_scale():
    model, tok = tiny_model("llama", seed=1)
    st = xlkernels.patch(model)
    gate = SteeringPlan(gate=torch.zeros(st.num_layers, st.num_heads), meta=model_meta(st))
    force = ev.NeuronForcing(off={0: torch.tensor([1, 2])}, on={1: torch.tensor([3])},
                             values={1: torch.tensor([50.0])})
    res = ev.evaluate(model, tok, {"gate": gate, "force": force}, PROMPTS[:3], source="en", target="de",
                      strengths={"gate": [0.0, 1.0], "force": [0.0, 2.0]}, max_new_tokens=4)
    g = {(r["plan"], r["strength"]): r["generations"] for r in res["rows"]}
    assert g[("gate", 0.0)] == g[("unsteered", None)] and g[("gate", 1.0)] != g[("unsteered", None)]
    assert g[("force", 2.0)] != g[("force", 0.0)]
    # forcing by hand: the same interventions set directly on the steerer
    from xlkernels import NeuronIntervention as NI
    I = st.num_neurons
    st.reset()
    st.set_neuron_intervention(0, NI.identity(I).then(NI.zero(torch.tensor([1, 2]), I)))
    st.set_neuron_intervention(1, NI.identity(I).then(NI.set(torch.tensor([3]), torch.tensor([100.0]), I)))
    hand, _ = ev.generate(model, tok, PROMPTS[:3], 4)
    st.reset()
    assert [tok.decode(h, skip_special_tokens=True) for h in hand] == g[("force", 2.0)]


def test_neuron_forcing_save_load(tmp_path):
    f = ev.NeuronForcing(off={0: torch.tensor([1, 2])}, on={1: torch.tensor([3, 5])},
                         values={1: torch.tensor([0.5, -1.0])}, scale=2.0, meta={"source": "en"})
    p = f.save(tmp_path / "lape")
    g = ev.load_plan(tmp_path / "lape")
    assert p.name == "forcing.safetensors" and g.scale == 2.0 and g.meta == {"source": "en"}
    assert torch.equal(g.off[0], f.off[0]) and torch.equal(g.values[1], f.values[1])
    with pytest.raises(ValueError, match="values"):
        ev.NeuronForcing(on={1: torch.tensor([3])}, values={}).validate(2, 128)
    with pytest.raises(ValueError, match="outside"):
        ev.NeuronForcing(off={0: torch.tensor([200])}).validate(2, 128)


def test_repetition_rate():
    assert ev.repetition_rate([[1, 2, 3, 4, 5]]) == 0.0
    assert ev.repetition_rate([[7] * 6]) == pytest.approx(0.75)
    assert ev.repetition_rate([[1, 2, 3, 1, 2, 3]]) == pytest.approx(1 / 4)       # 4 trigrams, (1,2,3) twice
    assert ev.repetition_rate([[1, 2], [1, 2, 3, 1, 2, 3]]) == pytest.approx(1 / 4)  # too short: not counted
    assert ev.repetition_rate([[1, 1]], n=1) == 0.5 and ev.repetition_rate([]) == 0.0
    with pytest.raises(ValueError, match="n must"):
        ev.repetition_rate([[1]], n=0)


def test_bad_input():
    model, tok, st, plan, _ = planted()
    bank = SteeringPlan(shift=torch.zeros(2, 2, 4, 16), languages=["en", "fr"], meta=model_meta(st))
    kw = dict(source="en", target="de", max_new_tokens=2)
    with pytest.raises(ValueError, match="prompts"):
        ev.evaluate(model, tok, {"p": plan}, [], **kw)
    with pytest.raises(ValueError, match="prompts"):
        ev.evaluate(model, tok, {"p": plan}, ["ok", " "], **kw)
    with pytest.raises(ValueError, match="differ"):
        ev.evaluate(model, tok, {"p": plan}, ["hi"], source="en", target="en")
    with pytest.raises(ValueError, match="shift bank"):
        ev.evaluate(model, tok, {"b": bank}, ["hi"], **kw)
    with pytest.raises(ValueError, match="strengths"):
        ev.evaluate(model, tok, {"p": plan}, ["hi"], strengths=[float("nan")], **kw)
    with pytest.raises(ValueError, match="strengths"):
        ev.evaluate(model, tok, {"p": plan}, ["hi"], strengths={"p": []}, **kw)
    with pytest.raises(ValueError, match="steer_tokens"):
        ev.evaluate(model, tok, {"p": plan}, ["hi"], steer_tokens="some", **kw)
    with pytest.raises(ValueError, match="reserved"):
        ev.evaluate(model, tok, {"unsteered": plan}, ["hi"], **kw)
    with pytest.raises(TypeError, match="plans"):
        ev.evaluate(model, tok, [plan], ["hi"], **kw)
    for empty in (SteeringPlan(meta=model_meta(st)), SteeringPlan(gate=torch.ones(2, 4), meta=model_meta(st)),
                  SteeringPlan(neurons={0: torch.zeros(0, dtype=torch.long)}, meta=model_meta(st)),
                  ev.NeuronForcing(off={1: torch.zeros(0, dtype=torch.long)})):
        with pytest.raises(ValueError, match="empty"):
            ev.evaluate(model, tok, {"e": empty}, ["hi"], **kw)
    with pytest.raises(ValueError, match="lid_langs"):
        ev.evaluate(model, tok, {"p": plan}, ["hi"], lid_langs=["en", "fr"], **kw)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ev.evaluate(model, tok, {"p": plan}, ["hi"], source="en", target="de", max_new_tokens=0)
    wrong = SteeringPlan(gate=torch.ones(3, 4), meta={})
    with pytest.raises(ValueError, match="gate"):
        ev.evaluate(model, tok, {"w": wrong}, ["hi"], **kw)


def test_report_files(tmp_path, monkeypatch):
    model, tok, st, plan, _ = planted()
    monkeypatch.setattr(ev.langid, "detect", fake_detect)
    monkeypatch.setattr(ev.langid, "degenerate", lambda text: False)   # the stub's 'xxxxxx' stands for German
    res = ev.evaluate(model, tok, {"force_x": plan}, PROMPTS[:2], source="en", target="de",
                      strengths=[0.0, 10.0, 1000.0], max_new_tokens=3)
    paths = ev.save(res, tmp_path / "e")
    md = open(paths["md"]).read()
    assert "| force_x | shift | alpha 1000 | 100 | 0 | 0 |" in md and md.count("\n") == 2 + 4
    assert json.load(open(paths["json"]))["rows"][3]["target_rate"] == 1.0
    assert os.path.getsize(paths["png"]) > 1000


def test_fit_plans_cover_every_method():
    from xlkernels.analysis.data import parallel_corpus
    model, tok = tiny_model("gemma3")
    c = parallel_corpus(["en", "de", "fr"], 20)
    fit = {x: t[:16] for x, t in c.items()}
    plans = ev.fit_plans(model, tok, fit, "en", "de", batch_size=16, max_length=16, lahis_texts=6)
    assert list(plans) == list(ev.FIT_METHODS)
    assert {x: ev.method_of(p) for x, p in plans.items()} == {
        "lape": "forcing", "deactivate": "neurons", "claim": "shift", "lahis": "gate", "itlc": "itlc",
        "incline": "incline"}
    res = ev.evaluate(model, tok, plans, c["en"][16:20], source="en", target="de",
                      strengths={"shift": [4.0], "itlc": [2.0], "incline": [1.0], "forcing": [2.0], "gate": [1.0]},
                      max_new_tokens=3, batch_size=4)
    assert [r["plan"] for r in res["rows"]] == ["unsteered"] + list(ev.FIT_METHODS)
    base = res["rows"][0]["generations"]
    changed = [r["plan"] for r in res["rows"][1:] if r["generations"] != base]
    assert len(changed) >= 4, changed     # random tiny model: most plans change some generation
    assert all(math.isfinite(r["nll"]) and r["new_tokens"] > 0 for r in res["rows"])


def test_cli_eval_tiny(tmp_path, capsys):
    out = tmp_path / "ev"
    rc = cli.main(["eval", "--tiny", "llama", "--fit", "lape,claim", "--n-fit", "12", "--n-prompts", "3",
                   "--langs", "en,de,fr", "--strengths", "claim=1,4", "--max-new-tokens", "3",
                   "--no-progress", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    res = json.loads((out / "eval.json").read_text())
    chosen = res["chosen"]["claim"]["strength"]
    assert chosen in (1.0, 4.0) and "chosen on 3 dev prompts" in text
    assert "| unsteered | none |" in text and f"| claim | shift | alpha {chosen:g} |" in text
    assert {r["strength"] for r in res["dev"] if r["plan"] == "claim"} == {1.0, 4.0}
    assert not set(res["dev_prompts"]) & set(res["prompts"]) and len(res["prompts"]) == 3
    for fn in ("eval.json", "eval.md", "eval.png", "plans/claim/plan.safetensors", "plans/lape/forcing.safetensors"):
        assert os.path.getsize(out / fn) > 0
    # saved plans evaluate again through --plan
    rc = cli.main(["eval", "--tiny", "llama", "--plan", f"c={out}/plans/claim", "--plan", f"l={out}/plans/lape",
                   "--prompt", "Hello", "--max-new-tokens", "2", "--no-progress", "--out", str(tmp_path / "ev2")])
    text = capsys.readouterr().out
    assert rc == 0 and "| c | shift | alpha 4 |" in text and "| l | forcing |" in text, text


def test_strength_is_chosen_on_dev_and_reported_on_test(monkeypatch):
    """A stand-in evaluate() where dev and test prompts disagree on the best strength; the chosen one is dev's,
    and a strength whose dev NLL cost is too high is never chosen."""
    rate = {("dev", 1.0): 0.9, ("dev", 2.0): 0.5, ("dev", 8.0): 1.0, ("test", 1.0): 0.4, ("test", 2.0): 0.95,
            ("test", 8.0): 1.0}
    cost = {1.0: 0.3, 2.0: 0.2, 8.0: 5.0}

    def fake(model, tok, plans, prompts, *, source, target, strengths=None, **kw):
        split = prompts[0].split()[0]
        rows = [{"plan": "unsteered", "strength": None, "target_rate": 0.0, "nll": 2.0, "nll_delta": 0.0}]
        rows += [{"plan": "p", "strength": a, "target_rate": rate[(split, a)], "nll": 2.0 + cost[a],
                  "nll_delta": cost[a], "generations": ["x"]} for a in strengths["p"]]
        return {"rows": rows, "prompts": list(prompts)}
    monkeypatch.setattr(ev, "evaluate", fake)
    res = ev.evaluate_held_out(None, None, {"p": object()}, ["dev a", "dev b"], ["test a"], source="en", target="de",
                               strengths={"p": [1.0, 2.0, 8.0]})
    assert res["chosen"] == {"p": {"strength": 1.0, "within_cost": True}}
    assert [r["strength"] for r in res["rows"] if r["plan"] == "p"] == [1.0]
    assert [r["target_rate"] for r in res["rows"] if r["plan"] == "p"] == [0.4]
    assert all("generations" not in r for r in res["dev"])
    with pytest.raises(ValueError, match="overlap"):
        ev.evaluate_held_out(None, None, {"p": object()}, ["dev a"], ["dev a"], source="en", target="de")


def test_cli_eval_bad_arguments(capsys):
    assert cli.main(["eval", "--tiny", "llama", "--prompt", "hi"]) == 1
    assert "--plan" in capsys.readouterr().err
    assert cli.main(["eval", "--tiny", "llama", "--fit", "nope", "--prompt", "hi"]) == 1
    assert "--fit" in capsys.readouterr().err
    assert cli.main(["eval", "--tiny", "llama", "--fit", "claim", "--strengths", "claim=a,b"]) == 1
    assert "--strengths" in capsys.readouterr().err
    assert cli.main(["eval", "--tiny", "llama", "--fit", "claim", "--langs", "en,de,fr", "--n-prompts", "100000"]) == 1
    assert "--n-prompts 100000: the corpus has" in capsys.readouterr().err


@pytest.mark.model
def test_eval_real_model_lape_forcing_switches_language():
    """Embedded Gemma-3-270M: the unsteered model continues English prompts in English; LAPE forcing
    (English neurons off, German neurons set) moves a clear share of the generations into German."""
    from xlkernels.analysis.data import parallel_corpus
    from xlkernels.models.default import load_default
    model, tok = load_default(progress=False)
    c = parallel_corpus(["en", "de", "fr"])
    fit = {x: t[:32] for x, t in c.items()}
    plans = ev.fit_plans(model, tok, fit, "en", "de", methods=("lape",), max_length=32)
    res = ev.evaluate(model, tok, plans, c["en"][32:40], source="en", target="de", strengths=[2.0],
                      max_new_tokens=12, batch_size=8)
    base, lape = res["rows"]
    assert base["target_rate"] <= 0.125 and lape["target_rate"] >= base["target_rate"] + 0.25, res["rows"]
    assert lape["nll"] > base["nll"] and all(math.isfinite(r["tokens_per_s"]) for r in res["rows"])
