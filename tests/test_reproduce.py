"""`xlkernels reproduce`: each claim's test on synthetic inputs with a known answer, and end-to-end runs."""
import json
import math
import os

import pytest
import torch

from xlkernels import cli
from xlkernels.analysis.reproduce import claims as C
from xlkernels.analysis.reproduce import measure as rp


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- LAPE matrix
@pytest.mark.parametrize("K", [2, 3, 5, 7])
def test_lape_planted_diagonal_holds(K):
    g = _gen(K)
    m = torch.rand(K, K, generator=g, dtype=torch.float64) * 0.1
    m.diagonal().copy_(1.0 + torch.rand(K, generator=g, dtype=torch.float64))
    row = C.lape_deactivation(m, [f"l{i}" for i in range(K)])
    assert row["holds"] is True
    d = row["details"]
    # independent means: diagonal, and every off-diagonal entry
    off = [float(m[i, j]) for i in range(K) for j in range(K) if i != j]
    assert d["diag_mean"] == pytest.approx(float(m.diagonal().mean()))
    assert d["offdiag_mean"] == pytest.approx(sum(off) / len(off))
    assert d["languages_ok"] == K and set(row) == {"claim", "paper", "measured", "holds", "details"}


@pytest.mark.parametrize("K", [3, 6])
def test_lape_flat_or_weak_diagonal_does_not_hold(K):
    flat = torch.full((K, K), 0.7, dtype=torch.float64)
    assert C.lape_deactivation(flat)["holds"] is False
    weak = torch.rand(K, K, generator=_gen(1), dtype=torch.float64) * 0.01 + 1.0
    weak.diagonal().fill_(1.6)   # 1.6x the others: more, but not "far more" (factor 2)
    assert C.lape_deactivation(weak)["holds"] is False
    assert C.lape_deactivation(weak, factor=1.5)["holds"] is True
    inverted = flat.clone()
    inverted.diagonal().fill_(-1.0)   # own language gets better: never holds, even with others negative
    assert C.lape_deactivation(inverted - 1.0)["holds"] is False


def test_lape_bad_input():
    with pytest.raises(ValueError, match="delta"):
        C.lape_deactivation(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="delta"):
        C.lape_deactivation(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="langs"):
        C.lape_deactivation(torch.eye(3), ["a", "b"])


# ---------------------------------------------------------------------------------------------- LAPE layers
def test_layer_bands():
    assert C.layer_bands(18) == (list(range(4)), list(range(4, 14)), list(range(14, 18)))
    assert C.layer_bands(32) == (list(range(8)), list(range(8, 24)), list(range(24, 32)))
    assert C.layer_bands(3) == ([0], [1], [2])
    assert C.layer_bands(2) == ([0], [], [1])


def _planted_layers(L, bottom, middle, top, K=3, seed=0):
    """(K, L) counts drawn by multinomial from a per-layer density: bottom/middle/top weights."""
    b, m, t = C.layer_bands(L)
    w = torch.zeros(L, dtype=torch.float64)
    w[b], w[m], w[t] = bottom, middle, top
    return torch.stack([torch.multinomial(w, 2000, replacement=True, generator=_gen(seed + k)).bincount(minlength=L)
                        for k in range(K)])


@pytest.mark.parametrize("L", [7, 18, 32])
def test_lape_layers_planted(L):
    assert C.lape_layers(_planted_layers(L, 5, 1, 4))["holds"] is True          # U shape
    assert C.lape_layers(_planted_layers(L, 1, 1, 1))["holds"] is False         # uniform
    assert C.lape_layers(_planted_layers(L, 0.3, 1, 8))["holds"] is False       # top only (bottom empty)
    assert C.lape_layers(_planted_layers(L, 1, 5, 1))["holds"] is False         # middle


def test_lape_layers_numbers_and_undecided():
    c = torch.tensor([10, 0, 0, 0, 0, 0, 0, 4])   # L = 8: bands 0-1 | 2-5 | 6-7
    c[2:6] = torch.tensor([1, 1, 1, 1])
    row = C.lape_layers(c)
    r = row["details"]["ratio"]
    assert r["bottom"] == pytest.approx((10 / 2) / 1.0) and r["top"] == pytest.approx((4 / 2) / 1.0)
    assert row["holds"] is True and row["details"]["peak_layer"] == 0
    assert C.lape_layers(torch.tensor([3, 4]))["holds"] is None
    assert C.lape_layers(torch.zeros(10))["holds"] is None
    with pytest.raises(ValueError, match="counts"):
        C.lape_layers(torch.tensor([1, -1, 2]))


