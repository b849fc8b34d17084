"""head_steer: out = gate[b,h] * o[b,t,h,:] + shift[b,h,:] vs the float64 reference (cpu here, cuda on a GPU)."""
import pytest
import torch

import xlkernels
from xlkernels import backends
from xlkernels.ops import head_steer as hs
from xlkernels.reference.head_steer import head_steer as ref
from xlkernels.triton import grids
from xlkernels.triton import head_steer as ths

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max |err| / max |ref| vs float64: output rounding to the dtype (half an ulp) plus fp32 math
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(1, 1, 3, 80), (2, 17, 3, 80), (3, 5, 2, 7), (2, 33, 4, 64)]
GATES = [None, "h", "bh"]
SHIFTS = [None, "hd", "bhd"]

needs_compiled = pytest.mark.skipif(not hs.HAS_COMPILED, reason="xlkernels._C lacks head_steer (rebuild)")


pytestmark = pytest.mark.usefixtures("poison_memory")


@pytest.fixture(autouse=True)
def _poison_triton(monkeypatch):
    monkeypatch.setattr(grids, "POISON", True)  # Triton outputs start as NaN


def make(shape, gate_kind, shift_kind, dtype=torch.float32, device="cpu", transposed=False, param_dtype=None):
    B, T, H, D = shape
    if transposed:  # (B,T,H,D) view of (B,H,T,D) memory, as attention produces it
        o = torch.randn(B, H, T, D, device=device).to(dtype).transpose(1, 2)
    else:
        o = torch.randn(B, T, H, D, device=device).to(dtype)
    pd = param_dtype or torch.float32
    gate = {None: None, "h": lambda: torch.randn(H), "bh": lambda: torch.randn(B, H)}[gate_kind]
    shift = {None: None, "hd": lambda: torch.randn(H, D), "bhd": lambda: torch.randn(B, H, D)}[shift_kind]
    gate = gate().to(device, pd) if gate else None
    shift = shift().to(device, pd) if shift else None
    return o, gate, shift


def rel_err(x, ref64):
    x = x.double()
    assert not x.isnan().any(), "NaN in result"
    return ((x - ref64).abs().max() / ref64.abs().max().clamp_min(1e-30)).item()


def ref64(o, gate, shift):
    return ref(o.double(), None if gate is None else gate.double(), None if shift is None else shift.double())


def test_poison_fixture_is_active():
    assert torch.empty(4).isnan().all()


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gate_kind", GATES)
@pytest.mark.parametrize("shift_kind", SHIFTS)
def test_forward_cpu(dtype, shape, gate_kind, shift_kind):
    o, gate, shift = make(shape, gate_kind, shift_kind, dtype, transposed=shape[1] % 2 == 1)
    with xlkernels.backend("cpu"):
        out = xlkernels.head_steer(o, gate, shift)
    assert out.shape == o.shape and out.dtype == dtype and out.is_contiguous()
    assert rel_err(out, ref64(o, gate, shift)) <= TOL[dtype]


@needs_compiled
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float64])
def test_param_dtypes_may_differ_from_o(param_dtype):
    o, gate, shift = make((2, 9, 3, 16), "bh", "hd", torch.float32, param_dtype=param_dtype)
    with xlkernels.backend("cpu"):
        out = xlkernels.head_steer(o, gate, shift)
    # float64 parameters are read as float32
    assert rel_err(out, ref64(o, gate.float(), shift.float())) <= TOL[torch.float32]
    got = _grads("cpu", o, gate, shift, torch.randn(o.shape), (True, True, True))
    assert got[1].dtype == param_dtype and got[2].dtype == param_dtype


@needs_compiled
def test_last_dim_strided_and_empty():
    big = torch.randn(2, 5, 3, 32)
    o = big[..., ::2]  # stride(-1) == 2: the public function makes it contiguous
    gate, shift = torch.randn(3), torch.randn(2, 3, 16)
    with xlkernels.backend("cpu"):
        assert rel_err(xlkernels.head_steer(o, gate, shift), ref64(o, gate, shift)) <= 2e-6
        assert xlkernels.head_steer(torch.randn(2, 0, 3, 8), torch.randn(3)).shape == (2, 0, 3, 8)
    o0, g0, s0 = make((2, 0, 3, 8), "bh", "hd")
    got = _grads("cpu", o0, g0, s0, torch.randn(2, 0, 3, 8), (True, True, True))
    assert got[0].shape == o0.shape and torch.equal(got[1], torch.zeros(2, 3)) and torch.equal(got[2], torch.zeros(3, 8))


