"""glu: forward, fused stats, interventions and backward of every backend against the float64 reference."""
import math

import pytest
import torch

import xlkernels
import xlkernels.ops.glu  # noqa: F401 (registers the op's backends)
from xlkernels import NeuronIntervention, NeuronStats, backends
from xlkernels.reference import glu as rg
from xlkernels.reference import neuron_stats as rn
from xlkernels.triton import grids
from xlkernels.triton import neuron_stats as tns

pytestmark = pytest.mark.usefixtures("poison_memory")  # C++ outputs start as NaN

# The kernels under test (the reference backend is the ground truth itself; conftest fails the run without _C).
HERE = ["cpu"] + [b for b in ("triton",) if backends.why_not("glu", b, torch.device("cpu")) is None]
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
G = 4


@pytest.fixture(autouse=True)
def _poison_triton(monkeypatch):
    monkeypatch.setattr(grids, "POISON", True)  # Triton outputs start as NaN


def make_iv(kind, nn, device="cpu"):
    k = max(1, nn // 3)
    idx = torch.randperm(nn)[:k]
    if kind == "none":
        return None
    if kind == "zero":
        return NeuronIntervention.zero(idx, nn, device=device)
    if kind == "set":  # per group
        return NeuronIntervention.set(idx, torch.randn(G, k), nn, device=device)
    if kind == "scale":
        return NeuronIntervention.scale(idx, torch.rand(k) * 3, nn, device=device)
    if kind == "dense":  # arbitrary per-group affine
        return NeuronIntervention(torch.randn(G, nn, device=device), torch.randn(G, nn, device=device))
    raise ValueError(kind)


def iv_args(iv):
    return (None, None) if iv is None else (iv.mul, iv.add)


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def check_close(got, want64, same_dtype_torch, dtype):
    """FlashAttention-style: error <= 2x that of same-dtype PyTorch math (both vs float64), with a floor."""
    assert not got.isnan().any()
    bound = max(2 * rel_err(same_dtype_torch, want64), FLOOR[dtype])
    assert rel_err(got, want64) <= bound, (rel_err(got, want64), bound)


def inputs(shape, dtype):
    gate = (torch.randn(shape) * 2).to(dtype)
    up = torch.randn(shape).to(dtype)
    ids = torch.randint(-1, G, shape[:-1])
    return gate, up, ids


def runs(shape, length=37):
    """Group ids in runs of `length` rows (some runs -1), so whole 16-row tiles share one id."""
    n = math.prod(shape)
    return torch.randint(-1, G, (n // length + 1,)).repeat_interleave(length)[:n].reshape(shape)


def torch_same_dtype(gate, up, act, ids, iv):
    """Plain PyTorch math in the input dtype."""
    a = torch.nn.functional.silu(gate) if act == "silu" else torch.nn.functional.gelu(gate, approximate="tanh")
    return rg.intervene(a, ids, *iv_args(iv)) * up


@pytest.mark.parametrize("backend", HERE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("kind", ["none", "zero", "set", "scale"])
def test_forward_with_stats(backend, dtype, act, kind):
    gate, up, ids = inputs((3, 11, 77), dtype)
    iv = make_iv(kind, 77)
    stats = NeuronStats.empty(G, 77)
    stats.max.normal_()  # prior content
    prior = stats.clone()
    with xlkernels.backend(backend):
        out = xlkernels.glu(gate, up, act, stats=stats, group_ids=ids, intervention=iv)
    want, a64 = rg.glu(gate.double(), up.double(), act, ids, *iv_args(iv))
    assert out.dtype == dtype and out.shape == gate.shape
    check_close(out, want, torch_same_dtype(gate, up, act, ids, iv), dtype)
    ws = prior.clone()
    rn.accumulate(a64.reshape(-1, 77), ids.reshape(-1), ws.tokens, ws.positive, ws.sum, ws.sum_sq, ws.max)
    assert torch.equal(stats.tokens, ws.tokens)
    assert torch.equal(stats.positive, ws.positive)  # act > 0 iff gate > 0 for both activations
    for f in ("sum", "sum_sq", "max"):
        a, b = getattr(stats, f).double(), getattr(ws, f).double()
        assert float(((a - b).abs() / (1 + b.abs())).max()) < 2e-6, f


@pytest.mark.parametrize("backend", HERE)
@pytest.mark.parametrize("nn", [1, 13, 4099])
def test_sizes_and_no_ids(backend, nn):
    n = 9 if nn > 1000 else 40
    gate, up, _ = inputs((n, nn), torch.float32)
    iv = NeuronIntervention.zero(torch.arange(0, nn, 3), nn)
    with xlkernels.backend(backend):
        out = xlkernels.glu(gate, up)
        out2 = xlkernels.glu(gate, up, "gelu_tanh", intervention=iv)
    check_close(out, rg.glu(gate.double(), up.double())[0], torch_same_dtype(gate, up, "silu", None, None),
                torch.float32)
    want2 = rg.glu(gate.double(), up.double(), "gelu_tanh", None, iv.mul, iv.add)[0]
    assert torch.equal(out2[:, ::3], torch.zeros_like(out2[:, ::3]))
    assert rel_err(out2, want2) < 1e-6 if nn > 1 else not out2.any()


@pytest.mark.parametrize("backend", HERE)
def test_per_group_intervention_leaves_padding_rows(backend):
    gate, up, _ = inputs((20, 31), torch.float32)
    ids = torch.tensor([-1, 0, 1, 2, 3] * 4)
    iv = make_iv("dense", 31)
    with xlkernels.backend(backend):
        out = xlkernels.glu(gate, up, group_ids=ids, intervention=iv)
        plain = xlkernels.glu(gate, up)
    pad = ids < 0
    assert torch.equal(out[pad], plain[pad])
    keep = ids[~pad]
    want = (rg.act_fn(gate[~pad].double(), "silu") * iv.mul[keep] + iv.add[keep]) * up[~pad].double()
    assert rel_err(out[~pad], want) < 1e-6
    per_neuron = NeuronIntervention.scale([0, 5], 2.0, 31)  # (I,) applies to padding rows too
    with xlkernels.backend(backend):
        out = xlkernels.glu(gate, up, group_ids=ids, intervention=per_neuron)
    assert rel_err(out[pad][:, 5], 2 * plain[pad][:, 5]) < 1e-6


@pytest.mark.parametrize("backend", HERE)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("kind", ["none", "zero", "set", "scale", "dense"])
@pytest.mark.parametrize("with_stats", [False, True])
def test_backward(backend, act, kind, with_stats):
    gate, up, ids = inputs((2, 9, 37), torch.float32)
    iv = make_iv(kind, 37)
    g1, u1 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    stats = NeuronStats.empty(G, 37) if with_stats else None
    need_ids = with_stats or kind in ("set", "dense")
    with xlkernels.backend(backend):
        out = xlkernels.glu(g1, u1, act, stats=stats, group_ids=ids if need_ids else None, intervention=iv)
    go = torch.randn_like(out)
    out.backward(go)
    g2, u2 = gate.double().requires_grad_(), up.double().requires_grad_()
    want, _ = rg.glu(g2, u2, act, ids, *iv_args(iv))
    want.backward(go.double())
    assert rel_err(g1.grad, g2.grad) < 2e-6 and rel_err(u1.grad, u2.grad) < 2e-6
    if kind in ("zero", "set"):  # intervened neurons pass no gradient to gate
        touched = (iv.mul == 0).reshape(-1, 37).all(0)
        rows = ids >= 0 if iv.num_groups else torch.ones_like(ids, dtype=torch.bool)  # per-group: -1 rows untouched
        assert touched.any() and torch.equal(g1.grad[rows][:, touched], torch.zeros_like(g1.grad[rows][:, touched]))
    if with_stats:
        assert int(stats.tokens.sum()) == int((ids >= 0).sum())  # recorded once


@pytest.mark.parametrize("backend", HERE)
def test_half_backward(backend):
    for dtype in (torch.float16, torch.bfloat16):
        gate, up, ids = inputs((17, 45), dtype)
        iv = make_iv("scale", 45)
        g1, u1 = gate.clone().requires_grad_(), up.clone().requires_grad_()
        with xlkernels.backend(backend):
            out = xlkernels.glu(g1, u1, "gelu_tanh", intervention=iv)
        go = torch.randn_like(out)
        out.backward(go)
        g2, u2 = gate.double().requires_grad_(), up.double().requires_grad_()
        rg.glu(g2, u2, "gelu_tanh", None, *iv_args(iv))[0].backward(go.double())
        g3, u3 = gate.clone().requires_grad_(), up.clone().requires_grad_()
        torch_same_dtype(g3, u3, "gelu_tanh", None, iv).backward(go)
        check_close(g1.grad, g2.grad, g3.grad, dtype)
        check_close(u1.grad, u2.grad, u3.grad, dtype)


@pytest.mark.parametrize("backend", HERE + ["reference"])
def test_nan_policy(backend):
    """A NaN gate gives a NaN output element and follows the NeuronStats NaN policy for its (group, neuron)."""
    gate, up, _ = inputs((10, 6), torch.float32)
    ids = torch.tensor([0, 0, 1, 1, -1, 0, 1, 0, 1, 1])
    gate[1, 2] = float("nan")
    stats = NeuronStats.empty(2, 6)
    with xlkernels.backend(backend):
        out = xlkernels.glu(gate, up, "gelu_tanh", stats=stats, group_ids=ids)
    assert out[1, 2].isnan() and int(out.isnan().sum()) == 1
    assert stats.sum[0, 2].isnan() and stats.max[0, 2].isnan() and int(stats.max.isnan().sum()) == 1
    assert stats.tokens.tolist() == [4, 5]
    assert int(stats.positive[0, 2]) == int((gate[ids == 0, 2].nan_to_num(-1) > 0).sum())


@pytest.mark.parametrize("backend", HERE)
def test_non_contiguous(backend):
    gu = torch.randn(30, 2, 23)
    gate, up = gu[:, 0], gu[:, 1]  # strided views of a fused gate_up projection
    assert not gate.is_contiguous()
    with xlkernels.backend(backend):
        out = xlkernels.glu(gate, up)
    assert rel_err(out, rg.glu(gate.double(), up.double())[0]) < 1e-6


def _ops():
    ops = []
    if "cpu" in HERE:
        ops.append(("glu_fwd", "glu_fwd_stats", "glu_bwd"))
    if "triton" in HERE:
        ops.append(("glu_fwd_triton", "glu_fwd_stats_triton", "glu_bwd_triton"))
    return ops


@pytest.mark.parametrize("names", _ops(), ids=lambda n: n[0])
@pytest.mark.parametrize("kind", ["none", "dense"])
def test_opcheck(names, kind):
    gate, up, ids = inputs((19, 21), torch.float32)
    iv = make_iv(kind, 21)
    mul, add = iv_args(iv)
    s = NeuronStats.empty(G, 21)
    ops = [getattr(torch.ops.xlkernels, n) for n in names]
    gate.requires_grad_()
    up.requires_grad_()
    torch.library.opcheck(ops[0], (gate, up, "silu", ids, mul, add))
    torch.library.opcheck(ops[1], (gate.detach(), up.detach(), "gelu_tanh", ids, mul, add, s.tokens, s.positive,
                                   s.sum, s.sum_sq, s.max))
    torch.library.opcheck(ops[2], (torch.randn(19, 21), gate.detach(), up.detach(), "silu", ids, mul, add))


@pytest.mark.skipif("cpu" not in HERE, reason="extension not built")
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    stats = NeuronStats.empty(G, 24)
    iv = make_iv("set", 24)

    def f(g, u, ids):
        return xlkernels.glu(g, u, "silu", stats=stats, group_ids=ids, intervention=iv) * 2 + 1

    gate, up, ids = inputs((2, 5, 24), torch.float32)
    with xlkernels.backend("cpu"):
        out = torch.compile(f, fullgraph=True, backend=compiler)(gate, up, ids)
    once = stats.clone()
    want = rg.glu(gate.double(), up.double(), "silu", ids, iv.mul, iv.add)[0] * 2 + 1
    assert rel_err(out, want) < 1e-6
    assert int(once.tokens.sum()) == int((ids >= 0).sum())
    ws = NeuronStats.empty(G, 24)
    with xlkernels.backend("reference"):
        xlkernels.glu(gate, up, "silu", stats=ws, group_ids=ids)
    assert torch.equal(once.positive, ws.positive) and torch.equal(once.tokens, ws.tokens)


def test_bad_inputs():
    gate, up, ids = inputs((6, 10), torch.float32)
    s = NeuronStats.empty(G, 10)
    glu = xlkernels.glu
    cases = [
        (lambda: glu(gate.long(), up), TypeError, "gate"),
        (lambda: glu(gate, up.half()), TypeError, "up"),
        (lambda: glu(gate, up[:, :9]), ValueError, "up"),
        (lambda: glu(gate, up.to("meta")), ValueError, "up"),
        (lambda: glu(gate, up, "relu"), ValueError, "activation"),
        (lambda: glu(gate, up, stats=s), ValueError, "group_ids"),
        (lambda: glu(gate, up, stats=s, group_ids=ids[:5]), ValueError, "group_ids"),
        (lambda: glu(gate, up, stats=s, group_ids=ids.float()), TypeError, "group_ids"),
        (lambda: glu(gate, up, stats=s, group_ids=ids + G), ValueError, "group_ids"),
        (lambda: glu(gate, up, stats=NeuronStats.empty(G, 11), group_ids=ids), ValueError, "stats"),
        (lambda: glu(gate, up, stats="x", group_ids=ids), TypeError, "stats"),
        (lambda: glu(gate, up, intervention=make_iv("zero", 11)), ValueError, "intervention"),
        (lambda: glu(gate, up, intervention=(torch.ones(10), torch.zeros(10))), TypeError, "intervention"),
        (lambda: glu(gate, up, intervention=make_iv("set", 10)), ValueError, "group_ids"),
        (lambda: glu(gate, up, stats=NeuronStats.empty(G + 1, 10), group_ids=ids, intervention=make_iv("set", 10)),
         ValueError, "intervention"),
        (lambda: glu(gate, up, group_ids=ids - 2, intervention=make_iv("set", 10)), ValueError, "group_ids"),
    ]
    for fn, exc, name in cases:
        with pytest.raises(exc, match=name):
            fn()


PTX_CHECK = """
import inspect

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from xlkernels.triton import glu as tg
from xlkernels.triton import neuron_stats as tns


def compile_ptx(fn, sig, consts):
    names = list(inspect.signature(fn.fn).parameters)
    src = ASTSource(fn, signature={**sig, **{k: "constexpr" for k in consts}},
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


def main():
    dt = "*bf16"
    stats = dict(pos_ptr="*i64", sum_ptr="*fp64", sq_ptr="*fp64", mx_i32="*i32", N="i32", I="i32", ROWS="i32")
    ptx = compile_ptx(tns._stats_kernel, dict(act=dt, ids="*i64", **stats), dict(BLOCK_R=16, BLOCK_I=128))
    assert "atom.global" in ptx
    compile_ptx(tg._fwd_kernel, dict(gate=dt, up=dt, out=dt, ids="*i64", mul_ptr="*fp32", add_ptr="*fp32", **stats),
                dict(ACT=1, MODE=2, STATS=True, HAS_IDS=True, BLOCK_R=16, BLOCK_I=128))
    compile_ptx(tg._bwd_kernel, dict(go=dt, gate=dt, up=dt, dgate=dt, dup=dt, ids="*i64", mul_ptr="*fp32",
                                     add_ptr="*fp32", N="i32", I="i32"), dict(ACT=0, MODE=2, BLOCK_R=16, BLOCK_I=128))
    print("ptx ok")


main()
"""


@pytest.mark.skipif("triton" not in HERE, reason="triton unavailable")
def test_triton_kernels_compile_for_sm90():
    """The interpreter accepts code that compiled Triton rejects: compile the stats, fused glu and backward
    kernels to PTX for sm_90 (no GPU needed)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-c", PTX_CHECK], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "ptx ok" in r.stdout, r.stdout + r.stderr


# ---- GPU (skipped without one) --------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("kind", ["none", "zero", "set", "scale", "dense"])
@pytest.mark.parametrize("nn", [13, 4099])
def test_gpu(backend, dtype, act, kind, nn):
    gate, up, ids = inputs((3, 333, nn), dtype)
    ids[1:] = runs((2, 333))  # batch 0 interleaved ids (mixed tiles), the rest in runs (uniform tiles)
    poison = torch.full((3, 333, nn), float("nan"), device="cuda")  # freed blocks get reused by the allocator
    del poison
    check_fused(backend, gate, up, ids, act, make_iv(kind, nn), "cuda")


def check_fused(backend, gate, up, ids, act, iv, device):
    """glu with stats and an intervention on `device`, backward with a random upstream gradient, against float64:
    output and grads by the 2x rule, tokens and positive exactly, sum, sum_sq and max to fp32 rounding."""
    nn, dtype = gate.shape[-1], gate.dtype
    stats = NeuronStats.empty(G, nn)
    stats.max.normal_()  # prior content
    want_stats = stats.clone()
    stats = stats.to(device)
    gc, uc = (x.to(device, copy=True).requires_grad_() for x in (gate, up))
    with xlkernels.backend(backend):
        out = xlkernels.glu(gc, uc, act, stats=stats, group_ids=ids.to(device),
                            intervention=None if iv is None else iv.to(device))
    go = torch.randn_like(out)
    out.backward(go)
    g2, u2 = gate.double().requires_grad_(), up.double().requires_grad_()
    want, a64 = rg.glu(g2, u2, act, ids, *iv_args(iv))
    want.backward(go.double().cpu())
    check_close(out.cpu(), want, torch_same_dtype(gate, up, act, ids, iv), dtype)
    g3, u3 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    torch_same_dtype(g3, u3, act, ids, iv).backward(go.cpu())
    check_close(gc.grad.cpu(), g2.grad, g3.grad, dtype)
    check_close(uc.grad.cpu(), u2.grad, u3.grad, dtype)
    ws = want_stats
    rn.accumulate(a64.detach().reshape(-1, nn), ids.reshape(-1), ws.tokens, ws.positive, ws.sum, ws.sum_sq, ws.max)
    st = stats.to("cpu")
    assert torch.equal(st.tokens, ws.tokens) and torch.equal(st.positive, ws.positive)
    for f in ("sum", "sum_sq", "max"):
        a, b = getattr(st, f).double(), getattr(ws, f).double()
        assert float(((a - b).abs() / (1 + b.abs())).max()) < 2e-6, f


@pytest.mark.skipif("triton" not in HERE or torch.cuda.is_available(), reason="runs the Triton interpreter")
@pytest.mark.parametrize("kind", ["none", "dense"])
def test_triton_gpu_shapes(kind, monkeypatch):
    """The GPU launch shapes in the interpreter: 16x128 tiles, row chunks for a 4-SM GPU (several programs add
    into each (group, neuron) with atomics) and the backward's row blocks folded over grid axes 1 and 2."""
    monkeypatch.setattr(grids, "GPU", {"sms": 4})
    monkeypatch.setattr(grids, "AXIS_MAX", 4)
    assert tns.grid_shape(200, 300, *tns.blocks(300), 4) == (3, 5, 48)  # 3 x 5 programs, 48 rows each
    gate, up, ids = inputs((4, 50, 300), torch.float32)
    ids[2:] = runs((2, 50), 23)  # batch 0-1 interleaved, 2-3 in runs across chunk boundaries
    ids[3, :5] = -1  # left padding before a run: a 16-row tile of padding + one id stays on the uniform path
    check_fused("triton", gate, up, ids, "silu", make_iv(kind, 300), "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("names", [("glu_fwd", "glu_fwd_stats", "glu_bwd"),
                                   ("glu_fwd_triton", "glu_fwd_stats_triton", "glu_bwd_triton")], ids=lambda n: n[0])
def test_gpu_opcheck(names):
    gate, up, ids = (t.cuda() for t in inputs((300, 130), torch.bfloat16))
    iv = make_iv("dense", 130, "cuda")
    s = NeuronStats.empty(G, 130, device="cuda")
    ops = [getattr(torch.ops.xlkernels, n) for n in names]
    torch.library.opcheck(ops[0], (gate.requires_grad_(), up.requires_grad_(), "silu", ids, iv.mul, iv.add))
    torch.library.opcheck(ops[1], (gate.detach(), up.detach(), "gelu_tanh", ids, iv.mul, iv.add, s.tokens,
                                   s.positive, s.sum, s.sum_sq, s.max))
    torch.library.opcheck(ops[2], (torch.randn_like(gate), gate.detach(), up.detach(), "silu", ids, iv.mul, iv.add))


@pytest.mark.parametrize("backend", HERE)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_infinite_gates_match_reference(backend, act):
    """act(-inf) = -inf * 0 = NaN and act(+inf) = +inf in every backend, as in the float64 reference."""
    gate, up, _ = inputs((3, 37), torch.float32)
    gate[0, 1], gate[1, 5], gate[2, 36], gate[2, 0] = float("-inf"), float("inf"), float("-inf"), -120.0
    ids = torch.tensor([0, 1, 0])
    stats = NeuronStats.empty(2, 37)
    with xlkernels.backend(backend):
        out = xlkernels.glu(gate, up, act, stats=stats, group_ids=ids)
    want, a = rg.glu(gate.double(), up.double(), act)
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
    fin = want.isfinite()
    assert torch.allclose(out[fin].double(), want[fin], rtol=1e-5, atol=1e-6)
    ref = {k: v for k, v in rn.neuron_stats(a, ids, 2).items()}
    assert torch.equal(stats.max.isnan(), ref["max"].isnan()) and torch.equal(stats.sum.isnan(), ref["sum"].isnan())
