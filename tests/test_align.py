import json
import math

import pytest
import torch

from xlkernels.analysis import align
from xlkernels.analysis.align import anc_score, embed, embed_many, mexa, mexa_score, pool
from xlkernels.models import tiny_model

TEXTS = ["Enter a valid email address.", "hi", "Guten Morgen zusammen, wie geht's?", "日本語のテキスト",
         "a b c d e f g h i j k", "Bitte eine Zahl eingeben!"]   # distinct last tokens


# ---- MEXA on hand-built inputs ----------------------------------------------------------------
def test_mexa_identity_is_one():
    E = torch.randn(7, 5, dtype=torch.float64)
    assert mexa_score(E, E) == 1.0
    assert mexa_score(E, 3.0 * E) == 1.0            # cosine: scale invariant


def test_mexa_swapped_pair():
    E = torch.randn(9, 16)
    F = E.clone()
    F[[2, 5]] = F[[5, 2]]                          # sentences 2 and 5 retrieve each other's partner
    assert mexa_score(E, F) == pytest.approx(7 / 9)


def test_mexa_ties_are_strict():
    E = torch.eye(4)
    F = torch.eye(4)
    F[1] = F[0]                                     # en_0 is equally close to l_0 and l_1: a tie fails
    # row 0: C[0,0] = C[0,1] = 1 -> fail; row 1: C[1,1] = 0 -> fail; rows 2, 3 pass
    assert mexa_score(E, F) == pytest.approx(2 / 4)


def test_mexa_column_condition():
    # row i=0 is a nearest neighbour by row, but column 0 has a larger off-diagonal entry (from en_1).
    E = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
    F = torch.tensor([[1.0, 0.2], [0.0, 1.0]])
    C = torch.nn.functional.normalize(E, dim=1) @ torch.nn.functional.normalize(F, dim=1).T
    assert C[0, 0] > C[0, 1] and C[1, 0] > C[0, 0]
    assert mexa_score(E, F) == 0.0                  # 0 fails by column; 1 fails by row (C[1,0] > C[1,1])


def test_mexa_matches_loop_reference_per_layer():
    L, n, D = 3, 11, 6
    A, B = torch.randn(L, n, D), torch.randn(L, n, D)
    B[1] = A[1] + 0.3 * torch.randn(n, D)
    got = mexa_score(A, B)
    assert got.shape == (L,)
    for l in range(L):
        hits = 0
        for i in range(n):
            cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))
            d = cos(A[l, i], B[l, i])
            row = max(cos(A[l, i], B[l, j]) for j in range(n) if j != i)
            col = max(cos(A[l, j], B[l, i]) for j in range(n) if j != i)
            hits += d > row and d > col
        assert got[l].item() == pytest.approx(hits / n)
    assert got[1] > 0.8


