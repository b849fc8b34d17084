"""Patched HF models vs unpatched HF models and hook-based references, on tiny configs of every architecture."""
import contextlib

import pytest
import torch

import xlkernels
from xlkernels.hf import ARCHS

ARCH_NAMES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "cohere", "phi3", "olmo2"]
BACKENDS = ["cpu", "reference"]
T = 13  # longer than the tiny sliding window (4)


def tiny(arch, attn=None, seed=0, **kw):
    """Tiny random model on HF's sdpa attention; eager where sdpa is refused or cannot softcap (Gemma2: some
    transformers releases allow sdpa there and silently drop the softcap)."""
    from xlkernels.models import tiny_model

    model, _ = tiny_model(arch, seed=seed, **kw)
    model.set_attn_implementation(attn or plain_attn(model))
    return model


def plain_attn(model):
    return "sdpa" if model._supports_sdpa and not getattr(model.config, "attn_logit_softcapping", None) else "eager"


def batch(B=3, T=T, seed=1):
    """Left-padded random batch: sample b has T - 4*b real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, : 4 * b] = 0
    ids[mask == 0] = 0
    return ids, mask


def rel(a, b, mask=None):
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    assert torch.isfinite(a).all(), "non-finite values in output"
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def parts(model):
    """(arch row, decoder layers, heads, head_dim)."""
    arch, cfg, layers = xlkernels.hf.resolve(model)
    H = cfg.num_attention_heads
    return arch, layers, H, getattr(layers[0].self_attn, "head_dim", cfg.hidden_size // H)


@contextlib.contextmanager
def hooks(model, gate=None, shift=None, act_edit=None, act_record=None):
    """Hook reference: gate/shift each head's slice at o_proj's input; edit/record mlp activation outputs."""
    arch, layers, H, D = parts(model)
    handles = []
    for l, layer in enumerate(layers):
        def pre(mod, args, l=l):
            x = args[0]
            B, Tq, _ = x.shape
            x = x.view(B, Tq, H, D)
            if gate is not None:
                g = gate[l] if gate.dim() == 2 else gate[:, l]
                x = x * (g[:, None] if g.dim() == 1 else g[:, None, :, None]).to(x.dtype)
            if shift is not None:
                s = shift[l] if shift.dim() == 3 else shift[:, l, None]
                x = x + s.to(x.dtype)
            return (x.reshape(B, Tq, H * D),) + tuple(args[1:])

        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(pre))
        act = getattr(layer.mlp, arch.act)
        if act_edit is not None or act_record is not None:
            def post(mod, args, out, l=l):
                if act_record is not None:
                    act_record(l, out)
                return act_edit(l, out) if act_edit is not None else out

            handles.append(act.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def steer_values(L, H, D, B=None, seed=5):
    g = torch.Generator().manual_seed(seed)
    shape = (L, H) if B is None else (B, L, H)
    gate = torch.rand(shape, generator=g) * 1.5 + 0.25
    shift = torch.randn(L, H, D, generator=g) * 0.3
    return gate, shift


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_logits_match_unpatched(arch, backend):
    model = tiny(arch)
    ids, mask = batch()
    orig = model.config._attn_implementation
    with torch.no_grad():
        ref_sdpa = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        ref_eager = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation(orig)
        xlkernels.patch(model)
        with xlkernels.backend(backend):
            out = model(input_ids=ids, attention_mask=mask).logits
            out_nomask = model(input_ids=ids[:1]).logits
    assert model.config._attn_implementation == "xlkernels"
    assert rel(out, ref_sdpa, mask) < 1e-5
    assert rel(out, ref_eager, mask) < 1e-5
    assert rel(out_nomask, ref_sdpa[:1]) < 1e-5


@pytest.mark.parametrize("arch,backend", [(a, "cpu") for a in ARCH_NAMES] + [("gemma2", "reference"),
                                                                           ("gemma3", "reference")])
def test_generate_identical(arch, backend):
    model = tiny(arch)
    ids, mask = batch(T=7)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
        xlkernels.patch(model)
        with xlkernels.backend(backend):
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert out.shape == ref.shape and out.shape[1] == 7 + 8
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------------------ steering
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_gates_and_shifts_match_hooks(arch, backend):
    model = tiny(arch)
    _, layers, H, D = parts(model)
    gate, shift = steer_values(len(layers), H, D)
    ids, mask = batch()
    with torch.no_grad(), hooks(model, gate, shift):
        ref = model(input_ids=ids, attention_mask=mask).logits
    st = xlkernels.patch(model)
    st.gate, st.shift = gate.clone(), shift.clone()
    with torch.no_grad(), xlkernels.backend(backend):
        out = model(input_ids=ids, attention_mask=mask).logits
    assert rel(out, ref, mask) < 1e-5
    st.reset()  # steering really changed the output
    with torch.no_grad(), xlkernels.backend(backend):
        base = model(input_ids=ids, attention_mask=mask).logits
    assert rel(out, base, mask) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_mask_one_head_matches_hooks(arch, backend):
    model = tiny(arch)
    _, layers, H, D = parts(model)
    gate = torch.ones(len(layers), H)
    gate[1, 2] = 0.0
    ids, mask = batch()
    with torch.no_grad(), hooks(model, gate=gate):
        ref = model(input_ids=ids, attention_mask=mask).logits
    st = xlkernels.patch(model)
    st.mask_heads([(1, 2)])
    with torch.no_grad(), xlkernels.backend(backend):
        out = model(input_ids=ids, attention_mask=mask).logits
    assert st.gate[1, 2] == 0 and st.gate.sum() == gate.sum()
    assert rel(out, ref, mask) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3", "phi3"])
def test_per_sample_gates_and_language_shifts(arch, backend):
    model = tiny(arch)
    _, layers, H, D = parts(model)
    L, B = len(layers), 3
    gate, _ = steer_values(L, H, D, B=B)
    bank = torch.randn(4, L, H, D) * 0.3
    lang = torch.tensor([2, 0, 3])
    ids, mask = batch(B)
    with torch.no_grad(), hooks(model, gate, 0.5 * bank[lang]):
        ref = model(input_ids=ids, attention_mask=mask).logits
    st = xlkernels.patch(model)
    st.gate = gate.clone()
    st.set_shift_bank(bank, alpha=0.5)
    st.select_languages(lang)
    with torch.no_grad(), xlkernels.backend(backend):
        out = model(input_ids=ids, attention_mask=mask).logits
    assert rel(out, ref, mask) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_gate_gradients_match_hooks(arch, backend):
    model = tiny(arch)
    _, layers, H, D = parts(model)
    gate0, shift0 = steer_values(len(layers), H, D)
    ids, mask = batch()
    w = torch.randn(model.config.vocab_size)

    def loss_of(logits):
        return ((logits * w).sum(-1) * mask).sum()

    g_ref = gate0.clone().requires_grad_(True)
    s_ref = shift0.clone().requires_grad_(True)
    with hooks(model, g_ref, s_ref):
        loss_of(model(input_ids=ids, attention_mask=mask).logits).backward()
    model.zero_grad()
    st = xlkernels.patch(model)
    g = gate0.clone().requires_grad_(True)
    s = shift0.clone().requires_grad_(True)
    st.gate, st.shift = g, s
    with xlkernels.backend(backend):
        loss_of(model(input_ids=ids, attention_mask=mask).logits).backward()
    assert g.grad is not None and s.grad is not None
    assert rel(g.grad, g_ref.grad) < 1e-4
    assert rel(s.grad, s_ref.grad) < 1e-4


# ------------------------------------------------------------------------------------------------ neurons
def _ref_stats(acts, group_ids, G):
    """acts: list per layer of (B,T,I) -> dict of (L,G,...) tensors."""
    out = {"tokens": [], "positive": [], "sum": []}
    for a in acts:
        a = a.double()
        tok, pos, sm = [], [], []
        for g in range(G):
            rows = a[group_ids == g]
            tok.append(rows.shape[0])
            pos.append((rows > 0).sum(0))
            sm.append(rows.sum(0))
        out["tokens"].append(torch.tensor(tok))
        out["positive"].append(torch.stack(pos))
        out["sum"].append(torch.stack(sm))
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_record_neurons_matches_hooks(arch, backend):
    model = tiny(arch)
    _, layers, _, _ = parts(model)
    ids, mask = batch()
    group_ids = torch.tensor([0, 1, 0])[:, None].expand_as(ids).clone()
    group_ids[mask == 0] = -1
    acts = [None] * len(layers)

    def rec(l, out):
        acts[l] = out.detach().clone()

    with torch.no_grad(), hooks(model, act_record=rec):
        model(input_ids=ids, attention_mask=mask)
    ref = _ref_stats(acts, group_ids, 2)
    st = xlkernels.patch(model)
    arch_row = parts(model)[0]
    gates = [None] * len(layers)  # this run's own gate projections: the same inputs, so counts are exact

    def grab(l):
        def hook(mod, args, out):
            gates[l] = (out.chunk(2, dim=-1)[0] if arch_row.gate_up else out).detach().clone()
        return hook
    handles = [getattr(layer.mlp, arch_row.gate_up or arch_row.gate).register_forward_hook(grab(l))
               for l, layer in enumerate(layers)]
    with torch.no_grad(), xlkernels.backend(backend), st.record_neurons(group_ids, 2) as stats:
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    with torch.no_grad():
        same = _ref_stats([getattr(layer.mlp, arch_row.act)(g) for layer, g in zip(layers, gates)], group_ids, 2)
    I = st.num_neurons
    assert stats.positive.shape == (len(layers), 2, I)
    assert torch.equal(stats.tokens, ref["tokens"])
    assert torch.equal(stats.tokens[0], torch.tensor([13 + 5, 9]))  # padding excluded
    assert torch.equal(stats.positive, same["positive"])
    assert rel(stats.sum, same["sum"]) < 1e-6
    assert rel(stats.sum, ref["sum"]) < 1e-5  # the independent, unpatched run
    # accumulate into given stats
    with torch.no_grad(), xlkernels.backend(backend), st.record_neurons(group_ids, 2, stats=stats) as again:
        model(input_ids=ids, attention_mask=mask)
    assert again is stats and torch.equal(stats.tokens, 2 * ref["tokens"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_deactivate_neurons_matches_hooks(arch, backend):
    model = tiny(arch)
    ids, mask = batch()
    idx = {0: torch.tensor([1, 5, 17, 40]), 1: torch.tensor([3, 64, 100])}

    def edit(l, out):
        out = out.clone()
        out[..., idx[l]] = 0
        return out

    with torch.no_grad(), hooks(model, act_edit=edit):
        ref = model(input_ids=ids, attention_mask=mask).logits
    st = xlkernels.patch(model)
    st.deactivate_neurons(idx)
    with torch.no_grad(), xlkernels.backend(backend):
        out = model(input_ids=ids, attention_mask=mask).logits
    assert rel(out, ref, mask) < 1e-5
    st.reset()
    with torch.no_grad(), xlkernels.backend(backend):
        base = model(input_ids=ids, attention_mask=mask).logits
    assert rel(out, base, mask) > 1e-4


# ------------------------------------------------------------------------------------------------ patching
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_unpatch_restores_exactly(arch):
    model = tiny(arch)
    ids, mask = batch()
    mlps = [layer.mlp for layer in parts(model)[1]]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        st = xlkernels.patch(model)
        st.mask_heads([0])
        assert all("forward" in m.__dict__ for m in mlps)
        xlkernels.unpatch(model)
        out = model(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == plain_attn(model)
    assert not any("forward" in m.__dict__ or "_xlk_steerer" in m.__dict__ for m in mlps)
    assert torch.equal(out, ref)
    xlkernels.unpatch(model)  # no-op


def test_patch_twice_returns_same_steerer():
    model = tiny("llama")
    st = xlkernels.patch(model)
    st.mask_heads([(0, 1)])
    assert xlkernels.patch(model) is st
    assert st.gate[0, 1] == 0
    ids, mask = batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)


def test_unsupported_architecture_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*'gpt2'.*ARCHS"):
        xlkernels.patch(model)
    assert "_xlk_steerer" not in model.__dict__


def test_every_table_arch_is_tested():
    assert set(ARCHS) - {"gemma"} == {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "cohere",
                                      "phi3", "olmo2"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_triton_interpreter_parity(arch):
    """The triton backend (interpreter on CPU): parity and steered output vs hooks on a short batch."""
    if xlkernels.backends.why_not("steered_attention", "triton", torch.device("cpu")):
        pytest.skip("triton backend unavailable on CPU")
    model = tiny(arch)
    _, layers, H, D = parts(model)
    gate, shift = steer_values(len(layers), H, D)
    ids, mask = batch(B=2, T=9)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with hooks(model, gate, shift):
            ref_steer = model(input_ids=ids, attention_mask=mask).logits
    st = xlkernels.patch(model)
    with torch.no_grad(), xlkernels.backend("triton"):
        out = model(input_ids=ids, attention_mask=mask).logits
        st.gate, st.shift = gate, shift
        out_steer = model(input_ids=ids, attention_mask=mask).logits
    assert rel(out, ref, mask) < 1e-4
    assert rel(out_steer, ref_steer, mask) < 1e-4
