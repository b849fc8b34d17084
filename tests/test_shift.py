"""CLAIM-style shift vectors (xlkernels.analysis.shift): direction, probes, bank, capture and injection
checked against o_proj pre-hook references."""
import pytest
import torch

from xlkernels.analysis import tokens
from xlkernels.analysis.steering import shift as sh

EN = ["Enter a valid email address.", "This field is required.", "Save and continue editing",
      "Please correct the errors below.", "Delete selected items", "Change password"]
FR = ["Saisissez une adresse e-mail valide.", "Ce champ est obligatoire.",
      "Enregistrer et continuer les modifications", "Veuillez corriger les erreurs ci-dessous.",
      "Supprimer les éléments sélectionnés", "Modifier le mot de passe"]


# ----------------------------------------------------------------------------------------- pure parts
def test_shift_vector_direction():
    src = torch.randn(9, 2, 3, 5)
    tgt = torch.randn(9, 2, 3, 5) + 2.0
    S = sh.shift_vector(src, tgt)
    torch.testing.assert_close(src.mean(0) + S, tgt.mean(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="src and tgt"):
        sh.shift_vector(src, tgt[:, :1])


def test_split_indices():
    tr, te = sh.split_indices(10, 0.7, seed=3)
    assert len(tr) == 7 and len(te) == 3 and set(tr.tolist()).isdisjoint(te.tolist())
    assert sorted(tr.tolist() + te.tolist()) == list(range(10))
    assert torch.equal(sh.split_indices(10, 0.7, seed=3)[0], tr)
    with pytest.raises(ValueError, match="train_frac"):
        sh.split_indices(10, 1.0)


@pytest.mark.parametrize("method", ["logistic", "centroid"])
def test_probe_finds_the_separable_head(method):
    n, L, H, D = 40, 2, 3, 6
    src, tgt = torch.randn(n, L, H, D), torch.randn(n, L, H, D)
    tgt[:, 1, 2] += 3.0                      # only head (1,2) differs between the languages
    acc = sh.pair_probe(src, tgt, method=method, train_frac=0.5, seed=0)
    assert acc.shape == (L, H)
    assert acc[1, 2] > 0.95
    others = acc.flatten()[torch.arange(L * H) != 5]
    assert others.max() < 0.85 and others.mean() < 0.7
    mask = sh.head_mask(acc, 1)
    assert mask.sum() == 1 and mask[1, 2]


def test_probe_balanced_accuracy_one_vs_rest():
    n, L, H, D = 30, 1, 2, 4
    outs = {x: torch.randn(n, L, H, D) for x in ("a", "b", "c")}
    outs["c"][:, 0, 1] += 4.0
    acc = sh._one_vs_rest(outs, "c", "logistic", 0.6, 0)
    assert acc[0, 1] > 0.95 and acc[0, 0] < 0.8
    with pytest.raises(ValueError, match="method"):
        sh.probe_accuracy(torch.randn(4, 1, 1, 2), torch.tensor([0, 1, 0, 1]).bool(), torch.arange(2),
                          torch.arange(2, 4), method="svm")


def test_masked_shift_and_head_mask():
    S = torch.randn(2, 3, 4)
    m = torch.tensor([[True, False, False], [False, False, True]])
    out = sh.masked_shift(S, m, alpha=2.5)
    torch.testing.assert_close(out[m], 2.5 * S[m])
    assert out[~m].eq(0).all()
    s = torch.tensor([[0.1, 0.9, 0.5], [0.9, 0.2, 0.3]])
    assert sh.head_mask(s, 2).nonzero().tolist() == [[0, 1], [1, 0]]    # tie -> both, by flat id
    with pytest.raises(ValueError, match="k"):
        sh.head_mask(s, 7)


def test_shift_bank_rows():
    n, L, H, D = 12, 2, 4, 3
    outs = {x: torch.randn(n, L, H, D) + i for i, x in enumerate(("en", "de", "fr"))}
    means = {x: v.double().mean(0) for x, v in outs.items()}
    b = sh.shift_bank(outs, pivot="en", select="all")
    assert b.bank.shape == (3, L, H, D) and b.bank[0].eq(0).all()
    torch.testing.assert_close(b.bank[2], (means["fr"] - means["en"]).float())
    bm = sh.shift_bank(outs, pivot="mean", select="all")
    torch.testing.assert_close(bm.bank.sum(0), torch.zeros(L, H, D), atol=1e-5, rtol=0)
    imp = {x: torch.rand(L, H) for x in outs}
    bi = sh.shift_bank(outs, pivot="mean", select="importance", importance=imp, k=3)
    for r, x in enumerate(outs):
        want = sh.head_mask(imp[x], 3)
        assert torch.equal(bi.heads[r], want)
        assert bi.bank[r][~want].eq(0).all()
        torch.testing.assert_close(bi.bank[r][want], bm.bank[r][want])
    bp = sh.shift_bank(outs, pivot="en", k=2)
    assert bp.heads.sum(dim=(1, 2)).tolist() == [0, 2, 2]
    assert bp.index(["fr", "en"]).tolist() == [2, 0]
    with pytest.raises(ValueError, match="not in the bank"):
        bp.index(["xx"])
    with pytest.raises(ValueError, match="pivot"):
        sh.shift_bank(outs, pivot="ja")
    with pytest.raises(ValueError, match="importance"):
        sh.shift_bank(outs, select="importance")
    with pytest.raises(ValueError, match="2 languages"):
        sh.shift_bank({"en": outs["en"]})


# ----------------------------------------------------------------------------------------- with a model
@pytest.fixture(scope="module")
def tiny():
    from xlkernels.models import tiny_model
    return tiny_model("llama", seed=7)


def _hook_outputs(model, tok, texts, position):
    """Reference: unpatched model, one text at a time, o_proj pre-hooks slicing per-head outputs."""
    H = model.config.num_attention_heads
    rows = []
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        got = {}
        hs = [layer.self_attn.o_proj.register_forward_pre_hook(
              lambda m, a, l=l: got.__setitem__(l, a[0][0].view(a[0].shape[1], H, -1).clone()))
              for l, layer in enumerate(model.model.layers)]
        with torch.no_grad():
            model(input_ids=ids)
        for h in hs:
            h.remove()
        per = torch.stack([got[l] for l in range(len(got))])        # (L,T,H,D)
        rows.append(per[:, -1] if position == "last" else per.mean(1))
    return torch.stack(rows)


@pytest.mark.parametrize("position", ["last", "mean"])
def test_head_outputs_match_hooks(tiny, position):
    import xlkernels
    model, tok = tiny
    ref = _hook_outputs(model, tok, EN, position)
    st = xlkernels.patch(model)
    try:
        # captures are raw (pre gate/shift) outputs: steering the LAST layer must not leak in ("mean" reads
        # the plain model, so there any steering is ignored)
        last = slice(st.num_layers - 1, None) if position == "last" else slice(None)
        st.shift[last] = torch.randn_like(st.shift[last])
        st.gate[last] = torch.rand_like(st.gate[last])
        got = sh.head_outputs(st, tok, EN, position=position, batch_size=4)
    finally:
        xlkernels.unpatch(model)
    assert got.shape == (len(EN), st.num_layers, st.num_heads, st.head_dim)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def _hook_logits(model, ids, shifts):
    """Reference injection: o_proj pre-hook adding shifts[b] (L,H,D) to sample b's head outputs."""
    H = model.config.num_attention_heads
    outs = []
    for b in range(ids.shape[0]):
        def pre(m, a, l):
            x = a[0]
            return ((x.view(*x.shape[:2], H, -1) + shifts[b][l]).view(x.shape),)
        hs = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, l=l: pre(m, a, l))
              for l, layer in enumerate(model.model.layers)]
        with torch.no_grad():
            outs.append(model(input_ids=ids[b:b + 1]).logits[0])
        for h in hs:
            h.remove()
    return torch.stack(outs)


