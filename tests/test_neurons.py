"""LAPE identification, the ternary classification with the lambda sweep (hand-checked on small synthetic
probabilities) and the corpus statistics (vs a forward-hook reference on a tiny model)."""
import math

import pytest
import torch

from xlkernels.analysis import neurons as N

# ---------------------------------------------------------------------------------------------- LAPE

# p[l, j, k] for L=2, I=3, K=2; all 12 values distinct except the two 0.5
P_LAPE = torch.tensor([
    [[0.90, 0.10], [0.50, 0.50], [0.05, 0.02]],
    [[0.20, 0.80], [0.95, 0.85], [0.01, 0.03]],
], dtype=torch.float64)


def _h(*w):
    s = sum(w)
    return -sum(x / s * math.log(x / s) for x in w if x > 0)


def test_lape_hand_checked():
    # sorted p: .01 .02 .03 .05 .10 .20 .50 .50 .80 .85 .90 .95; ratio 0.5 -> k=round(6)=6 -> 0.20
    r = N.lape(P_LAPE, top_rate=0.5, filter_rate=0.5, activation_bar_ratio=0.5)
    assert r.filter_value == pytest.approx(0.20) and r.bar == pytest.approx(0.20)
    # neurons (0,2) and (1,2) have no p > 0.20: dropped although their entropies (0.60, 0.56) are small
    inf = math.inf
    expect_e = torch.tensor([[_h(.9, .1), math.log(2), inf], [_h(.2, .8), _h(.95, .85), inf]], dtype=torch.float64)
    assert torch.allclose(r.entropy, expect_e)          # natural log, not divided by log K
    # round(0.5 * 6) = 3 smallest entropies: (0,0) .325, (1,0) .500, (1,1) .6916 < ln2 = .6931 of (0,1)
    assert r.selected.tolist() == [[True, False, False], [True, True, False]]
    # assignment p > .20: (0,0) -> lang0; (1,0) -> lang1 (0.20 is not > 0.20); (1,1) -> both
    assert [[x.tolist() for x in per_l] for per_l in r.neurons] == [[[0], [1]], [[], [0, 1]]]
    assert r.counts().tolist() == [[1, 1], [0, 2]]
    assert all(x.dtype == torch.long for per_l in r.neurons for x in per_l)


def test_lape_default_quantile_and_empty_language():
    # defaults: q95 = kthvalue(p, round(0.95 * 12) = 11) = 0.90; only (1,1) has p > 0.90 (lang0 = 0.95)
    r = N.lape(P_LAPE, top_rate=0.5)
    assert r.filter_value == pytest.approx(0.90) and r.bar == pytest.approx(0.90)
    assert torch.isinf(r.entropy).sum() == 5
    # a language with no neuron still gets its (empty) per-layer lists
    assert [[x.tolist() for x in per_l] for per_l in r.neurons] == [[[], [1]], [[], []]]


def test_lape_default_top_rate_is_one_percent():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 101, 4, generator=g, dtype=torch.float64)
    r = N.lape(p)
    assert int(r.selected.sum()) == round(0.01 * 3 * 101)      # 3
    assert r.filter_value == torch.sort(p.flatten()).values[round(0.95 * p.numel()) - 1].item()


def test_lape_bad_input():
    with pytest.raises(ValueError, match="p must"):
        N.lape(torch.rand(3, 4))
    with pytest.raises(ValueError, match="p must"):
        N.lape(torch.full((1, 2, 3), float("nan")))
    with pytest.raises(ValueError, match="top_rate"):
        N.lape(P_LAPE, top_rate=2.0)


def test_activation_probs_layout():
    class S:  # NeuronStats-like: (L, K, I) counts, (K,) tokens
        positive = torch.tensor([[[1, 2, 3], [4, 0, 2]]])
        tokens = torch.tensor([4, 8])
    p = N.activation_probs(S)
    assert p.shape == (1, 3, 2)
    assert p[0].tolist() == [[0.25, 0.5], [0.5, 0.0], [0.75, 0.25]]


# ---------------------------------------------------------------------------------------------- ternary

# L=1, I=6, K=3: n0 specific (lang0), n1 related (0,1), n2 general, n3 flat low, n4 never active, n5 mostly lang1
P_LNA = torch.tensor([[[0.9, 0.0, 0.0], [0.8, 0.7, 0.0], [0.9, 0.8, 0.85],
                       [0.1, 0.1, 0.1], [0.0, 0.0, 0.0], [0.05, 0.6, 0.02]]], dtype=torch.float64)
NORM_MAX = (1 + 1 / 2 + 1 / 3) / 3


def _hn(*w):
    return (_h(*w) if sum(w) > 0 else math.log(3)) / math.log(3)


