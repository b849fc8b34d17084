"""LAHIS (xlkernels.analysis.heads): score aggregation, head sets, batched gradients vs a hook reference."""
import pytest
import torch

from xlkernels.analysis import heads, tokens

TEXTS = ["Enter a valid email address.", "Bonjour, le monde!", "Hallo Welt, wie geht es dir heute?", "ok",
         "Введите правильный адрес.", "这是一个测试。",
         "Ceci est une phrase un peu plus longue."]


# ----------------------------------------------------------------------------------------- pure parts
def test_accumulator_matches_formula():
    g = torch.randn(7, 3, 5, dtype=torch.float64)
    acc = heads.LahisAccumulator(3, 5)
    acc.add(g[:4])
    for i in range(4, 7):
        acc.add(g[i])
    want = g.abs().mean(0) * (g < 0).double().mean(0)
    torch.testing.assert_close(acc.scores(), want.float(), rtol=1e-6, atol=0)
    assert acc.N == 7


def test_accumulator_uses_gate_value():
    g = torch.randn(5, 2, 3)
    m = torch.rand(2, 3) * 2 - 0.5          # some negative gates flip the sign test
    acc = heads.LahisAccumulator(2, 3, scale=1000.0)
    for i in range(5):
        acc.add(g[i], m)
    want = (g.abs() * m).mean(0) * ((g * m) < 0).float().mean(0) * 1000
    torch.testing.assert_close(acc.scores(), want, rtol=1e-5, atol=1e-6)


def test_accumulator_rejects_bad_shape_and_empty():
    acc = heads.LahisAccumulator(2, 3)
    with pytest.raises(ValueError, match="grad"):
        acc.add(torch.randn(2, 4))
    with pytest.raises(ValueError, match="no texts"):
        acc.scores()


def test_flat_ids_roundtrip():
    H = 7
    for l in range(5):
        for h in range(H):
            i = heads.flat_id(l, h, H)
            assert i == l * H + h and heads.unflat(i, H) == (l, h)


def test_top_heads_quantile_and_order():
    torch.manual_seed(0)
    s = torch.rand(6, 9)                   # 54 heads; top 4% -> strictly above the 0.96 quantile
    ids = heads.top_heads(s, 0.96)
    flat = s.flatten().double()
    thr = torch.quantile(flat, 0.96)
    assert set(ids) == set((flat > thr).nonzero().flatten().tolist())
    assert len(ids) == 3                    # position 0.96*53 = 50.88 -> sorted ranks 51..53 lie above
    vals = flat[ids]
    assert torch.all(vals[:-1] >= vals[1:])
    assert heads.top_heads(s, 0.0) == torch.argsort(flat, descending=True).tolist()[:-1]
    with pytest.raises(ValueError, match="q"):
        heads.top_heads(s, 1.5)


def test_top_k_heads():
    s = torch.randn(4, 5)
    ids = heads.top_k_heads(s, 3)
    assert ids == torch.argsort(s.flatten(), descending=True)[:3].tolist()
    with pytest.raises(ValueError, match="k"):
        heads.top_k_heads(s, 0)


def _scores_with_top(L, H, top):
    """Scores whose top-4% list is exactly `top` (descending)."""
    s = torch.rand(L, H) * 0.1
    for r, i in enumerate(top):
        s.view(-1)[i] = 10.0 - r
    return s


def test_head_sets_general_and_specific():
    L, H = 10, 10                           # 100 heads: q=0.96 keeps exactly 4
    tops = {"en": [1, 2, 3, 4], "de": [2, 1, 5, 6], "fr": [1, 2, 7, 8], "es": [2, 1, 3, 9],
            "zh": [11, 12, 3, 1]}
    sc = {k: _scores_with_top(L, H, v) for k, v in tops.items()}
    out = heads.head_sets(sc, q=0.96, min_rep=4)
    assert out["top"] == tops
    assert out["general"] == [1, 2]         # 1 in 5 lists, 2 in 4; 3 only in 3
    assert out["specific"]["en"] == [3, 4]
    assert out["specific"]["zh"] == [11, 12, 3]
    assert out["min_rep"] == 4
    out3 = heads.head_sets(sc, min_rep=3)
    assert set(out3["general"]) == {1, 2, 3}


