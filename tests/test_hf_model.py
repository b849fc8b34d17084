"""The HF integration on the embedded real model (Gemma-3-270M, CPU, fp32)."""
import pytest
import torch

import xlkernels
from test_hf_parity import hooks, rel

pytestmark = pytest.mark.model

TEXTS = ["Enter a valid email address.", "Geben Sie eine gültige E-Mail-Adresse ein.", "请输入一个有效的电子邮件地址。",
         "Hi"]


@pytest.fixture(scope="module")
def real():
    from xlkernels.models import load_default

    model, tok = load_default(progress=False)
    model.eval()
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    return model, tok, enc


@pytest.fixture
def model(real):
    m = real[0]
    yield m
    xlkernels.unpatch(m)


def test_real_logits_parity(model, real):
    enc = real[2]
    assert (enc["attention_mask"] == 0).any()  # left padding present
    with torch.no_grad():
        ref = model(**enc).logits
        xlkernels.patch(model)
        out = model(**enc).logits
    assert rel(out, ref, enc["attention_mask"]) < 1e-4
    assert torch.equal(out[:, -1].argmax(-1), ref[:, -1].argmax(-1))


def test_real_mask_head_matches_hooks(model, real):
    enc = real[2]
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    gate = torch.ones(L, H)
    gate[3, 1] = 0.0
    with torch.no_grad():
        base = model(**enc).logits
        with hooks(model, gate=gate):
            ref = model(**enc).logits
        st = xlkernels.patch(model)
        st.mask_heads([(3, 1)])
        out = model(**enc).logits
    m = enc["attention_mask"]
    assert rel(ref, base, m) > 1e-4  # masking the head changes the logits ...
    assert rel(out, ref, m) < 1e-4   # ... exactly as the hook reference does


def test_real_steered_generation(model, real):
    tok, enc = real[1], real[2]
    st = xlkernels.patch(model)
    g = torch.Generator().manual_seed(0)
    st.shift = torch.randn(st.num_layers, st.num_heads, st.head_dim, generator=g) * 0.5
    st.mask_heads([(0, 0), (5, 2)])
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
        with st.disabled():
            plain = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape == plain.shape == (len(TEXTS), enc["input_ids"].shape[1] + 4)
    assert not torch.equal(out, plain)
    assert all(isinstance(t, str) for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:]))


def test_real_record_neurons(model, real):
    enc = real[2]
    st = xlkernels.patch(model)
    gids = torch.arange(len(TEXTS))[:, None].expand_as(enc["input_ids"]).clone()
    gids[enc["attention_mask"] == 0] = -1
    with torch.no_grad(), st.record_neurons(gids, len(TEXTS)) as stats:
        model(**enc)
    assert stats.positive.shape == (st.num_layers, len(TEXTS), st.num_neurons)
    assert torch.equal(stats.tokens[0], enc["attention_mask"].sum(1))
    p = stats.probability()
    assert torch.isfinite(p).all() and (p > 0).any() and (p < 1).any()