def _grads(backend, o, gate, shift, dout, req):
    leaves = [None if x is None else x.detach().clone().requires_grad_(r) for x, r in zip((o, gate, shift), req)]
    with xlkernels.backend(backend):
        out = xlkernels.head_steer(*leaves)
    out.backward(dout)
    return [None if x is None or not r else x.grad for x, r in zip(leaves, req)]


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 3, 80), (2, 17, 3, 80), (3, 6, 2, 7)])
@pytest.mark.parametrize("gate_kind,shift_kind", [("h", "hd"), ("bh", "bhd"), ("h", None), (None, "bhd"), ("bh", "hd")])
def test_backward_cpu(dtype, shape, gate_kind, shift_kind):
    o, gate, shift = make(shape, gate_kind, shift_kind, dtype, transposed=True)
    dout = torch.randn(shape).to(dtype)
    req = (True, gate is not None, shift is not None)
    got = _grads("cpu", o, gate, shift, dout, req)
    o64, g64, s64 = [None if x is None else x.detach().double().requires_grad_(r)
                     for x, r in zip((o, gate, shift), req)]
    ref(o64, g64, s64).backward(dout.double())
    want = [o64.grad, None if g64 is None else g64.grad, None if s64 is None else s64.grad]
    assert got[0].dtype == dtype and got[0].shape == o.shape
    assert rel_err(got[0], want[0]) <= TOL[dtype]
    for g, w, x in zip(got[1:], want[1:], (gate, shift)):
        if x is not None:
            assert g.shape == x.shape and g.dtype == x.dtype
            assert rel_err(g, w) <= 1e-5  # fp32 sums of exactly representable products


@needs_compiled
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_parallel_paths(threads):
    """Large enough that rows split across threads (forward) and T splits into chunks (backward)."""
    shape = (2, 2053, 3, 16)  # T*H*D well above one task's minimum work; odd T for a ragged last chunk
    o, gate, shift = make(shape, "h", "bhd", torch.bfloat16, transposed=True)
    dout = torch.randn(shape).to(torch.bfloat16)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with xlkernels.backend("cpu"):
            out = xlkernels.head_steer(o, gate, shift)
        got = _grads("cpu", o, gate, shift, dout, (True, True, True))
    finally:
        torch.set_num_threads(old)
    assert rel_err(out, ref64(o, gate, shift)) <= TOL[torch.bfloat16]
    o64, g64, s64 = [x.detach().double().requires_grad_() for x in (o, gate, shift)]
    ref(o64, g64, s64).backward(dout.double())
    assert rel_err(got[0], o64.grad) <= TOL[torch.bfloat16]
    assert rel_err(got[1], g64.grad) <= 1e-5 and rel_err(got[2], s64.grad) <= 1e-5


