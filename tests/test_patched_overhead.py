"""Work a patched model skips when there is nothing to do: no epilogue for identity gates and zero shifts (known
from the Steerer's version-counter flags, not from reading the tensors per forward), no mask for a sliding
window every key lies within, records into fresh stats in place, ops called below Python autograd."""
import pytest
import torch

import xlkernels
from xlkernels.ops import _direct, sdpa_steer
from xlkernels.reference import attention as ref
from test_hf_parity import batch, rel, steer_values, tiny


@pytest.fixture
def seen(monkeypatch):
    """Per steered_attention call: (gate is given, shift is given, masked_heads)."""
    calls = []
    real = xlkernels.steered_attention

    def spy(q, k, v, **kw):
        calls.append((kw["gate"] is not None, kw["shift"] is not None, kw["masked_heads"]))
        return real(q, k, v, **kw)
    monkeypatch.setattr(xlkernels, "steered_attention", spy)
    return calls


def test_identity_gates_and_zero_shifts_skip_the_epilogue(seen):
    model = tiny("llama")
    ids, mask = batch()
    st = xlkernels.patch(model)
    run = lambda: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    with torch.no_grad():
        run()
        assert seen == [(False, False, False)] * 2
        st.mask_heads([(0, 1)])                     # in place: seen through the version counter
        seen.clear(); run()
        assert seen == [(True, False, True), (False, False, False)]
        st.shift[1, 2] += 0.5
        seen.clear(); run()
        assert seen == [(True, False, True), (False, True, False)]
        st.scale_heads([(0, 1)], 2.0)               # 0 * 2: still masked
        st.gate[1] = 0.5
        seen.clear(); run()
        assert seen == [(True, False, True), (True, True, False)]
        with st.unsteered():
            seen.clear(); run()
            assert seen == [(False, False, False)] * 2
        seen.clear(); run()
        assert seen == [(True, False, True), (True, True, False)]
        st.gate, st.shift = steer_values(2, 4, 16)  # assigned: recomputed
        seen.clear(); run()
        assert seen == [(True, True, False)] * 2


def test_flags_are_not_recomputed_per_forward():
    model = tiny("gemma3")
    ids, mask = batch()
    st = xlkernels.patch(model)
    st.mask_heads([(1, 0)])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        flags = st._flags
        model(input_ids=ids, attention_mask=mask)
        assert st._flags is flags
        st.gate[0, 0] = 0.5
        model(input_ids=ids, attention_mask=mask)
        assert st._flags is not flags


def test_gate_that_needs_grad_is_never_dropped(seen):
    model = tiny("llama")
    ids, mask = batch()
    st = xlkernels.patch(model)
    model(input_ids=ids, attention_mask=mask)
    st.gate.requires_grad_(True)                   # no version bump: requires_grad is read per call
    st.shift.requires_grad_(True)
    seen.clear()
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert seen == [(True, True, False)] * 2
    assert st.gate.grad.abs().sum() > 0 and st.shift.grad.abs().sum() > 0


def test_identity_path_matches_plain_hf():
    model = tiny("gemma3")
    ids, mask = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        st = xlkernels.patch(model)
        st.mask_heads([(0, 0)])
        st.reset()
        got = model(input_ids=ids, attention_mask=mask).logits
    assert rel(got, want, mask) < 1e-5


def test_fresh_record_accumulates_in_place_like_given_stats():
    from xlkernels import NeuronStats
    model = tiny("qwen2")
    ids, mask = batch()
    st = xlkernels.patch(model)
    gids = torch.where(mask.bool(), torch.tensor([[0], [1], [0]]), -1)
    with torch.no_grad():
        with st.record_neurons(gids, 2) as fresh:
            model(input_ids=ids, attention_mask=mask)
            model(input_ids=ids, attention_mask=mask)
        given = NeuronStats.empty(2, st.num_neurons, layers=st.num_layers)
        with st.record_neurons(gids, 2, stats=given) as out:
            model(input_ids=ids, attention_mask=mask)
            model(input_ids=ids, attention_mask=mask)
    assert out is given
    for f in ("tokens", "positive", "sum", "sum_sq", "max"):
        assert torch.equal(getattr(fresh, f), getattr(given, f)), f
    assert int(fresh.tokens.sum()) == 2 * st.num_layers * int(mask.sum())


@pytest.mark.parametrize("T, S, window, built", [(7, 7, 8, False), (1, 8, 8, False), (7, 7, 4, True),
                                                 (1, 9, 8, True)])
def test_window_that_covers_every_key_builds_no_mask(monkeypatch, T, S, window, built):
    calls = []
    real = sdpa_steer._causal
    monkeypatch.setattr(sdpa_steer, "_causal", lambda *a: calls.append(a) or real(*a))
    sdpa_steer._masks.clear()
    q, k, v = torch.randn(2, 4, T, 16), torch.randn(2, 2, S, 16), torch.randn(2, 2, S, 16)
    out = sdpa_steer.attention(q, k, v, True, 0.25, None, window, None)
    want = ref.steered_attention(q.double(), k.double(), v.double(), causal=True, scale=0.25, sliding_window=window)
    assert (out.double() - want).abs().max() < 1e-5
    assert bool(calls) == built


def test_causal_masks_are_cached_per_shape(monkeypatch):
    calls = []
    real = sdpa_steer._causal
    monkeypatch.setattr(sdpa_steer, "_causal", lambda *a: calls.append(a) or real(*a))
    sdpa_steer._masks.clear()
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    kpm = torch.tensor([[False, True, True, True, True, True], [True] * 6])
    first = sdpa_steer.attention(q, k, v, True, 0.25, kpm, None, None)
    again = sdpa_steer.attention(q, k, v, True, 0.25, kpm, None, None)
    assert len(calls) == 1 and torch.equal(first, again)


def test_direct_call_keeps_gradients_when_needed():
    o = torch.randn(2, 3, 4, 8)
    gate, shift = torch.rand(4), torch.randn(4, 8)
    op = torch.ops.xlkernels.head_steer
    want = op(o, gate, shift)
    got = _direct.call(op, (o, gate, shift), (o, gate, shift))
    assert torch.equal(got, want) and got.grad_fn is None
    gate.requires_grad_(True)
    out = _direct.call(op, (o, gate, shift), (o, gate, shift))
    assert out.grad_fn is not None
    out.sum().backward()
    assert torch.allclose(gate.grad, o.sum((0, 1, 3)), rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        assert _direct.call(op, (o, gate, shift), (o, gate, shift)).grad_fn is None