def test_head_sets_min_rep_clamped():
    L, H = 10, 10
    sc = {"en": _scores_with_top(L, H, [1, 2, 3, 4]), "de": _scores_with_top(L, H, [4, 5, 1, 6])}
    out = heads.head_sets(sc, min_rep=4)    # 2 languages: general = in both lists
    assert out["min_rep"] == 2 and out["general"] == [1, 4]
    assert out["specific"] == {"en": [2, 3], "de": [5, 6]}
    one = heads.head_sets({"en": sc["en"]}, min_rep=4)
    assert one["min_rep"] is None and one["general"] == [] and one["specific"]["en"] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="min_rep"):
        heads.head_sets(sc, min_rep=0)
    with pytest.raises(ValueError, match="scores"):
        heads.head_sets({})


def test_pad_right_and_encode():
    from xlkernels.models import tiny_tokenizer
    tok = tiny_tokenizer()
    seqs = tokens.encode(tok, ["abc", "", "hello world"], max_length=5)
    assert len(seqs) == 2 and len(seqs[1]) == 5 and seqs[0][0] == tok.bos_token_id   # "" has only <bos>
    ids, mask = tokens.pad_right(seqs, pad_id=0)
    assert ids.shape == (2, 5) and mask.tolist() == [[1, 1, 1, 1, 0], [1] * 5]
    assert ids[0, 4] == 0
    with pytest.raises(ValueError, match="max_length"):
        tokens.encode(tok, ["a"], max_length=1)


# ----------------------------------------------------------------------------------------- model parts
@pytest.fixture(scope="module")
def tiny():
    from xlkernels.models import tiny_model
    return tiny_model("llama", seed=3)


def test_sample_nll_matches_hf_loss_per_sample(tiny):
    model, tok = tiny
    seqs = tokens.encode(tok, TEXTS, 64)
    ids, mask = tokens.pad_right(seqs, pad_id=0)
    with torch.no_grad():
        got = tokens.sample_nll(model, ids, mask)
        want = torch.stack([model(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss for s in seqs])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _patched(tiny):
    import xlkernels
    model, tok = tiny
    return xlkernels.patch(model), model, tok


@pytest.mark.parametrize("mode", ["gradient", "paper"])
def test_lahis_matches_hook_reference(tiny, mode):
    import xlkernels
    model, tok = tiny
    ref = heads.lahis_scores_hooked(model, tok, TEXTS, mode=mode, max_length=64)
    st = xlkernels.patch(model)
    try:
        got = heads.lahis_scores(st, tok, TEXTS, mode=mode, batch_size=3, max_length=64)
    finally:
        xlkernels.unpatch(model)
    assert torch.isfinite(got).all() and got.abs().sum() > 0
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=1e-7)
    assert torch.equal(got > 0, ref > 0)


def test_gradient_mode_batched_equals_per_sample(tiny):
    import xlkernels
    model, tok = tiny
    st = xlkernels.patch(model)
    try:
        seqs = tokens.encode(tok, TEXTS, 64)
        L, H = st.num_layers, st.num_heads
        # per-sample gradients from one batched backward vs one backward per text
        ids, mask = tokens.pad_right(seqs, 0)
        gate = torch.ones(len(seqs), L, H, requires_grad=True)
        st.gate = gate
        (gb,) = torch.autograd.grad(tokens.sample_nll(model, ids, mask).sum(), gate)
        for i, s in enumerate(seqs):
            g1 = torch.ones(L, H, requires_grad=True)
            st.gate = g1
            i1, m1 = tokens.pad_right([s], 0)
            (g,) = torch.autograd.grad(tokens.sample_nll(model, i1, m1)[0], g1)
            # padded batch vs batch of one run different attention paths: fp32 rounding, relative to |g|max
            tol = 1e-5 * float(g.abs().max())
            torch.testing.assert_close(gb[i], g, rtol=1e-5, atol=tol)
            clear = g.abs() > 10 * tol
            assert torch.equal((gb[i] < 0)[clear], (g < 0)[clear])
        st.reset()
        a = heads.lahis_scores(st, tok, TEXTS, batch_size=len(TEXTS), max_length=64)
        b = heads.lahis_scores(st, tok, TEXTS, batch_size=1, max_length=64)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
        assert torch.equal(st.gate, torch.ones(L, H)) and not model.training
        assert all(p.requires_grad for p in model.parameters())
    finally:
        xlkernels.unpatch(model)


