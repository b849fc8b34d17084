"""Steerer API, contexts, masks, caches, dtypes and torch.compile of patched tiny models."""
import pytest
import torch

import xlkernels
from xlkernels import NeuronIntervention
from test_hf_parity import ARCH_NAMES, batch, hooks, parts, rel, steer_values, tiny


def test_attributes_and_defaults():
    model = tiny("gemma3")
    st = xlkernels.patch(model)
    L, H, D = st.num_layers, st.num_heads, st.head_dim
    assert (L, H, D, st.num_neurons) == (2, 4, 16, 128)
    assert st.model is model and st.config is model.config
    assert torch.equal(st.gate, torch.ones(L, H)) and torch.equal(st.shift, torch.zeros(L, H, D))


def test_mask_and_scale_heads_flat_ids():
    st = xlkernels.patch(tiny("llama"))
    st.mask_heads([5, (0, 1)])  # flat id 5 = layer 1, head 1
    st.scale_heads(torch.tensor([2]), 3.0)
    want = torch.ones(2, 4)
    want[1, 1] = want[0, 1] = 0
    want[0, 2] = 3
    assert torch.equal(st.gate, want)
    st.gate = torch.ones(3, 2, 4)
    st.mask_heads([(1, 3)], value=0.5)
    assert (st.gate[:, 1, 3] == 0.5).all()
    st.reset()
    assert st.gate.shape == (2, 4) and (st.gate == 1).all()


def test_bad_arguments_name_the_argument():
    st = xlkernels.patch(tiny("llama"))
    with pytest.raises(ValueError, match="gate"):
        st.gate = torch.ones(3, 4)
    with pytest.raises(ValueError, match="shift"):
        st.shift = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="heads"):
        st.mask_heads([(2, 0)])
    with pytest.raises(ValueError, match="heads"):
        st.mask_heads([8])
    with pytest.raises(ValueError, match="set_shift_bank"):
        st.select_languages(torch.tensor([0]))
    with pytest.raises(ValueError, match="bank"):
        st.set_shift_bank(torch.zeros(3, 2, 4, 15))
    st.set_shift_bank(torch.zeros(3, 2, 4, 16))
    with pytest.raises(ValueError, match="ids"):
        st.select_languages(torch.tensor([3]))
    with pytest.raises(ValueError, match="layer"):
        st.set_neuron_intervention(2, None)
    with pytest.raises(ValueError, match="neurons"):
        st.set_neuron_intervention(0, NeuronIntervention.zero([0], 7))
    with pytest.raises(ValueError, match="group_ids"):
        with st.record_neurons(torch.tensor([[0, 5]]), 2):
            pass
    ids, mask = batch()
    with pytest.raises(ValueError, match="group_ids"):
        with st.record_neurons(torch.zeros(3, 5, dtype=torch.long), 1), xlkernels.backend("reference"):
            st.model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_capture_heads_matches_hooks(arch):
    model = tiny(arch)
    _, layers, H, D = parts(model)
    gate, shift = steer_values(len(layers), H, D)
    ids, mask = batch()
    pos = torch.tensor([12, 7, 10])
    raw = {}

    def grab(l):
        def pre(mod, args):
            x = args[0]
            raw[l] = x.view(*x.shape[:2], H, D)[torch.arange(3), pos].clone()
        return pre

    hs = [layer.self_attn.o_proj.register_forward_pre_hook(grab(l)) for l, layer in enumerate(layers)]
    with torch.no_grad(), hooks(model, gate, shift):  # registered after: sees the pre-gate input
        model(input_ids=ids, attention_mask=mask)
    for h in hs:
        h.remove()
    ref = torch.stack([raw[l] for l in range(len(layers))])
    st = xlkernels.patch(model)
    st.gate, st.shift = gate, shift
    with torch.no_grad(), xlkernels.backend("reference"), st.capture_heads(pos) as cap:
        out = model(input_ids=ids, attention_mask=mask).logits
    assert cap.outputs.shape == (len(layers), 3, H, D)
    assert rel(cap.outputs, ref) < 1e-5
    with torch.no_grad(), xlkernels.backend("reference"):
        out2 = model(input_ids=ids, attention_mask=mask).logits
    assert rel(out, out2, mask) < 1e-6  # capturing does not change the output
    with torch.no_grad(), xlkernels.backend("reference"), st.capture_heads() as last:
        model(input_ids=ids, attention_mask=mask)
    assert rel(last.outputs[:, 0], ref[:, 0]) < 1e-5  # sample 0: last position is 12


