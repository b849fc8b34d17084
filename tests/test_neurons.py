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