def test_paper_mode_mask_drifts(tiny):
    """The AdamW step makes 'paper' differ from the pure gradient at ones."""
    import xlkernels
    model, tok = tiny
    st = xlkernels.patch(model)
    try:
        g = heads.lahis_scores(st, tok, TEXTS, mode="gradient", max_length=64, scale=1000.0)
        p = heads.lahis_scores(st, tok, TEXTS, mode="paper", max_length=64)
    finally:
        xlkernels.unpatch(model)
    assert not torch.allclose(g, p, rtol=1e-3)
    assert torch.corrcoef(torch.stack([g.flatten(), p.flatten()]))[0, 1] > 0.5


def test_lahis_bad_args(tiny):
    import xlkernels
    model, tok = tiny
    st = xlkernels.patch(model)
    try:
        with pytest.raises(ValueError, match="mode"):
            heads.lahis_scores(st, tok, TEXTS, mode="nope")
        with pytest.raises(ValueError, match="batch_size"):
            heads.lahis_scores(st, tok, TEXTS, batch_size=0)
        with pytest.raises(ValueError, match="texts"):
            heads.lahis_scores(st, tok, ["", ""])
    finally:
        xlkernels.unpatch(model)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "qwen2"])
def test_lahis_other_archs_match_hooks(arch):
    """Sliding windows, GQA, q/k norms and Gemma's scaled embeddings: same scores as the hook path."""
    import xlkernels
    from xlkernels.models import tiny_model
    model, tok = tiny_model(arch, seed=1)
    ref = heads.lahis_scores_hooked(model, tok, TEXTS[:5], max_length=48)
    st = xlkernels.patch(model)
    try:
        got = heads.lahis_scores(st, tok, TEXTS[:5], batch_size=5, max_length=48)
    finally:
        xlkernels.unpatch(model)
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=1e-7)


def _full_logits_nll(model, ids, mask, labels=None):
    """The plain loss: full (B,T,V) logits from the causal LM, then cross entropy."""
    import torch.nn.functional as F
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = (ids if labels is None else labels)[:, 1:]
    valid = (mask[:, 1:].bool() & mask[:, :-1].bool()) if labels is None else target != -100
    nll = F.cross_entropy(logits.float().transpose(1, 2), target.clamp_min(0), reduction="none")
    return nll * valid, valid


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("chunk", [5, None])
def test_chunked_nll_equals_full_logits_loss_and_grad(arch, chunk):
    """Chunked lm_head + checkpointing (gemma2: final logit softcapping) = the full-logits loss and its
    gradient in the gate; labels with -100 too."""
    import xlkernels
    from xlkernels.models import tiny_model
    model, tok = tiny_model(arch, seed=2)
    if arch == "gemma2":
        assert model.config.final_logit_softcapping
    ids, mask = tokens.pad_right(tokens.encode(tok, TEXTS, 40), 0)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3, -100)
    st = xlkernels.patch(model)
    try:
        with tokens.frozen(model):
            for lab in (None, labels):
                res = []
                for fn in (_full_logits_nll, lambda *a: tokens.token_nll(*a, chunk_tokens=chunk)):
                    gate = (1 + 0.1 * torch.randn(len(ids), st.num_layers, st.num_heads,
                                                  generator=torch.Generator().manual_seed(1))).requires_grad_()
                    st.gate = gate
                    nll, valid = fn(model, ids, mask, lab)
                    (g,) = torch.autograd.grad((nll.sum(1) / valid.sum(1).clamp_min(1)).sum(), gate)
                    res.append((nll.detach(), valid, g))
                (n0, v0, g0), (n1, v1, g1) = res
                assert torch.equal(v0, v1) and torch.isfinite(n1).all() and g1.abs().sum() > 0
                torch.testing.assert_close(n1, n0, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5 * float(g0.abs().max()))
                with torch.no_grad():
                    n2, _ = tokens.token_nll(model, ids, mask, lab, chunk_tokens=chunk)
                torch.testing.assert_close(n2, n1, rtol=1e-6, atol=1e-7)
    finally:
        xlkernels.unpatch(model)


def test_chunk_tokens_for():
    assert tokens.chunk_tokens_for(262144) == 64
    assert tokens.chunk_tokens_for(32000) == 524
    assert tokens.chunk_tokens_for(260) == 1024
    assert tokens.chunk_tokens_for(10 ** 9) == 16
