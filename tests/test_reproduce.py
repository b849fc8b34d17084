"""`xlkernels reproduce`: intervals and controls on cases with a known answer, every claim function on planted
inputs where it holds, fails or is undecided, and the issue's mutations (flipped direction, strength chosen on
test, degenerate text counted as success)."""
import math

import pytest
import torch

from xlkernels.analysis.evaluation import langid
from xlkernels.analysis.reproduce import choice, claims as C, controls, intervals as I, steer, tasks


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: on a loaded 2-core machine a second torch thread makes these tests ~20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------- intervals
def test_wilson_known_values():
    lo, hi = I.wilson(6, 8)                    # the example: 6/8 is 0.41-0.93
    assert (round(lo, 2), round(hi, 2)) == (0.41, 0.93)
    assert I.wilson(0, 10)[0] == 0.0 and I.wilson(10, 10)[1] == pytest.approx(1.0)
    lo, hi = I.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    with pytest.raises(ValueError):
        I.wilson(3, 2)


def test_bootstrap_covers_the_mean_and_is_seeded():
    x = torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.3
    est, lo, hi = I.mean_ci(x)
    assert est == pytest.approx(float(x.mean()))
    se = float(x.std() / 20)
    assert lo < est < hi and (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert I.mean_ci(x) == (est, lo, hi)
    assert I.mean_ci(torch.full((5,), 2.0)) == (2.0, 2.0, 2.0)


def test_cluster_bootstrap_widens_for_copies():
    # 3 languages that copy one paragraph's outcome: 3x the items but the information of 100; the cluster
    # interval must match the 100-item one, the naive one is sqrt(3) narrower
    x = torch.randn(100, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pooled = x.repeat(3)
    one = I.mean_ci(x)
    cl = I.bootstrap(lambda i: pooled[i].mean(), 300, clusters=I.parallel_clusters(3, 100))
    naive = I.mean_ci(pooled)
    assert cl[0] == pytest.approx(one[0])
    assert (cl[2] - cl[1]) == pytest.approx(one[2] - one[1], rel=0.15)
    assert (naive[2] - naive[1]) < 0.7 * (cl[2] - cl[1])
    assert I.parallel_clusters(2, 3).tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="clusters"):
        I.bootstrap(lambda i: 0.0, 4, clusters=[0, 1])


def test_fisher_and_pearson():
    assert I.pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    lo, hi = I.fisher_ci(0.5, 28)              # z = 0.549 +- 1.96 / 5
    assert lo == pytest.approx(math.tanh(0.5493 - 0.392), abs=1e-3) and hi == pytest.approx(math.tanh(0.5493 + 0.392), abs=1e-3)
    assert I.fisher_ci(0.9, 3) == (-1.0, 1.0)


def test_verdict_rule():
    assert I.verdict(0.7, 0.6, 0.8, 0.5, 100)[0] is True
    assert I.verdict(0.3, 0.2, 0.4, 0.5, 100)[0] is False
    holds, note = I.verdict(0.6, 0.4, 0.8, 0.5, 20)
    assert holds is None and "needs about 81 items" in note


# ---------------------------------------------------------------------------------------------- controls
def test_random_neurons_match_layout_and_avoid_chosen():
    layers = {0: torch.tensor([1, 5, 7]), 3: torch.tensor([2])}
    excl = {0: {1, 5, 7, 8}, 3: {2}}
    for s in range(10):
        r = controls.random_neurons(layers, 10, s, exclude=excl)
        assert {l: len(v) for l, v in r.items()} == {0: 3, 3: 1}
        assert not set(r[0].tolist()) & excl[0] and r[3].item() != 2
    assert controls.random_neurons(layers, 10, 1).keys() == layers.keys()
    assert not torch.equal(controls.random_neurons(layers, 50, 1)[0], controls.random_neurons(layers, 50, 2)[0])


def test_random_heads_same_layers():
    heads = [5, 9, 10]                        # layers 1, 2, 2 with 4 heads per layer
    for s in range(10):
        r = controls.random_heads(heads, 6, 4, s, exclude=[4])
        assert [h // 4 for h in r] == [1, 2, 2] and not set(r) & {4, 5, 9, 10} and len(set(r)) == 3


def test_random_like_matches_norm_per_head():
    v = torch.randn(3, 4, 8)
    v[1, 2] = 0
    r = controls.random_like(v, 0)
    assert torch.allclose(r.norm(dim=-1), v.norm(dim=-1), atol=1e-5)
    assert (r[1, 2] == 0).all() and not torch.allclose(r, v)
    assert (controls.random_like(v, 0) == r).all()


# ---------------------------------------------------------------------------------------------- ablation
def _ablation(own, other, rnd, K=3, n=60, S=10, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(K, n, generator=g, dtype=torch.float64) + 3
    off = base[None].repeat(K, 1, 1) + other + noise * torch.randn(K, K, n, generator=g, dtype=torch.float64)
    for k in range(K):
        off[k, k] = base[k] + own + noise * torch.randn(n, generator=g, dtype=torch.float64)
    r = base[:, None] + rnd + noise * torch.randn(K, S, n, generator=g, dtype=torch.float64)
    return base, off, r


def test_ablation_holds_fails_undecided():
    langs = ["a", "b", "c"]
    row = C.ablation("x", "p", *_ablation(0.5, 0.05, 0.02), langs)
    assert row["holds"] is True and row["details"]["per_language"]["a"]["own"] == pytest.approx(0.5, abs=0.05)
    assert C.ablation("x", "p", *_ablation(0.05, 0.5, 0.02), langs)["holds"] is False
    und = C.ablation("x", "p", *_ablation(0.1, 0.05, 0.05, n=6, noise=0.2), langs)
    assert und["holds"] is None and "needs about" in und["note"]
    few = C.ablation("x", "p", *_ablation(0.5, 0.05, 0.02, S=3), langs)     # too few control seeds
    assert few["holds"] is None and "3 seeds" in few["note"]


def test_random_units_hurting_as_much_is_not_specific():
    assert C.ablation("x", "p", *_ablation(0.5, 0.05, 0.5), ["a", "b", "c"])["holds"] is not True


# ---------------------------------------------------------------------------------------------- steering
def _bern(p, n, seed):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < p


def test_steering_holds_fails_undecided():
    n = 100
    flu = torch.full((n,), 2.0)
    ctrl = torch.stack([_bern(0.05, n, s) for s in range(10)])
    row = C.steering("s", "p", _bern(0.9, n, 1), ctrl, torch.zeros(n, dtype=torch.bool), flu + 0.2, flu)
    assert row["holds"] is True and row["details"]["k"] > 80
    # a big fluency cost keeps it from holding
    bad = C.steering("s", "p", _bern(0.9, n, 1), ctrl, torch.zeros(n, dtype=torch.bool), flu + 3, flu)
    assert bad["holds"] is False
    # the random control does as well: no gain over it
    same = C.steering("s", "p", _bern(0.9, n, 1), torch.stack([_bern(0.9, n, s + 9) for s in range(10)]),
                      torch.zeros(n, dtype=torch.bool), flu, flu)
    assert same["holds"] is not True
    # 6 of 8: Wilson 0.41-0.93 cannot clear 50%
    small = C.steering("s", "p", torch.tensor([1, 1, 1, 1, 1, 1, 0, 0]).bool(), torch.zeros(10, 8).bool(),
                       torch.zeros(8).bool(), torch.full((8,), 2.0), torch.full((8,), 2.0))
    assert small["holds"] is None and small["details"]["wilson"][0] < 0.5
    low = C.steering("s", "p", _bern(0.1, n, 2), ctrl, torch.zeros(n, dtype=torch.bool), flu, flu)
    assert low["holds"] is False
    # every rate has its interval: unsteered Wilson, control bootstrap over prompts
    base = torch.zeros(n, dtype=torch.bool)
    base[:20] = True
    d = C.steering("s", "p", _bern(0.9, n, 1), ctrl, base, flu, flu)["details"]
    assert d["unsteered_wilson"] == pytest.approx(list(I.wilson(20, n)))
    cm = ctrl.double().mean(0)
    assert d["control_ci"][0] == pytest.approx(float(cm.mean()))
    assert d["control_ci"][1] < float(cm.mean()) < d["control_ci"][2]


def test_degenerate_output_is_never_a_success():
    gens = [". Die 1.000.0000000", "-A-Wochen-Wochen-Wochen-W", "Die Einstellungen werden sofort gespeichert und gelten.",
            "Wochen Wochen Wochen Wochen", "das das das ist"]
    lab = langid.label(gens, ["en", "de"])
    assert lab[0] == lab[1] == lab[3] == lab[4] == langid.DEGENERATE and lab[2] == "de"
    assert tasks.success(lab, "de").tolist() == [False, False, True, False, False]
    assert tasks.outside(lab, "en").tolist() == [False, False, True, False, False]
    m = langid.mixed_rates(["Die Einstellungen werden sofort gespeichert.\nThe settings are saved at once here."],
                           "de", ["en", "de"])
    assert m["lines"] == 2 and m["line"] == 0.5 and 0 < m["word"] < 1
    loop = langid.mixed_rates(["Die Einstellungen werden sofort gespeichert.\nWochen Wochen Wochen Wochen"], "de",
                              ["en", "de"])
    assert loop["lines"] == 2 and loop["line"] == 0.5 and loop["degenerate"] == 1   # a loop line is a miss


class _FakeCells(steer.Cells):
    """Success rate per strength: dev and test disagree on the best one."""

    def __init__(self, rates, n=64):
        self.rates, self.n, self.langs, self.prompts = rates, n, ["en", "de"], ["p"] * n

    def run(self, steer=None, idx=None):
        a = getattr(steer, "strength", 0.0)
        k = round(self.rates.get(a, 0.0) * self.n)
        labels = ["de"] * k + ["en"] * (self.n - k)
        idx = range(self.n) if idx is None else idx
        return {"labels": [labels[i] for i in idx], "texts": ["x"] * len(idx), "fluency": torch.full((len(idx),), 2.0)}

    def base(self):
        return self.run()


def _make(a):
    def steer(batch):
        return None
    steer.strength = a
    return steer


def test_strength_is_chosen_on_dev_not_on_test():
    dev, test = _FakeCells({1.0: 0.9, 2.0: 0.5}), _FakeCells({1.0: 0.6, 2.0: 0.95})
    ok = lambda lab: tasks.success(lab, "de")   # noqa: E731
    row = steer.steer_row("s", "p", dev, test, _make, lambda a, s: _make(0.0), [1.0, 2.0], ok, 10, "", "de", 0.5)
    assert row["details"]["setting"] == "strength 1" and row["details"]["k"] == round(0.6 * 64)
    assert C.choose_strength({1.0: (0.5, 0.2), 2.0: (0.9, 3.0), 4.0: (0.5, 0.1)}) == 1.0
    assert C.choose_strength({1.0: (0.5, 2.0)}) is None
    assert C.choose_strength({1.0: (0.9, float("nan")), 2.0: (0.4, 0.5)}) == 2.0   # NaN cost: no output to score


# ---------------------------------------------------------------------------------------------- choice, curves
def test_claim_direction_points_toward_english():
    de = torch.randn(20, 2, 3, 4) - 1.0
    en = torch.randn(20, 2, 3, 4) + 1.0
    S = choice.claim_direction(de, en)
    assert (S > 0).float().mean() > 0.95          # mean_en - mean_de
    moved = de.mean(0) + S
    assert torch.allclose(moved, en.mean(0), atol=1e-5)


def test_choice_gain_holds_fails_undecided():
    n = 200
    base = _bern(0.6, n, 0)
    better = base | _bern(0.5, n, 1)
    ctrl = torch.stack([base.clone() for _ in range(10)])
    assert C.choice_gain("c", "p", base, better, ctrl)["holds"] is True
    assert C.choice_gain("c", "p", base, base & _bern(0.5, n, 2), ctrl)["holds"] is False
    small = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
    mixed = small.clone()
    mixed[[1, 3]], mixed[0] = True, False          # +2 -1 on 12 items: a gain the data cannot confirm or rule out
    row = C.choice_gain("c", "p", small, mixed, small[None].repeat(10, 1))
    assert row["holds"] is None and row["note"]


def test_middle_peak_and_correlation():
    L = 12
    curve = torch.tensor([0.1 * min(l, L - 1 - l) for l in range(L)])
    assert C.middle_peak("m", "p", curve, [5] * 100 + [6] * 100)["holds"] is True
    assert C.middle_peak("m", "p", curve, [0] * 200)["holds"] is False
    assert C.middle_peak("m", "p", curve, [5] * 100 + [0] * 100)["holds"] is None
    x = {f"l{i}": i / 10 for i in range(8)}
    assert C.correlation("r", "p", x, {k: v * 2 + 0.01 * (i % 2) for i, (k, v) in enumerate(x.items())})["holds"] is True
    assert C.correlation("r", "p", x, {k: -v for k, v in x.items()})["holds"] is False
    few = C.correlation("r", "p", {"a": 0.1, "b": 0.5, "c": 0.4}, {"a": 0.2, "b": 0.9, "c": 0.7})
    assert few["holds"] is None


def test_classes_split_half_against_chance():
    a = {"specific": {(0, i) for i in range(40)}, "related": {(1, i) for i in range(20)}, "general": {(2, i) for i in range(30)}}
    same = C.classes("c", "p", {"specific": [40, 0, 0]}, a, a, 10000)
    assert same["holds"] is True and same["details"]["split_half"]["specific"]["overlap"] == 1.0
    other = {k: {(l, i + 500) for l, i in v} for k, v in a.items()}
    assert C.classes("c", "p", {}, a, other, 10000)["holds"] is None     # 0 of 20-40 cannot rule out 0.4% chance
    assert C.classes("c", "p", {}, a, other, 150)["holds"] is False      # ... but can rule out 20-27%
    empty = dict(a, general=set())
    none = C.classes("c", "p", {}, empty, empty, 10000)     # absent everywhere: undecided, never "does not hold"
    assert none["holds"] is None and "needs more fit text" in none["note"]
    few = C.classes("c", "p", {"general": [0, 0, 30]}, empty, a, 10000)      # in the full fit texts, not in half A
    assert few["holds"] is None and "needs more fit text" in few["note"]


def test_above_shuffled():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(100, generator=g) * 0.1 + 0.5
    assert C.above_shuffled("a", "p", a, torch.rand(10, 100, generator=g) * 0.1)["holds"] is True
    assert C.above_shuffled("a", "p", a, a[None].repeat(10, 1) + 0.2)["holds"] is False
    noisy = a[:12] + torch.randn(10, 12, generator=g)   # shuffled scores that straddle the real ones
    row = C.above_shuffled("a", "p", a[:12], noisy - float((noisy.mean(0) - a[:12]).mean()) + 0.05)
    assert row["holds"] is None and row["note"]


# ---------------------------------------------------------------------------------------------- tasks
def test_chrf():
    assert tasks.chrf("Die Datei wurde gespeichert.", "Die Datei wurde gespeichert.") == pytest.approx(100)
    assert tasks.chrf("xyz", "abc") == 0.0
    a = tasks.chrf("Die Datei wurde gespeichert.", "Die Datei ist gespeichert.")
    assert 40 < a < 100


def test_chrf_matches_sacrebleu():
    import random

    import sacrebleu   # pinned for this test (requirements.txt)
    r = random.Random(torch.seed())
    words = "die der das Sonne scheint über Stadt the sun shines over city 日本 語 です la ville 1.0 -".split()
    for _ in range(200):
        hyp = " ".join(r.choice(words) for _ in range(r.randint(0, 12)))
        ref = " ".join(r.choice(words) for _ in range(r.randint(1, 12)))
        assert tasks.chrf(hyp, ref) == pytest.approx(sacrebleu.sentence_chrf(hyp, [ref]).score, abs=1e-9), (hyp, ref)


def test_retrieval_items_are_balanced():
    en = [f"sentence number {i} " + "x" * i for i in range(10)]
    p, t, w = tasks.retrieval_items([f"Satz {i}" for i in range(10)], en, "de")
    assert len(p) == len(t) == len(w) == 10 and all(a != b for a, b in zip(t, w))
    assert p[0].startswith("German: Satz 0") and p[0].endswith("English:") and set(w) <= set(t)


# ---------------------------------------------------------------------------------------------- round robin, new rows
def test_round_robin_partitions_the_items():
    parts = controls.round_robin(23, 10)
    assert sorted(i for p in parts for i in p) == list(range(23))
    assert all(i % 10 == s for s, p in enumerate(parts) for i in p)
    with pytest.raises(ValueError):
        controls.round_robin(5, 0)


def test_ablation_with_round_robin_cells():
    """Only one other language per text and one seed per text scored (NaN elsewhere): the verdicts stand."""
    K, n, S = 4, 80, 10
    for own, other, want in ((0.5, 0.05, True), (0.05, 0.5, False)):
        base, off, rnd = _ablation(own, other, 0.02, K=K, n=n, S=S)
        for k in range(K):
            others = [x for x in range(K) if x != k]
            for i in range(n):
                for p, x in enumerate(others):
                    if i % (K - 1) != p:
                        off[k, x, i] = float("nan")
            for s in range(S):
                rnd[k, s, [i for i in range(n) if i % S != s]] = float("nan")
        row = C.ablation("x", "p", base, off, rnd, list("abcd"))
        assert row["holds"] is want and not math.isnan(row["details"]["stat"])


def test_loss_drop_holds_fails_undecided():
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,))))
    base = torch.rand(100, generator=g, dtype=torch.float64) + 3
    ctrl = base[None] + 0.01 * torch.randn(10, 100, generator=g, dtype=torch.float64)
    assert C.loss_drop("m", "p", base, base - 0.2, ctrl)["holds"] is True
    assert C.loss_drop("m", "p", base, base + 0.2, ctrl)["holds"] is False
    assert C.loss_drop("m", "p", base, base - 0.2, base[None] - 0.2)["holds"] is not True   # random gates as good
    assert C.loss_drop("m", "p", base[:5], base[:5] - 0.2, ctrl[:3, :5])["holds"] is None    # 3 seeds