def test_injection_and_bank_match_hooks(tiny):
    import xlkernels
    model, tok = tiny
    st = xlkernels.patch(model)
    try:
        src = sh.head_outputs(st, tok, EN)
        tgt = sh.head_outputs(st, tok, FR)
        S = sh.shift_vector(src, tgt)
        acc = sh.pair_probe(src, tgt, method="centroid", train_frac=0.5)
        m = sh.head_mask(acc, 3)
        delta = sh.masked_shift(S, m, alpha=4.0)
        bank = sh.shift_bank({"en": src, "fr": tgt}, pivot="en", k=3, probe="centroid", train_frac=0.5)
        torch.testing.assert_close(bank.bank[1], sh.masked_shift(S, m), rtol=1e-5, atol=1e-6)
    finally:
        xlkernels.unpatch(model)
    seqs = tokens.encode(tok, ["Hello there", "Bonjour toi"], 32)
    ids = torch.tensor([seqs[0][:5], seqs[1][:5]])
    ref_one = _hook_logits(model, ids, [delta, delta])
    ref_bank = _hook_logits(model, ids, [4.0 * bank.bank[1], 4.0 * bank.bank[0]])
    plain = _hook_logits(model, ids, [torch.zeros_like(delta)] * 2)
    st = xlkernels.patch(model)
    try:
        with torch.no_grad():
            st.shift = delta
            got_one = model(input_ids=ids).logits
            st.reset()
            bank.apply(st, ["fr", "en"], alpha=4.0)
            got_bank = model(input_ids=ids).logits
    finally:
        xlkernels.unpatch(model)
    assert (ref_one - plain).abs().max() > 1e-3          # the shift does something
    torch.testing.assert_close(got_one, ref_one, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_bank, ref_bank, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_bank[1], plain[1], rtol=1e-4, atol=1e-4)   # pivot row is zero
