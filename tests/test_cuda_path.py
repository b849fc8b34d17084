"""The default CUDA path (no backend forced): steered attention as SDPA + the CUDA head_steer epilogue, through
autograd and through a patched HF model; glu and neuron_stats on their CUDA kernels. Needs a GPU."""
import pytest
import torch

import xlkernels
from xlkernels import backends
from test_hf_parity import ARCH_NAMES, batch, hooks, parts, rel, steer_values, tiny
from test_steered_attention import GRID, _id, check_case

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_memory")]


def test_cuda_is_the_default_backend():
    for op in ("steered_attention", "head_steer", "glu", "neuron_stats"):
        assert backends.select(op, "cuda") == "cuda", op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_cuda_attention_matches_reference(case, dtype):
    """Forward and all five gradients (random upstream gradient) against float64, FlashAttention's 2x rule."""
    B, H, Hkv, T, S, D, kw = case
    check_case(B, H, Hkv, T, S, D, dtype, be="cuda", device="cuda", **dict(kw))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_patched_model_on_cuda_default_path(arch):
    """Logits, gates/shifts against the hook reference, and gate gradients, on CUDA with the default backend."""
    model = tiny(arch).cuda()
    _, layers, H, D = parts(model)
    ids, mask = (t.cuda() for t in batch())
    gate, shift = (t.cuda() for t in steer_values(len(layers), H, D))
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with hooks(model, gate, shift):
            hooked = model(input_ids=ids, attention_mask=mask).logits
    st = xlkernels.patch(model)
    with torch.no_grad():
        assert rel(model(input_ids=ids, attention_mask=mask).logits, plain, mask) < 1e-5
    g = gate.clone().requires_grad_(True)
    st.gate, st.shift = g, shift.clone()
    out = model(input_ids=ids, attention_mask=mask).logits
    assert rel(out.detach(), hooked, mask) < 1e-5
    w = torch.randn_like(out) * mask[..., None]  # padded query rows see no key: 0 here, uniform in HF
    (out * w).sum().backward()
    xlkernels.unpatch(model)
    g_ref = gate.clone().requires_grad_(True)
    with hooks(model, g_ref, shift):
        (model(input_ids=ids, attention_mask=mask).logits * w).sum().backward()
    assert rel(g.grad, g_ref.grad) < 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_generate_on_cuda_default_path(arch):
    model = tiny(arch).cuda()
    ids, mask = (t.cuda() for t in batch(T=7))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
        xlkernels.patch(model)
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out, ref)
