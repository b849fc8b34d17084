"""LAPE deactivation matrix vs a forward-hook reference (act_fn output index_fill_ 0) on a tiny model."""
import pytest
import torch
import torch.nn.functional as F

from bench.bench_lape_job import old_nll
from xlkernels.analysis.neurons import deactivation as D

CORPUS = {
    "en": ["The cat sat on the mat.", "Open the file", "Save changes?"],
    "de": ["Die Katze saß auf der Matte.", "Datei öffnen"],
    "fr": ["Le chat était assis sur le tapis.", "Ouvrir le fichier", "Oui, bien sûr", "Non"],
}


def _sets(L, I, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randperm(I, generator=g)[: 5 + 7 * k + 3 * l].sort().values for l in range(L)]
            for k in range(K)]


def _ref_nll(model, tok, corpus, max_length):
    """Per text, batch of one: token-weighted mean NLL of tokens 1..n-1, per language."""
    out = []
    with torch.no_grad():
        for texts in corpus.values():
            tot, cnt = 0.0, 0
            for t in texts:
                ids = torch.tensor([tok(t, truncation=True, max_length=max_length)["input_ids"]])
                logits = model(input_ids=ids, use_cache=False).logits
                tot += F.cross_entropy(logits[0, :-1].double(), ids[0, 1:], reduction="sum").item()
                cnt += ids.shape[1] - 1
            out.append(tot / cnt)
    return torch.tensor(out, dtype=torch.float64)


def _ref_matrix(model, tok, corpus, sets, max_length):
    layers = model.model.layers
    base = _ref_nll(model, tok, corpus, max_length)
    rows = []
    for per_l in sets:
        hs = [layers[l].mlp.act_fn.register_forward_hook(
            lambda m, i, o, idx=idx: o.index_fill_(-1, idx, 0)) for l, idx in enumerate(per_l)]
        try:
            rows.append(_ref_nll(model, tok, corpus, max_length))
        finally:
            for h in hs:
                h.remove()
    return base, torch.stack(rows)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_deactivation_matrix_vs_hook_reference(arch):
    import xlkernels
    from xlkernels.models import tiny_model
    ref, tok = tiny_model(arch, seed=2)
    sets = _sets(2, 128, 3)
    base_ref, loss_ref = _ref_matrix(ref, tok, CORPUS, sets, 24)
    model, _ = tiny_model(arch, seed=2)
    st = xlkernels.patch(model)
    res = D.deactivation_matrix(st, tok, CORPUS, sets, batch_size=3, max_length=24, progress=False)
    assert res["loss"].shape == (3, 3) and res["langs_off"] == list(CORPUS)
    assert torch.allclose(res["base"], base_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(res["loss"], loss_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(res["delta"], loss_ref - base_ref, rtol=1e-4, atol=1e-4)
    assert (res["delta"].abs() > 1e-4).all()          # the interventions did something
    # interventions are cleared afterwards: the plain loss again
    assert torch.allclose(D.language_nll(model, tok, CORPUS, 2, 24), base_ref, rtol=1e-5, atol=1e-5)
    assert "off \\ eval" in D.format_matrix(res)


def test_deactivation_bad_input():
    from xlkernels.models import tiny_model
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match="neuron_sets"):
        D.deactivation_matrix(model, tok, CORPUS, _sets(2, 128, 2), progress=False)
    with pytest.raises(ValueError, match="layers"):
        D.deactivation_matrix(model, tok, CORPUS, [x[:1] for x in _sets(2, 128, 3)], progress=False)


@pytest.mark.parametrize("arch", ["gemma2", "qwen2"])
def test_language_nll_old_vs_new(arch):
    """The old padded full-logits implementation and the new one agree within fp32 rounding, with and without
    a deactivation (gemma2: final logit softcapping; qwen2: sliding window on one layer)."""
    import xlkernels
    from xlkernels.models import tiny_model
    model, tok = tiny_model(arch, seed=4)
    st = xlkernels.patch(model)
    try:
        for sets in (None, _sets(2, 128, 1, seed=9)[0]):
            D._clear(st)
            if sets is not None:
                st.deactivate_neurons({l: idx for l, idx in enumerate(sets)})
            old = old_nll(model, tok, CORPUS, 2, 20)   # the pre-bucketing implementation, kept in the bench
            for bs in (1, 2, 5):
                new = D.language_nll(st, tok, CORPUS, bs, 20)
                torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)
    finally:
        D._clear(st)
        xlkernels.unpatch(model)