def test_lna_score_hand_checked():
    lam = 0.7
    expect = [_hn(*row) - lam * max(row) / NORM_MAX for row in P_LNA[0].tolist()]
    assert _hn(0, 0, 0) == pytest.approx(1.0)     # uniform where the sum is 0
    assert N.lna_score(P_LNA, lam)[0].tolist() == pytest.approx(expect, abs=1e-12)


def test_classify_fixed_lambda():
    # bar 0.5: 18 values, k = 9 -> 0.1; p > 0.1 assigns n0:{0} n1:{0,1} n2:{0,1,2} n5:{1}
    c = N.classify(P_LNA, lam=0.0, top_rate=0.5, activation_bar_ratio=0.5)
    assert c.thr == pytest.approx(0.1)
    # lam = 0: 3 smallest normalized entropies are n0 (0), n5 (.36), n1 (.63)
    assert c.selected[0].tolist() == [True, True, False, False, False, True]
    assert [[x.tolist() for x in per_l] for per_l in c.specific] == [[[0]], [[5]], [[]]]
    assert [[x.tolist() for x in per_l] for per_l in c.related] == [[[1]], [[1]], [[]]]
    assert [x.tolist() for x in c.general] == [[2]]
    assert c.appear == [0, 2, 1, 0]
    assert c.counts()["specific"].tolist() == [[1], [1], [0]]


def test_lambda_sweep_hand_checked():
    # n2 (general) replaces n5 in the 3 smallest once its larger max p outweighs its entropy:
    # lam* = (H2 - H5) * norm_max / (0.9 - 0.6); the sweep returns the largest lam <= lam* to within eps.
    lam_star = (_hn(.9, .8, .85) - _hn(.05, .6, .02)) * NORM_MAX / (0.9 - 0.6)
    assert 1.29 < lam_star < 1.31
    lam, hist = N.sweep_lambda(P_LNA, top_rate=0.5, activation_bar_ratio=0.5, lo=0.0, hi=4.0, eps=1e-3)
    assert lam <= lam_star < lam + 1e-3
    assert hist[0] == (0.0, hist[0][1]) and hist[1][0] == 4.0 and hist[1][1][3] == 1
    assert len(hist) == 2 + math.ceil(math.log2(4.0 / 1e-3))     # 12 bisection steps
    c = N.classify(P_LNA, lam="auto", top_rate=0.5, activation_bar_ratio=0.5, hi=4.0)
    assert c.lam == lam and c.appear[3] == 0
    # just above lam*, the general neuron is selected and shared by all 3 languages
    assert N.classify(P_LNA, lam=lam_star + 1e-6, top_rate=0.5, activation_bar_ratio=0.5).appear == [0, 1, 1, 1]


def test_lambda_sweep_edges():
    # hi already fine -> hi; no lambda fine (everything selected, the general neuron included) -> None, lam 0
    lam, hist = N.sweep_lambda(P_LNA, top_rate=0.5, activation_bar_ratio=0.5)
    assert lam == 0.2 and len(hist) == 2
    lam, _ = N.sweep_lambda(P_LNA, top_rate=1.0, activation_bar_ratio=0.5)
    assert lam is None
    assert N.classify(P_LNA, top_rate=1.0, activation_bar_ratio=0.5).lam == 0.0
    with pytest.raises(ValueError, match="lam"):
        N.classify(P_LNA, lam="big")


# ---------------------------------------------------------------------------------------------- corpus stats

CORPUS = {
    "en": ["The cat sat on the mat.", "Open the file", "Save changes?", "Delete this user permanently"],
    "de": ["Die Katze saß auf der Matte.", "Datei öffnen", "Änderungen speichern?"],
    "fr": ["Le chat était assis sur le tapis.", "Ouvrir le fichier", "Enregistrer les modifications ?",
           "Supprimer cet utilisateur", "Oui"],
}