@needs_compiled
@pytest.mark.parametrize("req", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
def test_backward_subsets(req):
    o, gate, shift = make((2, 7, 3, 24), "bh", "hd")
    dout = torch.randn(o.shape)
    got = _grads("cpu", o, gate, shift, dout, req)
    want = _grads("reference", o, gate, shift, dout, req)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert rel_err(g, w.double()) <= 1e-5


@needs_compiled
@pytest.mark.parametrize("with_shift", [True, False])
def test_zero_gate_selects_shift_despite_nan(with_shift):
    B, T, H, D = 2, 5, 4, 16
    o = torch.randn(B, T, H, D)
    o[:, :, 1] = float("nan")
    o[:, 2:, 3] = float("inf")
    gate = torch.randn(B, H)
    gate[:, 1] = 0.0
    gate[1, 3] = 0.0
    shift = torch.randn(B, H, D) if with_shift else None
    for backend in ("cpu", "reference"):
        with xlkernels.backend(backend):
            out = xlkernels.head_steer(o, gate, shift)
        want = shift[:, 1] if with_shift else torch.zeros(B, D)
        assert torch.equal(out[:, :, 1], want[:, None].expand(B, T, D))
        want3 = shift[1, 3] if with_shift else torch.zeros(D)
        assert torch.equal(out[1, :, 3], want3.expand(T, D))
        assert out[0, 2:, 3].isinf().all()  # gate != 0: inf propagates as in gate*o
        keep = torch.ones(H, dtype=torch.bool)
        keep[[1, 3]] = False
        assert not out[:, :, keep].isnan().any()


@needs_compiled
def test_zero_gate_nan_gradients_are_finite():
    o = torch.randn(2, 6, 3, 8)
    o[:, :, 0] = float("nan")
    gate = torch.randn(2, 3)
    gate[:, 0] = 0.0
    shift = torch.randn(3, 8)
    dout = torch.randn(o.shape)
    got = _grads("cpu", o, gate, shift, dout, (True, True, True))
    want = _grads("reference", o, gate, shift, dout, (True, True, True))
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert rel_err(g, w.double()) <= 1e-5
    assert (got[0][:, :, 0] == 0).all()


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate_kind,shift_kind", [("h", "hd"), ("bh", "bhd"), (None, None)])
def test_opcheck(dtype, gate_kind, shift_kind):
    o, gate, shift = make((2, 5, 3, 8), gate_kind, shift_kind, dtype, transposed=True)
    o.requires_grad_()
    for x in (gate, shift):
        if x is not None:
            x.requires_grad_()
    torch.library.opcheck(torch.ops.xlkernels.head_steer.default, (o, gate, shift))
    dout = torch.randn(o.shape).to(dtype)
    for need in [(True, True, True), (False, True, False), (True, False, True)]:
        args = (dout, o.detach(), None if gate is None else gate.detach(), None if shift is None else shift.detach())
        torch.library.opcheck(torch.ops.xlkernels.head_steer_backward.default, (*args, *need))


def test_bad_inputs_name_the_argument():
    o = torch.randn(2, 3, 4, 8)
    with pytest.raises(ValueError, match="gate must have shape"):
        xlkernels.head_steer(o, torch.randn(3))
    with pytest.raises(ValueError, match="gate must have shape"):
        xlkernels.head_steer(o, torch.randn(4, 2))
    with pytest.raises(ValueError, match="shift must have shape"):
        xlkernels.head_steer(o, None, torch.randn(4, 7))
    with pytest.raises(ValueError, match="gate is on meta"):
        xlkernels.head_steer(o, torch.randn(4, device="meta"))
    with pytest.raises(ValueError, match="shift is on meta"):
        xlkernels.head_steer(o, None, torch.randn(4, 8, device="meta"))
    with pytest.raises(TypeError, match="gate must have dtype"):
        xlkernels.head_steer(o, torch.ones(4, dtype=torch.long))
    with pytest.raises(TypeError, match="shift must have dtype"):
        xlkernels.head_steer(o, None, torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="o must have dtype"):
        xlkernels.head_steer(o.double(), torch.ones(4))
    with pytest.raises(ValueError, match="o must have 4 dims"):
        xlkernels.head_steer(o[0], torch.ones(4))
    with pytest.raises(TypeError, match="gate must be a torch.Tensor"):
        xlkernels.head_steer(o, [1.0] * 4)


@needs_compiled
def test_compiled_op_checks_too():
    o = torch.randn(2, 3, 4, 8)
    with pytest.raises(RuntimeError, match="gate must be"):
        torch.ops.xlkernels.head_steer(o, torch.randn(5), None)
    with pytest.raises(RuntimeError, match="shift must be"):
        torch.ops.xlkernels.head_steer(o, None, torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="o must be"):
        torch.ops.xlkernels.head_steer(o.double(), None, None)


# ---- Triton backend (interpreter on CPU, real kernels on a GPU) -------------------------------------------------
TRITON_DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    backends.why_not("head_steer", "triton", torch.device(TRITON_DEV)) is not None,
    reason=str(backends.why_not("head_steer", "triton", torch.device(TRITON_DEV))))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,gate_kind,shift_kind", [((1, 1, 3, 80), "h", "hd"), ((2, 17, 3, 80), "bh", "bhd"),
                                                         ((3, 5, 2, 7), None, "hd"), ((2, 6, 3, 16), "bh", None)])
def test_triton_forward_backward(dtype, shape, gate_kind, shift_kind):
    o, gate, shift = make(shape, gate_kind, shift_kind, dtype, device=TRITON_DEV, transposed=True)
    with xlkernels.backend("triton"):
        out = xlkernels.head_steer(o, gate, shift)
    assert out.dtype == dtype and rel_err(out, ref64(o, gate, shift)) <= TOL[dtype]
    dout = torch.randn(shape, device=TRITON_DEV).to(dtype)
    req = (True, gate is not None, shift is not None)
    got = _grads("triton", o, gate, shift, dout, req)
    o64, g64, s64 = [None if x is None else x.detach().double().requires_grad_(r)
                     for x, r in zip((o, gate, shift), req)]
    ref(o64, g64, s64).backward(dout.double())
    assert rel_err(got[0], o64.grad) <= TOL[dtype]
    for g, w, x in zip(got[1:], (g64, s64), (gate, shift)):
        if x is not None:
            assert g.shape == x.shape and g.dtype == x.dtype and rel_err(g, w.grad) <= 1e-5


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_gpu_shapes(dtype, monkeypatch):
    """Launch shapes of a 4-SM GPU in the interpreter: 64-row forward tiles, the backward's t split in 3 chunks
    whose gate/shift sums meet in atomics."""
    monkeypatch.setattr(grids, "GPU", {"sms": 4})
    assert ths.bwd_grid(2, 3, 70, 32, grids.sm_count(torch.device("cpu")))[0] == (6, 3)
    test_triton_forward_backward(dtype, (2, 70, 3, 16), "bh", "bhd")


