"""Soft head mask (xlkernels.analysis.soft_mask): k trainable gates, answer-only loss, training."""
import pytest
import torch

from xlkernels.analysis.heads import soft_mask as sm

PAIRS = [("Q: capital of France? A:", " Paris"), ("Q: 2+2? A:", " 4"), ("Q: color of sky? A:", " blue"),
         ("Q: opposite of hot? A:", " cold"), ("Q: first letter? A:", " a"), ("Q: capital of Italy? A:", " Rome")]


def test_default_k():
    assert sm.default_k(32, 32) == 20 and sm.default_k(28, 24) == 13 and sm.default_k(2, 4) == 1


def test_scatter_gate_only_k_entries_and_grad():
    v = torch.randn(3, dtype=torch.float64, requires_grad=True)
    g = sm.scatter_gate(v, [5, 0, 11], 3, 4)
    assert g.shape == (3, 4)
    flat = g.detach().flatten()
    assert flat[5] == v[0] and flat[0] == v[1] and flat[11] == v[2]
    others = torch.ones(12, dtype=torch.bool)
    others[[5, 0, 11]] = False
    assert torch.all(flat[others] == 1)
    (g * torch.arange(12.0, dtype=torch.float64).view(3, 4)).sum().backward()
    assert v.grad.tolist() == [5.0, 0.0, 11.0]


def test_qa_batch_labels():
    from xlkernels.models import tiny_tokenizer
    tok = tiny_tokenizer()
    ids, mask, labels = sm.qa_batch(tok, PAIRS[:2], max_length=64)
    for b, (p, a) in enumerate(PAIRS[:2]):
        pi = tok(p)["input_ids"]
        ai = tok(a, add_special_tokens=False)["input_ids"]
        n = len(pi) + len(ai)
        assert ids[b, :n].tolist() == pi + ai and mask[b].sum() == n
        assert labels[b, :len(pi)].eq(-100).all() and labels[b, len(pi):n].tolist() == ai
        assert labels[b, n:].eq(-100).all()
    ids, mask, labels = sm.qa_batch(tok, [("x" * 50, " yes")], max_length=10)   # prompt cut from the left
    assert ids.shape[1] == 10 and labels[0, -4:].ne(-100).all()


@pytest.fixture(scope="module")
def tiny():
    import xlkernels
    from xlkernels.models import tiny_model
    model, tok = tiny_model("llama", seed=5)
    st = xlkernels.patch(model)
    yield st, model, tok
    xlkernels.unpatch(model)


def test_answer_loss_ignores_prompt(tiny):
    st, model, tok = tiny
    ids, mask, labels = sm.qa_batch(tok, PAIRS[:3])
    # reference: logits -> per-token CE only where the NEXT token is an answer token
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
        got = sm.answer_loss(model, ids, mask, labels)
    lp = torch.log_softmax(logits[:, :-1], -1)
    tot, n = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if labels[b, t + 1] != -100:
                tot += -lp[b, t, labels[b, t + 1]]
                n += 1
    torch.testing.assert_close(got.double(), tot / n, rtol=1e-5, atol=1e-6)
    # gradient reaching the last hidden states (final norm output) is zero at every position that predicts a
    # prompt (or pad) token (the chunked loss runs lm_head on answer positions only)
    grads = []
    h = model.model.norm.register_forward_hook(lambda m, i, o: [o.register_hook(grads.append), None][1])
    try:
        sm.answer_loss(model, ids, mask, labels).backward()
    finally:
        h.remove()
        model.zero_grad(set_to_none=True)
    g = grads[0]
    pred_answer = torch.zeros_like(labels, dtype=torch.bool)
    pred_answer[:, :-1] = labels[:, 1:] != -100
    assert g[~pred_answer].abs().max() == 0
    assert g[pred_answer].abs().sum(-1).gt(0).all()


def test_training_lowers_loss_and_touches_only_k(tiny):
    st, model, tok = tiny
    L, H = st.num_layers, st.num_heads
    scores = torch.rand(L, H)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = sm.train_soft_mask(st, tok, PAIRS, scores=scores, k=3, epochs=6, lr=5e-2)
    assert res.heads == torch.topk(scores.flatten(), 3).indices.tolist()
    flat = res.gate.flatten()
    changed = (flat != 1).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(res.heads)
    assert res.values.shape == (3,) and torch.equal(flat[res.heads], res.values)
    assert res.losses[-1] < res.losses[0]
    ids, mask, labels = sm.qa_batch(tok, PAIRS)
    with torch.no_grad():
        base = sm.answer_loss(model, ids, mask, labels)
        st.gate = res.gate
        tuned = sm.answer_loss(model, ids, mask, labels)
        st.reset()
    assert tuned < base
    for n, p in model.named_parameters():   # the model itself is untouched
        assert torch.equal(p, before[n]), n
    assert torch.equal(st.gate, torch.ones(L, H))


def test_default_k_on_tiny_and_bad_args(tiny):
    st, model, tok = tiny
    res = sm.train_soft_mask(st, tok, PAIRS[:2], scores=torch.rand(st.num_layers, st.num_heads), epochs=1)
    assert len(res.heads) == 1 and len(res.losses) == 1
    with pytest.raises(ValueError, match="scores"):
        sm.train_soft_mask(st, tok, PAIRS)
    with pytest.raises(ValueError, match="scores"):
        sm.train_soft_mask(st, tok, PAIRS, scores=torch.rand(3, 3))
    with pytest.raises(ValueError, match="heads"):
        sm.train_soft_mask(st, tok, PAIRS, heads=[0, 0])
    with pytest.raises(ValueError, match="heads"):
        sm.train_soft_mask(st, tok, PAIRS, heads=[99])
    with pytest.raises(ValueError, match="pairs"):
        sm.train_soft_mask(st, tok, [], heads=[1])