def _hook_counts(model, rows_per_lang, num_layers):
    """Slow reference: one pass per row (batch of one, no padding), forward hook on mlp.act_fn counting act > 0."""
    layers = model.model.layers
    K = len(rows_per_lang)
    I = layers[0].mlp.down_proj.in_features
    pos = torch.zeros(num_layers, K, I, dtype=torch.long)
    tot = torch.zeros(num_layers, K, dtype=torch.float64)
    sums = torch.zeros(num_layers, K, I, dtype=torch.float64)
    toks = torch.zeros(K, dtype=torch.long)
    cur = {}

    def hook(layer):
        def fn(mod, inp, out):
            a = out.detach().reshape(-1, out.shape[-1])
            pos[layer, cur["k"]] += (a > 0).sum(0)
            sums[layer, cur["k"]] += a.double().sum(0)
        return fn

    hs = [layers[i].mlp.act_fn.register_forward_hook(hook(i)) for i in range(num_layers)]
    try:
        with torch.no_grad():
            for k, rows in enumerate(rows_per_lang):
                cur["k"] = k
                for ids in rows:
                    model(input_ids=torch.tensor([ids]), use_cache=False)
                    toks[k] += len(ids)
    finally:
        for h in hs:
            h.remove()
    return pos, toks, sums


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_collect_stats_vs_hook_reference(arch):
    import xlkernels
    from xlkernels.models import tiny_model
    ref_model, tok = tiny_model(arch, seed=3)
    rows = [[tok(t, truncation=True, max_length=12)["input_ids"] for t in texts] for texts in CORPUS.values()]
    pos, toks, sums = _hook_counts(ref_model, rows, ref_model.config.num_hidden_layers)
    model, _ = tiny_model(arch, seed=3)   # same weights; the same tokenizer instance
    st = xlkernels.patch(model)
    stats = N.collect_stats(st, tok, CORPUS, batch_size=3, max_length=12, progress=False)
    L, K, I = stats.positive.shape
    assert (L, K) == (model.config.num_hidden_layers, 3)
    assert torch.equal(stats.tokens, toks.expand(L, K))
    assert torch.equal(stats.positive, pos)
    assert torch.allclose(stats.sum, sums, rtol=1e-4, atol=1e-4)
    # the batches really mix languages and pad
    gs = [g for _, _, g in N.text_batches(tok, CORPUS, 3, 12)]
    assert set(gs[0].unique().tolist()) == {0, 1, 2} and any((g == -1).any() for g in gs)
    # accumulate: a second call adds up
    again = N.collect_stats(st, tok, CORPUS, batch_size=5, max_length=12, progress=False, stats=stats.clone())
    assert torch.equal(again.positive, 2 * pos)


def test_collect_stats_packing_vs_hook_reference():
    import xlkernels
    from xlkernels.models import tiny_model
    ref_model, tok = tiny_model("llama", seed=4)
    T = 16
    rows = []
    for texts in CORPUS.values():
        flat = [i for t in texts for i in tok(t)["input_ids"]]
        rows.append([flat[s:s + T] for s in range(0, len(flat) // T * T, T)])   # tail dropped, as LAPE
    pos, toks, _ = _hook_counts(ref_model, rows, 2)
    model, _ = tiny_model("llama", seed=4)
    stats = N.collect_stats(xlkernels.patch(model), tok, CORPUS, batch_size=2, max_length=T, packing=True,
                            progress=False)
    assert torch.equal(stats.tokens[0], toks) and toks.min() > 0 and (toks % T == 0).all()
    assert torch.equal(stats.positive, pos)


def test_collect_stats_then_lape_end_to_end():
    import xlkernels
    from xlkernels.models import tiny_model
    model, tok = tiny_model("qwen2", seed=1)
    stats = N.collect_stats(model, tok, CORPUS, batch_size=4, max_length=32, progress=False)
    assert xlkernels.patch(model) is not None
    p = N.activation_probs(stats)
    assert p.shape == (2, 128, 3) and float(p.max()) <= 1.0
    expect = stats.positive.double() / stats.tokens.double().unsqueeze(-1)
    assert torch.equal(p, expect.transpose(1, 2))
    r = N.lape(p, top_rate=0.05)
    assert int(r.selected.sum()) == round(0.05 * 256)
    c = N.classify(p, top_rate=0.05)
    assert c.appear[3] == 0 or c.lam == 0.0


def test_collect_stats_bad_input():
    from xlkernels.models import tiny_model
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match="corpus"):
        N.collect_stats(model, tok, {}, progress=False)
    with pytest.raises(TypeError, match="corpus"):
        N.collect_stats(model, tok, {"en": "not a list"}, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        N.collect_stats(model, tok, CORPUS, batch_size=0, progress=False)


def test_neurons_cli_tiny(tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    import xlkernels
    from xlkernels import cli
    out = tmp_path / "n"
    rc = cli.main(["neurons", "--tiny", "llama", "--langs", "en,de,fr", "--n", "10", "--deactivate", "--eval-n", "4",
                   "--top-rate", "0.05", "--no-progress", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "deactivation" in text and "off \\ eval" in text
    s = json.loads((out / "summary.json").read_text())
    assert s["languages"] == ["en", "de", "fr"] and s["lape"]["selected"] == round(0.05 * 256)
    assert len(s["deactivation"]["delta"]) == 3
    t = load_file(str(out / "neurons.safetensors"))
    assert sum(t[f"lape.{x}.{l}"].numel() for x in ("en", "de", "fr") for l in range(2)) == \
        sum(s["lape"]["per_language"].values())
    st = xlkernels.NeuronStats.load(str(out / "stats.safetensors"))
    assert st.positive.shape == (2, 3, 128)
    assert N.load_neuron_sets(str(out / "neurons.safetensors"))["de"][1].dtype == torch.long
    assert (out / "neurons.png").stat().st_size > 0
    assert cli.main(["neurons", "--tiny", "llama", "--n", "0"]) == 1