def test_steering_without_a_fluency_criterion():
    n = 100
    nan = torch.full((n,), float("nan"))
    ctrl = _bern(0.05, n, 3)[None]
    row = C.steering("o", "p", _bern(0.6, n, 4), ctrl, torch.zeros(n, dtype=torch.bool), nan, nan, min_rate=None,
                     max_cost=None, seeds=10)
    assert row["holds"] is True and "fluency" not in row["measured"] and "seed i mod S" in row["control"]
    assert C.steering("o", "p", _bern(0.6, n, 4), ctrl, torch.zeros(n, dtype=torch.bool), nan, nan,
                      min_rate=None, max_cost=None, seeds=3)["holds"] is None


def test_average_precision_matches_its_definition():
    from xlkernels.analysis.reproduce.experts import average_precision
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,))))
    X, y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.rand(40, generator=g) < 0.3
    y[0] = True
    for u in range(5):
        ranked = y[X[:, u].argsort(descending=True)].tolist()
        hits = [sum(ranked[:k + 1]) / (k + 1) for k, r in enumerate(ranked) if r]
        assert average_precision(X, y)[u].item() == pytest.approx(sum(hits) / len(hits))
    perfect = torch.where(y, 1.0, 0.0)[:, None].double()
    assert average_precision(perfect, y).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no positive"):
        average_precision(X, torch.zeros(40, dtype=torch.bool))