@needs_triton
def test_triton_zero_gate_nan_and_opcheck():
    o, gate, shift = make((2, 5, 3, 16), "bh", "hd", device=TRITON_DEV)
    o[:, :, 1] = float("nan")
    gate[:, 1] = 0.0
    with xlkernels.backend("triton"):
        out = xlkernels.head_steer(o, gate, shift)
    assert torch.equal(out[:, :, 1], shift[1].expand(2, 5, 16))
    got = _grads("triton", o, gate, shift, torch.randn(o.shape, device=TRITON_DEV), (True, True, True))
    assert all(torch.isfinite(g).all() for g in got)
    o, gate, shift = make((2, 3, 2, 8), "h", "bhd", device=TRITON_DEV, transposed=True)
    torch.library.opcheck(torch.ops.xlkernels.head_steer_triton.default,
                          (o.requires_grad_(), gate.requires_grad_(), shift.requires_grad_()))
    torch.library.opcheck(torch.ops.xlkernels.head_steer_backward_triton.default,
                          (torch.randn(o.shape, device=TRITON_DEV), o.detach(), gate.detach(), shift.detach(),
                           True, True, True))


# ---- CUDA backend (skipped without a GPU) --------------------------------------------------------------------
gpu = pytest.mark.gpu


@gpu
@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(4, 1024, 8, 128), (2, 300, 4, 256)])
@pytest.mark.parametrize("gate_kind,shift_kind", [("h", "hd"), ("bh", "bhd"), (None, "hd"), ("bh", None)])
def test_cuda_forward_backward(dtype, shape, gate_kind, shift_kind):
    o, gate, shift = make(shape, gate_kind, shift_kind, dtype, device="cuda", transposed=True)
    with xlkernels.backend("cuda"):
        out = xlkernels.head_steer(o, gate, shift)
    assert rel_err(out, ref64(o, gate, shift)) <= TOL[dtype]
    dout = torch.randn(shape, device="cuda").to(dtype)
    req = (True, gate is not None, shift is not None)
    got = _grads("cuda", o, gate, shift, dout, req)
    o64, g64, s64 = [None if x is None else x.detach().double().requires_grad_(r)
                     for x, r in zip((o, gate, shift), req)]
    ref(o64, g64, s64).backward(dout.double())
    assert rel_err(got[0], o64.grad) <= TOL[dtype]
    for g, w in zip(got[1:], (g64, s64)):
        if w is not None:
            assert rel_err(g, w.grad) <= 1e-4  # fp32 atomics over chunks


@gpu
@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_unaligned_and_odd(dtype):
    # storage offset of one element and D = 7 force the scalar (V = 1) paths
    for D, off in ((7, 0), (64, 1)):
        base = torch.randn(2 * 9 * 3 * D + 1, device="cuda").to(dtype)
        o = base[off:off + 2 * 9 * 3 * D].view(2, 9, 3, D)
        gate, shift = torch.randn(2, 3, device="cuda"), torch.randn(3, D, device="cuda")
        with xlkernels.backend("cuda"):
            out = xlkernels.head_steer(o, gate, shift)
        assert rel_err(out, ref64(o, gate, shift)) <= TOL[dtype]
        dout = torch.randn(o.shape, device="cuda").to(dtype)
        got = _grads("cuda", o, gate, shift, dout, (True, True, True))
        want = _grads("reference", o, gate, shift, dout, (True, True, True))
        for g, w in zip(got, want):
            assert rel_err(g, w.double()) <= max(TOL[dtype], 1e-4)


@gpu
@needs_compiled
def test_cuda_zero_gate_nan_and_opcheck():
    o = torch.randn(2, 5, 4, 64, device="cuda", dtype=torch.bfloat16)
    o[:, :, 2] = float("nan")
    gate = torch.randn(4, device="cuda")
    gate[2] = 0
    shift = torch.randn(4, 64, device="cuda")
    with xlkernels.backend("cuda"):
        out = xlkernels.head_steer(o, gate, shift)
    assert torch.equal(out[:, :, 2], shift[2].to(out.dtype).expand(2, 5, 64))
    o2, g2, s2 = make((2, 5, 3, 8), "bh", "hd", torch.float16, device="cuda", transposed=True)
    torch.library.opcheck(torch.ops.xlkernels.head_steer.default,
                          (o2.requires_grad_(), g2.requires_grad_(), s2.requires_grad_()))