def test_disabled_runs_plain_hf():
    model = tiny("gemma2")
    ids, mask = batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    st = xlkernels.patch(model)
    st.mask_heads([0, 1, 2])
    st.deactivate_neurons({0: torch.tensor([1, 2])})
    with torch.no_grad(), st.disabled():
        assert model.config._attn_implementation == "eager"
        plain = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, ref)
    assert model.config._attn_implementation == "xlkernels"
    with torch.no_grad(), xlkernels.backend("reference"):
        steered = model(input_ids=ids, attention_mask=mask).logits
    assert rel(steered, ref, mask) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_scale_and_per_group_interventions_match_hooks(arch):
    model = tiny(arch)
    ids, mask = batch()
    lang = torch.tensor([1, 0, 1])
    iv0 = NeuronIntervention.scale(torch.tensor([0, 3, 9]), 2.5, 128)
    iv1 = NeuronIntervention.set(torch.tensor([4, 7]), torch.tensor([[1.0, -2.0], [0.5, 3.0]]), 128)

    def edit(l, out):
        out = out.clone()
        if l == 0:
            out[..., [0, 3, 9]] *= 2.5
        else:
            vals = torch.tensor([[1.0, -2.0], [0.5, 3.0]])[lang]  # (B,2)
            out[..., [4, 7]] = vals[:, None, :].to(out.dtype)
        return out

    with torch.no_grad(), hooks(model, act_edit=edit):
        ref = model(input_ids=ids, attention_mask=mask).logits
    st = xlkernels.patch(model)
    st.set_neuron_intervention(0, iv0)
    st.set_neuron_intervention(1, iv1)
    st.set_shift_bank(torch.zeros(2, 2, 4, 16))
    st.select_languages(lang)
    with torch.no_grad(), xlkernels.backend("reference"):
        out = model(input_ids=ids, attention_mask=mask).logits
    assert rel(out, ref, mask) < 1e-5


def test_custom_4d_mask_is_applied():
    """A 4D mask handed to the model is used as given (math fallback), matching sdpa with the same mask."""
    model = tiny("llama")
    ids, _ = batch(B=2, T=9)
    m4 = torch.rand(2, 1, 9, 9) > 0.4
    m4 |= torch.eye(9, dtype=torch.bool)  # every row sees a key
    gate, shift = steer_values(2, 4, 16)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=m4).logits
        with hooks(model, gate, shift):
            ref_steer = model(input_ids=ids, attention_mask=m4).logits
        st = xlkernels.patch(model)
        with xlkernels.backend("reference"):
            out = model(input_ids=ids, attention_mask=m4).logits
            st.gate, st.shift = gate, shift
            out_steer = model(input_ids=ids, attention_mask=m4).logits
    assert rel(out, ref) < 1e-5
    assert rel(out_steer, ref_steer) < 1e-5


def test_packed_sequences_get_a_full_mask():
    """Packed rows (position_ids restart, no attention mask): the mask fn returns a 4D mask, honoured exactly."""
    model = tiny("qwen2")
    ids, _ = batch(B=1, T=12)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=pos).logits
        xlkernels.patch(model)
        with xlkernels.backend("reference"):
            out = model(input_ids=ids, position_ids=pos).logits
            plain = model(input_ids=ids).logits
    assert rel(out, ref) < 1e-5
    assert rel(plain, ref) > 1e-3