def test_mexa_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        mexa_score(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        mexa_score(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(TypeError, match="E_en"):
        mexa_score([[1.0]], torch.randn(1, 1))


# ---- ANC ----------------------------------------------------------------------------------------
def test_anc_is_mean_pearson():
    X, Y = torch.randn(13, 5, dtype=torch.float64), torch.randn(13, 5, dtype=torch.float64)
    Y[:, 0] = 2 * X[:, 0] + 1                       # correlation 1
    ref = sum(torch.corrcoef(torch.stack([X[:, j], Y[:, j]]))[0, 1].item() for j in range(5)) / 5
    assert anc_score(X, Y) == pytest.approx(ref, abs=1e-9)
    assert anc_score(X, -X) == pytest.approx(-1.0)
    per_layer = anc_score(torch.stack([X, X]), torch.stack([Y, X]))
    assert per_layer.tolist() == pytest.approx([ref, 1.0])


def test_anc_constant_neuron_counts_zero():
    X = torch.randn(6, 2)
    Y = X.clone()
    Y[:, 1] = 3.0
    assert anc_score(X, Y) == pytest.approx(0.5)


# ---- pooling and embedding ----------------------------------------------------------------------
def test_pool_hand_checked():
    h = torch.arange(1.0, 7.0).view(1, 3, 2)       # tokens (1,2), (3,4), (5,6)
    left = torch.tensor([[0, 1, 1]])                # first token is a pad
    assert pool(h, left, "weighted")[0].tolist() == pytest.approx([(3 + 2 * 5) / 3, (4 + 2 * 6) / 3])
    assert pool(h, left, "last").tolist() == [[5.0, 6.0]]
    assert pool(h, left, "mean").tolist() == [[4.0, 5.0]]
    right = torch.tensor([[1, 1, 0]])
    assert pool(h, right, "last").tolist() == [[3.0, 4.0]]
    assert pool(h, right, "weighted")[0].tolist() == pytest.approx([(1 + 2 * 3) / 3, (2 + 2 * 4) / 3])
    with pytest.raises(ValueError, match="pooling"):
        pool(h, left, "max")


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2", "phi3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_embed_batched_equals_batch_one(arch, side):
    model, tok = tiny_model(arch)
    tok.padding_side = side
    big = embed_many(model, tok, TEXTS, ("weighted", "last", "mean"), batch_size=4)
    for i, t in enumerate(TEXTS):
        ids = tok([t], return_tensors="pt")
        with torch.no_grad():
            hs = torch.stack(model(**ids, output_hidden_states=True).hidden_states)[:, 0]   # (L+1, T, D)
        T = hs.shape[1]
        w = torch.arange(1.0, T + 1)
        ref = {"weighted": (hs * w[:, None]).sum(1) / w.sum(), "last": hs[:, -1], "mean": hs.mean(1)}
        for p in ref:
            torch.testing.assert_close(big[p][:, i], ref[p], rtol=1e-4, atol=1e-5)
    assert big["weighted"].shape == (model.config.num_hidden_layers + 1, len(TEXTS), 64)


def test_mexa_invariant_to_batch_size():
    from xlkernels.analysis.data import parallel_corpus
    corpus = parallel_corpus(["en", "de", "ja"], n=12)
    model, tok = tiny_model("gemma2")
    a = mexa(model, tok, corpus, batch_size=1)
    b = mexa(model, tok, corpus, batch_size=5)
    assert a["mexa"] == b["mexa"]
    for lang in a["anc"]:
        assert a["anc"][lang] == pytest.approx(b["anc"][lang], abs=1e-5)
    assert a["num_layers"] == 3 and a["langs"] == ["de", "ja"] and a["n"] == 12
    assert set(a["mexa"]) == {"weighted", "last"}
    for p in a["mexa"]:
        for lang, ys in a["mexa"][p].items():
            assert len(ys) == 3 and all(0 <= y <= 1 for y in ys)
            assert a["mexa_mean"][p][lang] == pytest.approx(sum(ys) / 3)
            assert a["mexa_max"][p][lang] == max(ys)


def test_mexa_self_alignment_is_one():
    model, tok = tiny_model("llama")
    corpus = {"en": TEXTS, "copy": list(TEXTS)}
    r = mexa(model, tok, corpus, poolings=("weighted", "last"))
    assert all(v == 1.0 for p in r["mexa"] for v in r["mexa"][p]["copy"])
    assert r["anc"]["copy"] == pytest.approx([1.0] * 3)


def test_mexa_corpus_errors():
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match="pivot language 'en'"):
        mexa(model, tok, {"de": ["a", "b"]})
    with pytest.raises(ValueError, match="not aligned"):
        mexa(model, tok, {"en": ["a", "b"], "de": ["a"]})
    with pytest.raises(ValueError, match="texts is empty"):
        embed(model, tok, [])


# ---- CLI end to end -------------------------------------------------------------------------------
def test_cli_align_tiny(tmp_path, capsys):
    from xlkernels.cli import main
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["align", "--tiny", "qwen3", "--langs", "en,de,fr", "--n", "8", "--no-progress",
               "--json", str(out), "--plot", str(png)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["langs"] == ["de", "fr"] and res["n"] == 8 and res["num_layers"] == 3
    assert len(res["mexa"]["weighted"]["de"]) == 3 and len(res["anc"]["fr"]) == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "de" in text and "weighted mean" in text


def test_cli_align_user_texts(tmp_path):
    from xlkernels.cli import main
    (tmp_path / "en.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "de.jsonl").write_text('{"text": "eins"}\n{"text": "zwei"}\n{"text": "drei"}\n')
    out = tmp_path / "r.json"
    rc = main(["align", "--tiny", "llama", "--texts", f"en={tmp_path / 'en.txt'}", "--texts",
               f"de={tmp_path / 'de.jsonl'}", "--no-plot", "--no-progress", "--no-anc", "--pooling", "mean",
               "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n"] == 3 and "anc" not in res and list(res["mexa"]) == ["mean"]


def test_cli_align_errors(tmp_path, capsys):
    from xlkernels.cli import main
    assert main(["align", "--tiny", "llama", "--pooling", "max", "--json", str(tmp_path / "x.json")]) == 1
    assert "pooling" in capsys.readouterr().err
    assert main(["align", "--tiny", "llama", "--langs", "en,xx", "--json", str(tmp_path / "x.json")]) == 1
    assert "'xx'" in capsys.readouterr().err
    assert main(["align", "--model", "google/gemma-3-270m", "--json", str(tmp_path / "x.json")]) == 2
    assert "no network" in capsys.readouterr().err


def test_cli_align_help(capsys):
    from xlkernels.cli import main
    with pytest.raises(SystemExit):
        main(["align", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "xlkernels align --tiny" in text


@pytest.mark.model
def test_mexa_real_model_aligns_german():
    from xlkernels.analysis.data import parallel_corpus
    from xlkernels.models import load_default
    model, tok = load_default(progress=False)
    corpus = parallel_corpus(["en", "de"], n=24)
    E = {l: embed_many(model, tok, corpus[l], ("weighted", "mean"), batch_size=12) for l in corpus}
    assert E["en"]["weighted"].shape == (19, 24, 640)
    aligned = mexa_score(E["en"]["weighted"], E["de"]["weighted"])
    rolled = mexa_score(E["en"]["weighted"], E["de"]["weighted"].roll(1, dims=1))   # wrong partners
    # measured here: max 0.54 at layer 12 (short UI strings, several near-duplicate templates)
    assert aligned.max() >= 0.35 and rolled.max() <= 0.15
    assert aligned[8:14].mean() > aligned[[1, 2, -2, -1]].mean()      # middle layers align best
    anc = anc_score(E["en"]["mean"], E["de"]["mean"])
    assert torch.isfinite(anc).all() and anc.max() > 0.3


# ---- shared plots ---------------------------------------------------------------------------------
def test_plots_write_pngs(tmp_path):
    from xlkernels.analysis import plots
    png = b"\x89PNG\r\n\x1a\n"
    p = plots.head_heatmaps({"de": torch.rand(3, 4), "ja": torch.rand(3, 4), "ar": torch.rand(3, 4)},
                            tmp_path / "sub" / "heads.png", title="heads")
    assert open(p, "rb").read(8) == png
    for kind in ("bar", "line"):
        p = plots.neuron_counts({"de": [1, 5, 3], "fr": torch.tensor([2, 0, 4])}, tmp_path / f"n_{kind}.png",
                                kind=kind)
        assert open(p, "rb").read(8) == png
    p = plots.layer_curves({"x": [0.1, 0.5]}, tmp_path / "c.png", ylim=(0, 1))
    assert open(p, "rb").read(8) == png
    with pytest.raises(ValueError, match="layers, heads"):
        plots.head_heatmaps({"de": torch.rand(3)}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="kind"):
        plots.neuron_counts({"de": [1]}, tmp_path / "bad.png", kind="pie")