def test_retrieval_hits_on_planted_embeddings():
    from xlkernels.analysis.reproduce.experts import retrieval_hits
    E = torch.randn(3, 12, 16)
    assert retrieval_hits(E, E + 0.01 * torch.randn(3, 12, 16)).tolist() == [1.0] * 12
    assert retrieval_hits(E, E[:, [1, 0] + list(range(2, 12))])[:2].tolist() == [0.0, 0.0]
    assert retrieval_hits(E, E[:, [4, 7]], [4, 7]).tolist() == [1.0, 1.0]


def test_prefixed_nll_scores_a_subset_as_in_the_whole_set():
    from xlkernels.models import tiny_model
    model, tok = tiny_model("llama", seed=int(torch.randint(1000, (1,))), num_hidden_layers=2)
    texts = [f"text number {i} has some words in it" for i in range(9)]
    full = tasks.prefixed_nll(model, tok, texts, texts[-1:] + texts[:-1], context=16)
    part = tasks.prefixed_nll(model, tok, texts[3:6], texts[2:5], context=16)
    assert torch.allclose(full[3:6], part, atol=1e-5) and torch.isfinite(full).all()
    other = tasks.prefixed_nll(model, tok, texts[3:6], ["zzz"] * 3, context=16)
    assert not torch.allclose(other, part)