def test_static_cache_generation():
    model = tiny("llama")
    ids, mask = batch(T=7)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
        xlkernels.patch(model)
        with xlkernels.backend("reference"):
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
def test_steered_generation_matches_hooks(arch):
    model = tiny(arch)
    _, layers, H, D = parts(model)
    gate, shift = steer_values(len(layers), H, D)
    ids, mask = batch(T=6)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad(), hooks(model, gate, shift):
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    st = xlkernels.patch(model)
    st.gate, st.shift = gate, shift
    with torch.no_grad(), xlkernels.backend("reference"):
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_low_precision(arch, dtype, backend):
    """Patched bf16/fp16 logits are as close to the fp32 model as HF's own bf16/fp16 path is."""
    ids, mask = batch()
    with torch.no_grad():
        ref = tiny(arch)(input_ids=ids, attention_mask=mask).logits
        model = tiny(arch).to(dtype)
        hf = model(input_ids=ids, attention_mask=mask).logits.float()
        st = xlkernels.patch(model)
        st.mask_heads([1])
        st.reset()
        with xlkernels.backend(backend):
            out = model(input_ids=ids, attention_mask=mask).logits.float()
    assert rel(out, ref, mask) <= 2 * rel(hf, ref, mask) + 1e-3


def test_compile_no_graph_break_in_our_ops():
    """Our attention fn and MLP forward (steering and recording on) trace with fullgraph=True."""
    model = tiny("gemma2")
    st = xlkernels.patch(model)
    st.gate, st.shift = steer_values(2, 4, 16)
    st.deactivate_neurons({0: torch.tensor([2, 5])})
    layer = parts(model)[1][0]
    x = torch.randn(3, 13, 64)
    q, k, v = torch.randn(3, 4, 13, 16), torch.randn(3, 2, 13, 16), torch.randn(3, 2, 13, 16)
    mask = batch()[1].bool()
    from xlkernels.hf.attention import attention_fn

    with torch.no_grad(), xlkernels.backend("reference"):
        for fn, args, kw in [(layer.mlp.forward, (x,), {}),
                             (attention_fn, (layer.self_attn, q, k, v, mask),
                              dict(scaling=0.25, sliding_window=4, softcap=50.0))]:
            torch._dynamo.reset()
            got = torch.compile(fn, fullgraph=True, backend="eager")(*args, **kw)
            want = fn(*args, **kw)
            got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
            assert rel(got, want) < 1e-6
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_compiled_patched_model_matches(arch):
    """torch.compile of the whole patched, steered model (graph breaks allowed in HF code) matches eager."""
    model = tiny(arch)
    ids, mask = batch()
    st = xlkernels.patch(model)
    st.gate, st.shift = steer_values(2, 4, 16)
    torch._dynamo.reset()
    with torch.no_grad(), xlkernels.backend("reference"):
        want = model(input_ids=ids, attention_mask=mask).logits
        got = torch.compile(model, backend="aot_eager")(input_ids=ids, attention_mask=mask).logits
    torch._dynamo.reset()
    assert rel(got, want, mask) < 1e-5