# ---------------------------------------------------------------------------------------------- LAHIS
def test_lahis_planted():
    K, S = 5, 4
    g = _gen(3)
    m = torch.rand(K, K, generator=g, dtype=torch.float64) * 0.05
    m.diagonal().add_(0.5)
    rnd = torch.rand(K, S, generator=g, dtype=torch.float64) * 0.05
    row = C.lahis_masking(m, rnd, [2] * K)
    assert row["holds"] is True and row["details"]["beats_random"] == K
    assert row["details"]["random_mean"] == pytest.approx(float(rnd.mean()))
    # own language hit, but random heads hurt more: does not hold
    assert C.lahis_masking(m, rnd + 1.0, [2] * K)["holds"] is False
    # random heads harmless, but the heads hurt every language alike: does not hold
    assert C.lahis_masking(torch.full((K, K), 0.5, dtype=torch.float64), rnd, [2] * K)["holds"] is False


def test_lahis_languages_without_heads_are_left_out():
    m = torch.eye(3, dtype=torch.float64)
    m[1] = torch.tensor([5.0, 0.0, 5.0])     # row of a language with no heads: would break the claim if counted
    row = C.lahis_masking(m, torch.zeros(3), [1, 0, 2])
    assert row["holds"] is True and row["details"]["languages"] == 2
    assert C.lahis_masking(m, torch.zeros(3), [0, 0, 0])["holds"] is None
    with pytest.raises(ValueError, match="random_delta"):
        C.lahis_masking(m, torch.zeros(2), [1, 1, 1])
    with pytest.raises(ValueError, match="n_heads"):
        C.lahis_masking(m, torch.zeros(3), [1, 1])


# ---------------------------------------------------------------------------------------------- soft mask, classes
def test_soft_mask_row():
    assert C.soft_mask(2.0, 1.9, 20, 200, 800, "de")["holds"] is True
    assert C.soft_mask(2.0, 2.0, 20, 200, 800, "de")["holds"] is False
    row = C.soft_mask(2.0, 2.1, 1, 8, 8, "de", random_after=2.05)
    assert row["holds"] is False and row["details"]["gain"] == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="loss_after"):
        C.soft_mask(2.0, math.nan, 1, 1, 1, "de")


def test_ternary_classes():
    assert C.ternary_classes([0, 5, 2, 1, 0], 5, 3, 7, 0.1, 4)["holds"] is True
    for spec, rel, gen in ((0, 3, 7), (5, 0, 7), (5, 3, 0)):
        assert C.ternary_classes([0, 5, 2, 1, 0], spec, rel, gen, 0.1, 4)["holds"] is False
    with pytest.raises(ValueError, match="appear"):
        C.ternary_classes([0, 1, 2], 1, 1, 1, 0.0, 4)


def test_ternary_classes_from_planted_probabilities():
    """Planted activation probabilities -> classify -> the row: one neuron group per class."""
    from xlkernels.analysis import neurons as N
    L, I, K = 3, 400, 4
    p = torch.rand(L, I, K, generator=_gen(5), dtype=torch.float64) * 0.2
    p[0, :4, :] = 0.01
    for k in range(K):
        p[0, k, k] = 0.99                     # specific: one language each
    p[1, :3, :2] = 0.98                       # related: two languages
    p[2, :5, :] = 0.97                        # general: all languages
    cls = N.classify(p, top_rate=0.01)
    cc = cls.counts()
    row = C.ternary_classes(cls.appear, int(cc["specific"].sum()), int(cc["related"].sum()),
                            int(cc["general"].sum()), cls.lam, K)
    assert row["holds"] is True and row["details"]["specific"] >= K and row["details"]["general"] >= 5
    p[1, :3, :2] = 0.1                        # no related neuron left
    cls = N.classify(p, top_rate=0.01)
    cc = cls.counts()
    assert C.ternary_classes(cls.appear, int(cc["specific"].sum()), int(cc["related"].sum()),
                             int(cc["general"].sum()), cls.lam, K)["holds"] is False


# ---------------------------------------------------------------------------------------------- MEXA, steering
def test_mexa_peak():
    L = 18
    x = torch.arange(L + 1, dtype=torch.float64)
    hump = {"de": (1 - ((x - 9) / 9) ** 2).tolist(), "fr": (0.9 - ((x - 8) / 9) ** 2).tolist()}
    row = C.mexa_peak(hump)
    assert row["holds"] is True and row["details"]["peak_layer"] in (8, 9)
    rising = {"de": (x / L).tolist()}
    row = C.mexa_peak(rising)
    assert row["holds"] is False and row["details"]["peak_layer"] == L
    assert C.mexa_peak({"de": [0.1, 0.5]})["holds"] is None
    with pytest.raises(ValueError, match="curves"):
        C.mexa_peak({})