def test_accelerate_hooked_mlps():
    """MLPs wrapped by accelerate's device hooks (device_map models): the hook stays, glu runs inside it."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    model = tiny("llama")
    ids, mask = batch()
    mlps = [layer.mlp for layer in parts(model)[1]]
    for m in mlps:
        add_hook_to_module(m, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    hooked_forward = [m.__dict__["forward"] for m in mlps]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        st = xlkernels.patch(model)
        assert all(m.__dict__["forward"] is f for m, f in zip(mlps, hooked_forward))
        idx = {0: torch.tensor([3, 9])}
        st.deactivate_neurons(idx)
        with xlkernels.backend("reference"):
            out = model(input_ids=ids, attention_mask=mask).logits
        st.reset()
        with xlkernels.backend("reference"):
            same = model(input_ids=ids, attention_mask=mask).logits
        xlkernels.unpatch(model)
        back = model(input_ids=ids, attention_mask=mask).logits
    assert rel(same, ref, mask) < 1e-5 and rel(out, ref, mask) > 1e-4
    assert torch.equal(back, ref)
    assert not any("_xlk_saved" in m.__dict__ for m in mlps)
    for m in mlps:
        remove_hook_from_module(m)


def test_mask_fn_gives_kernel_a_padding_mask_only():
    from transformers.masking_utils import (and_masks, causal_mask_function, or_masks,
                                            sliding_window_causal_mask_function)

    from xlkernels.hf.attention import _is_plain, mask_fn

    assert _is_plain(causal_mask_function) and _is_plain(sliding_window_causal_mask_function(4))
    assert not _is_plain(or_masks(causal_mask_function, lambda b, h, q, k: k == 0))
    assert not _is_plain(and_masks(causal_mask_function, lambda b, h, q, k: k >= 0))
    pad = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert mask_fn(2, 4, 4, attention_mask=pad).dtype == torch.bool
    assert mask_fn(2, 4, 4, attention_mask=torch.ones(2, 4, dtype=torch.bool)) is None
    pad2 = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask_fn(2, 1, 3, mask_function=sliding_window_causal_mask_function(3),
                               attention_mask=pad2), pad2[:, 1:])  # truncated cache: last kv_length slots
    full = mask_fn(2, 4, 4, mask_function=or_masks(causal_mask_function, lambda b, h, q, k: k == 0),
                   attention_mask=pad.bool())
    assert full.shape == (2, 1, 4, 4)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_no_full_mask_on_the_plain_path(arch, monkeypatch):
    """Padded prefill and decode on sliding/full layers never build or use a 4D mask."""
    import xlkernels.hf.attention as A

    def boom(*a, **k):
        raise AssertionError("4D mask path used")

    monkeypatch.setattr(A, "_math_attention", boom)
    monkeypatch.setattr(A, "sdpa_mask", boom)
    model = tiny(arch)
    ids, mask = batch(T=7)
    xlkernels.patch(model)
    with torch.no_grad(), xlkernels.backend("reference"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)


def test_hf_attention_kwargs_reach_the_kernel(monkeypatch):
    """scaling, sliding_window and softcap arrive under the names attention_fn reads. A rename in transformers
    would silently fall back to defaults (head_dim**-0.5, no window, no softcap): catch it here."""
    import xlkernels.hf.attention as A
    from xlkernels.models import tiny_model

    seen = []
    real = xlkernels.steered_attention

    def spy(q, k, v, **kw):
        seen.append({n: kw[n] for n in ("scale", "sliding_window", "softcap", "causal")})
        return real(q, k, v, **kw)
    monkeypatch.setattr(xlkernels, "steered_attention", spy)
    model, _ = tiny_model("gemma2", query_pre_attn_scalar=24)  # scaling 24**-0.5, not head_dim**-0.5
    ids, mask = batch(T=7)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        xlkernels.patch(model)
        with xlkernels.backend("reference"):
            out = model(input_ids=ids, attention_mask=mask).logits
    assert [s["sliding_window"] for s in seen] == [4, None]  # gemma2: sliding, then full layer
    assert all(s["scale"] == 24 ** -0.5 and s["softcap"] == 50.0 and s["causal"] for s in seen)
    assert rel(out, ref, mask) < 1e-5


def test_unsupported_activation_error():
    from xlkernels.models import tiny_model

    model, _ = tiny_model("llama", hidden_act="relu")
    with pytest.raises(ValueError, match="activation ReLU"):
        xlkernels.patch(model)


def test_attn_implementation_by_name_without_patch():
    """Importing xlkernels.hf registers "xlkernels"; a model switched by name runs the kernel, unsteered."""
    import xlkernels.hf  # noqa: F401

    model = tiny("qwen2")
    ids, mask = batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("xlkernels")
        with xlkernels.backend("reference"):
            out = model(input_ids=ids, attention_mask=mask).logits
    assert rel(out, ref, mask) < 1e-5


def test_capture_positions_checked():
    model = tiny("llama")
    st = xlkernels.patch(model)
    ids, mask = batch()
    for bad in (torch.tensor([0, 13, 1]), torch.tensor([0, 1])):
        with pytest.raises(ValueError, match="positions"):
            with torch.no_grad(), xlkernels.backend("reference"), st.capture_heads(bad):
                model(input_ids=ids, attention_mask=mask)


def test_gate_grad_after_a_no_grad_forward():
    """A no-grad forward first (cached per-layer views) must not cut the gradient path of a later gate."""
    model = tiny("llama")
    st = xlkernels.patch(model)
    ids, mask = batch()
    with xlkernels.backend("reference"):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        st.gate = torch.ones(2, 4, requires_grad=True)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
        g1 = st.gate.grad.clone()
        st.gate.grad = None
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert g1.abs().sum() > 0 and torch.equal(st.gate.grad, g1)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_capture_heads_all_mean_matches_hooks(arch):
    """positions="all": per layer the mean over the selected tokens of the raw (pre gate/shift) head outputs,
    with earlier layers steered; bool and int masks, and mask None = every token."""
    model = tiny(arch)
    _, layers, H, D = parts(model)
    gate, shift = steer_values(len(layers), H, D)
    ids, mask = batch()
    g = torch.Generator().manual_seed(3)
    sel = mask.bool() & (torch.rand(mask.shape, generator=g) < 0.6)
    sel[:, -1] = True
    raw = {}

    def grab(l):
        def pre(mod, args):
            x = args[0]
            raw[l] = x.view(*x.shape[:2], H, D).double().clone()
        return pre

    hs = [layer.self_attn.o_proj.register_forward_pre_hook(grab(l)) for l, layer in enumerate(layers)]
    with torch.no_grad(), hooks(model, gate, shift):  # registered after: sees the pre-gate input
        model(input_ids=ids, attention_mask=mask)
    for h in hs:
        h.remove()
    x = torch.stack([raw[l] for l in range(len(layers))])          # (L,B,T,H,D)
    w = sel.double()[None, :, :, None, None]
    ref = (x * w).sum(2) / w.sum(2)
    st = xlkernels.patch(model)
    st.gate, st.shift = gate, shift
    for m in (sel, sel.int()):
        with torch.no_grad(), xlkernels.backend("reference"), st.capture_heads("all", m) as cap:
            model(input_ids=ids, attention_mask=mask)
        out = cap.outputs
        assert out.shape == (len(layers), 3, H, D) and out.dtype == torch.float32
        assert rel(out, ref) < 1e-5
    with torch.no_grad(), xlkernels.backend("reference"), st.capture_heads("all") as every:
        model(input_ids=ids, attention_mask=mask)
    assert rel(every.outputs, x.mean(2)) < 1e-5
    with pytest.raises(ValueError, match="mask"):
        with torch.no_grad(), xlkernels.backend("reference"), st.capture_heads("all", sel[:, 1:]):
            model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="positions"):
        st.capture_heads("first").__enter__()
    with pytest.raises(ValueError, match="mask"):
        st.capture_heads(None, sel).__enter__()
    with pytest.raises(TypeError, match="mask"):
        st.capture_heads("all", sel.float()).__enter__()


def test_unsteered_restores_state():
    model = tiny("llama")
    _, layers, H, D = parts(model)
    st = xlkernels.patch(model)
    gate, shift = steer_values(len(layers), H, D)
    st.gate, st.shift = gate, shift
    st.deactivate_neurons({0: torch.tensor([1, 2])})
    ids, mask = batch()
    with torch.no_grad(), xlkernels.backend("reference"):
        steered = model(input_ids=ids, attention_mask=mask).logits
        with st.unsteered(), st.capture_heads("all", mask) as cap:
            plain = model(input_ids=ids, attention_mask=mask).logits
        again = model(input_ids=ids, attention_mask=mask).logits
        with st.disabled():
            hf = model(input_ids=ids, attention_mask=mask).logits
    assert rel(plain, hf, mask) < 1e-5 and rel(steered, hf, mask) > 1e-3
    assert torch.equal(again, steered) and st.gate is gate and st.shift is shift
    assert cap.outputs.shape == (len(layers), 3, H, D)