def test_steering_best_setting():
    pts = [{"setting": "alpha 1", "target_rate": 0.2, "source_rate": 0.8, "nll": 2.0},
           {"setting": "alpha 4", "target_rate": 0.75, "source_rate": 0.2, "nll": 3.5},
           {"setting": "alpha 8", "target_rate": 0.75, "source_rate": 0.1, "nll": 5.0}]
    row = C.steering("neurons", pts, {"target_rate": 0.0, "nll": 2.5})
    assert row["holds"] is True and row["details"]["best"]["setting"] == "alpha 4"
    assert row["details"]["fluency_cost"] == pytest.approx(1.0)
    assert C.steering("heads", pts[:1], {"target_rate": 0.0, "nll": 2.5})["holds"] is False
    with pytest.raises(ValueError, match="sweep"):
        C.steering("x", [], {"target_rate": 0.0, "nll": 1.0})


# ---------------------------------------------------------------------------------------------- data helpers
def test_split_and_pairs():
    corpus = {"en": [f"e{i}" for i in range(10)], "de": [f"d{i}" for i in range(10)]}
    fit, ev = rp.split(corpus, 6, 3)
    assert fit["de"] == [f"d{i}" for i in range(6)] and ev["de"] == ["d7", "d8", "d9"]
    fit, ev = rp.split(corpus, 100, 100)        # held-out at most half, fit the rest
    assert len(ev["en"]) == 5 and len(fit["en"]) == 5 and not set(fit["en"]) & set(ev["en"])
    pairs = rp.qa_pairs(fit, "de")
    assert pairs[0] == ("English: e0\nGerman:", " d0")
    assert rp.is_parallel(corpus) and not rp.is_parallel({"en": ["a"], "de": ["a", "b"]})
    with pytest.raises(ValueError, match="corpus"):
        rp.split({"en": ["x"]}, 1, 1)


# ---------------------------------------------------------------------------------------------- end to end
SMALL = dict(n_fit=12, n_eval=6, n_lahis=6, seeds=2, n_train=6, n_mexa=12, max_length=20, mask_batch=3)


def _tiny_pair():
    from xlkernels.models import tiny_model
    return tiny_model("llama", seed=3, num_hidden_layers=4)


@pytest.fixture(scope="module")
def tiny4():
    from xlkernels.models import tiny_model
    return tiny_model("llama", seed=3, num_hidden_layers=4)


def test_run_tiny_end_to_end(tiny4, tmp_path):
    model, tok = tiny4
    steer_calls = []

    def fake_eval(steerer, tok_, fit, ev, cfg, state):
        steer_calls.append(list(fit))
        return [C.steering("neurons", [{"setting": "x1", "target_rate": 0.6, "source_rate": 0.4, "nll": 3.0}],
                           {"target_rate": 0.0, "nll": 2.0})]

    rep = rp.run(model, tok, level="quick", out=str(tmp_path), name="tiny", overrides=SMALL, eval_fn=fake_eval,
                 log=lambda *a: None)
    assert rep["errors"] == []
    names = [r["claim"] for r in rep["rows"]]
    for prefix in ("LAPE: language neurons are", "LAPE: language neurons sit", "Neurons:", "LAHIS", "Soft head mask",
                   "MEXA", "Steering: neurons"):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    assert steer_calls == [["en", "de", "fr", "es"]]
    for fn in ("report.md", "reproduce.json", "lape_deactivation.png", "lahis_masking.png", "lape_layers.png",
               "mexa.png"):
        assert os.path.getsize(tmp_path / fn) > 0, fn
    saved = json.loads((tmp_path / "reproduce.json").read_text())
    assert [r["claim"] for r in saved["rows"]] == names
    md = (tmp_path / "report.md").read_text()
    assert "| claim | paper | measured | result |" in md and "![mexa.png](mexa.png)" in md
    lahis = next(r for r in rep["rows"] if r["claim"].startswith("LAHIS"))["details"]
    assert lahis["seeds"] == 2 and len(lahis["delta"]) == 4
    lape = next(r for r in rep["rows"] if r["claim"].startswith("LAPE: language neurons are"))["details"]
    assert len(lape["base_nll"]) == 4 and all(math.isfinite(v) for row in lape["delta"] for v in row)
    assert rep["n_eval"]["en"] == 6 and rep["n_fit"]["en"] == 12


def test_run_random_baseline_is_seeded(tiny4):
    model, tok = tiny4
    kw = dict(level="quick", overrides=dict(SMALL, n_fit=6, n_eval=3, n_lahis=3, max_length=12), steps=("heads",),
              log=lambda *a: None)
    a = rp.run(model, tok, seed=1, **kw)["rows"][0]["details"]["random"]
    b = rp.run(model, tok, seed=1, **kw)["rows"][0]["details"]["random"]
    c = rp.run(model, tok, seed=2, **kw)["rows"][0]["details"]["random"]
    assert a == b and a != c


def test_run_bad_arguments(tiny4):
    model, tok = tiny4
    with pytest.raises(ValueError, match="level"):
        rp.run(model, tok, level="huge")
    with pytest.raises(ValueError, match="steps"):
        rp.run(model, tok, steps=("neurons", "nope"))
    with pytest.raises(ValueError, match="langs"):
        rp.run(model, tok, corpus={"en": ["a b", "c d"], "de": ["e f", "g h"]}, langs=["en", "fr"])


def test_print_summary(capsys):
    rows = [C.soft_mask(2.0, 1.9, 1, 2, 2, "de"), C.soft_mask(2.0, 2.1, 1, 2, 2, "de"),
            C.make_row("x", "", "undecided: y", None, {})]
    rp.print_summary(rows)
    out = capsys.readouterr().out
    assert "holds " in out and "does not hold" in out and "undecided" in out and "1 of 3 claims hold" in out


def test_cli_tiny(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(rp.LEVELS, "quick", dict(rp.LEVELS["quick"], **SMALL))
    rc = cli.main(["reproduce", "--tiny", "llama", "--quick", "--no-progress", "--skip", "steering",
                   "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "claims hold on this model" in out and "LAHIS" in out
    assert os.path.getsize(tmp_path / "report.md") > 0
    rep = rp.run(*_tiny_pair(), level="quick", overrides=SMALL, steps=("soft_mask",), log=lambda *a: None)
    assert rep["rows"][0]["holds"] is None and "heads step" in rep["rows"][0]["measured"]
    assert cli.main(["reproduce", "--tiny", "llama", "--skip", "bogus"]) == 1
    assert "--skip" in capsys.readouterr().err


@pytest.mark.model
def test_reproduce_embedded_model(tmp_path, capsys):
    rc = cli.main(["reproduce", "--quick", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    rep = json.loads((tmp_path / "reproduce.json").read_text())
    assert rep["model"].startswith("gemma-3-270m") and rep["errors"] == []
    rows = {r["claim"]: r for r in rep["rows"]}
    lape = next(r for c, r in rows.items() if c.startswith("LAPE: language neurons are"))
    assert lape["holds"] is True, lape["measured"]
    assert all(r["holds"] is not None for c, r in rows.items() if not c.startswith("Steering")), rows


def test_cli_user_corpus_not_parallel(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(rp.LEVELS, "quick", dict(rp.LEVELS["quick"], **SMALL))
    f = tmp_path / "c.jsonl"
    rows = [{"lang": "en", "text": f"the cat number {i} sat on the mat"} for i in range(9)]
    rows += [{"lang": "de", "text": f"die Katze Nummer {i} sass auf der Matte"} for i in range(7)]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    rc = cli.main(["reproduce", "--tiny", "llama", "--quick", "--no-progress", "--corpus", str(f),
                   "--skip", "heads,steering", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0, out
    rep = json.loads((tmp_path / "o" / "reproduce.json").read_text())
    assert rep["langs"] == ["en", "de"] and rep["n_eval"] == {"en": 4, "de": 3}
    mexa = next(r for r in rep["rows"] if r["claim"].startswith("MEXA"))
    assert mexa["holds"] is None and "parallel" in mexa["measured"]
    plain = tmp_path / "c.txt"
    plain.write_text("just text\nno language\n")
    assert cli.main(["reproduce", "--tiny", "llama", "--corpus", str(plain)]) == 2   # a bad file: exit 2
    assert "--corpus" in capsys.readouterr().err


def test_run_tiny_steering_from_eval_harness(tiny4, tmp_path):
    """The steering rows come from analysis/evaluate.py: one per fitted method, each its best sweep point."""
    from xlkernels.analysis.evaluation import evaluate as E
    model, tok = tiny4
    cfg = dict(SMALL, steer_prompts=2, steer_new_tokens=3, strengths={"shift": (4.0,), "itlc": (1.0,),
               "incline": (0.3,), "forcing": (2.0,), "gate": (1.0,), "neurons": (None,)})
    rep = rp.run(model, tok, level="quick", steps=("steering",), overrides=cfg, out=str(tmp_path),
                 log=lambda *a: None)
    assert rep["errors"] == []
    rows = rep["rows"]
    assert sorted(r["claim"].split(" ")[1].rstrip(",") for r in rows) == sorted(E.FIT_METHODS)
    res = json.loads((tmp_path / "eval.json").read_text())
    assert sum(r["holds"] is None for r in rows) <= 1   # an empty plan (no English neuron on a tiny model)
    for r in rows:
        if r["holds"] is None:
            continue
        d = r["details"]
        plan = d["method"].split(" ")[0]
        mine = [x for x in res["rows"] if x["plan"] == plan]
        assert len(d["points"]) == len(mine)
        assert d["best"]["target_rate"] == max(x["target_rate"] for x in mine)
        assert d["baseline"]["nll"] == res["rows"][0]["nll"]
    assert "## Steering sweep" in (tmp_path / "report.md").read_text()
