"""steered_attention: triton (interpreter here, compiled on GPU), cpu and reference backends vs float64.

Tolerance is FlashAttention's rule: error vs float64 <= 2x the error of PyTorch math in the same dtype, for the
output and every gradient (q, k, v, gate, shift); fp32 adds a tiny floor where the PyTorch error is ~0.
"""
import pytest
import torch

import xlkernels
import xlkernels.ops.steered_attention  # noqa: F401 (registers torch.ops.xlkernels.steered_attention_*)
from xlkernels import backend
from xlkernels.reference import attention as ref_attn
from xlkernels.triton import attention as tri
from xlkernels.triton import attention_common as tri_com
from xlkernels.triton import attention_bwd as tri_bwd
from xlkernels.triton import attention_decode as tri_dec
from xlkernels.triton import grids

HAS_GPU = torch.cuda.is_available()
TOL = 2.0
# triton tests run on CPU tensors under the interpreter here, and on CUDA (compiled) where there is a GPU
TDEV = "cpu" if tri_com.INTERP else "cuda"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(grids, "POISON", True)


def make(B, H, Hkv, T, S, D, dtype, device="cpu", gate="bh", shift="hd", kpm=None, zero_heads=(), gate_grad=True,
         qkv_grad=(True, True, True), seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    q = rnd(B, H, T, D).to(dtype)
    k = rnd(B, Hkv, S, D).to(dtype)
    v = rnd(B, Hkv, S, D).to(dtype)
    gt = None
    if gate is not None:
        gt = (torch.rand(B, H, generator=g) + 0.5) if gate == "bh" else (torch.rand(H, generator=g) + 0.5)
        for zh in zero_heads:
            gt[..., zh] = 0.0
        gt = gt.to(device)
    sh = None
    if shift is not None:
        sh = rnd(H, D) if shift == "hd" else rnd(B, H, D)
    mask = None
    if kpm is not None:
        mask = torch.rand(B, S, generator=g) > 0.3
        if kpm == "full":  # batch row 0 fully padded
            mask[0] = False
        mask = mask.to(device)
    leaves = [x for x, want in zip((q, k, v), qkv_grad) if want]
    leaves += ([gt] if gt is not None and gate_grad else []) + ([sh] if sh is not None else [])
    for x in leaves:
        x.requires_grad_(True)
    return q, k, v, gt, sh, mask, leaves


def run(be, q, k, v, gt, sh, mask, leaves, do, **kw):
    with backend(be):
        out = xlkernels.steered_attention(q, k, v, gate=gt, shift=sh, key_padding_mask=mask, **kw)
    grads = torch.autograd.grad(out, leaves, do) if leaves else ()
    return out, grads


def as64(x):
    return None if x is None else x.detach().double().requires_grad_(x.requires_grad)


def errs(got, ref):
    return (got.double() - ref).abs().max().item()


U = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}  # unit roundoff of the low-precision dtypes


def rms(x):
    return x.double().pow(2).mean().sqrt().item()


def check_low_precision(name, got, r, u, walk):
    """Bounds that see a systematic 0.1% error (about 2u in fp16), which the max-error 2x rule misses: the RMS
    error (rounding alone gives about 0.6u) and the error's slope along the reference (a scale error; rounding
    gives ~0). d gate sums T*D products with the fp16-stored O_raw, so its noise is u * walk, walk being the
    root sum of squares of those products."""
    err = got.double() - r
    if name == "gate":
        assert rms(err) <= 2 * u * rms(walk), f"gate: RMS error {rms(err):.2e} > 2u x walk {rms(walk):.2e}"
        return
    if rms(r) == 0:
        return
    rel = rms(err) / rms(r)
    slope = (err * r).sum().item() / (r * r).sum().item()
    assert rel <= 2 * u, f"{name}: RMS error {rel / u:.2f}u > 2u"
    bound = u / 2 + 3 * rel / r.numel() ** 0.5
    assert abs(slope) <= bound, f"{name}: systematic error {slope / u:+.2f}u, bound {bound / u:.2f}u"


def check_case(B, H, Hkv, T, S, D, dtype, be="triton", grads=True, device=None, **kw):
    device = device or (TDEV if be == "triton" else "cpu")
    spec = {n: kw.pop(n) for n in ("gate", "shift", "kpm", "zero_heads", "gate_grad", "qkv_grad") if n in kw}
    q, k, v, gt, sh, mask, leaves = make(B, H, Hkv, T, S, D, dtype, device=device, **spec)
    if not grads:
        leaves = []
        for x in (q, k, v, gt, sh):
            if x is not None:
                x.requires_grad_(False)
    leaves64 = [as64(x) for x in leaves]
    sub = dict(zip([id(x) for x in leaves], leaves64))
    a64 = [sub.get(id(x), as64(x)) for x in (q, k, v, gt, sh)]
    o_raw = ref_attn.attention_raw(*(x.detach() for x in a64[:3]), key_padding_mask=mask, **kw)
    # a random upstream gradient with a part along O_raw (as from a loss on the output), so d gate is not
    # a pure random walk but large against its rounding noise
    do = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(7)).to(device) + 2 * o_raw.float()
    do = do.to(dtype)
    walk = (do.double() * o_raw).pow(2).sum((2, 3))
    walk = (walk if gt is None or gt.dim() == 2 else walk.sum(0)).sqrt()
    out, g_out = run(be, q, k, v, gt, sh, mask, leaves, do, **kw)
    ref, g_ref = run("reference", *a64, mask, leaves64, do.double(), **kw)
    # same-dtype PyTorch math (gate/shift stay in their own dtype, like the kernels read them)
    pt, g_pt = run("reference", q, k, v, gt, sh, mask, leaves, do, **kw)
    names = ["out"] + [n for n, x in zip(("q", "k", "v", "gate", "shift"), (q, k, v, gt, sh)) if
                       any(x is y for y in leaves)]
    floor_rel = 1e-5 if dtype == torch.float32 else 1e-4
    assert out.shape == (B, H, T, D) and out.dtype == dtype
    rms_out_err = rms(pt.double() - ref)
    for name, got, r, p in zip(names, (out, *g_out), (ref, *g_ref), (pt, *g_pt)):
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        e, e_pt = errs(got, r), errs(p, r)
        floor = floor_rel * max(1.0, r.abs().max().item())
        if name in ("gate", "shift"):
            # sums over n output elements: the output's rounding error random-walks; one draw of 2x is flaky,
            # so allow 6 sigma of that walk on top (a real bug is off by O(|grad|))
            n = out.numel() // got.numel()
            floor += 6 * n ** 0.5 * rms(do) * rms_out_err
        assert e <= TOL * e_pt + floor, f"{name}: error {e:.3e} > {TOL} x pytorch {e_pt:.3e} + {floor:.1e}"
        # (the interpreter casts fp32 -> bf16 by truncation, a -0.7u bias the GPU's round-to-nearest lacks)
        if dtype in U and be == "triton" and not (tri_com.INTERP and dtype == torch.bfloat16):
            check_low_precision(name, got, r, U[dtype], walk)
    return out, ref


# A covering grid (not a product): odd T/S (1, 17, 113), T < S, T > S, GQA 6:2, MQA, D in {64, 80, 96, 256},
# causal / non-causal, sliding window, softcap, key padding incl. a fully padded batch row, zero gates with a gate
# grad, (H,) and (B,H) gates, (H,D) and (B,H,D) shifts, T=1 and T=5 decode (split-KV, GQA-packed), no steering.
GRID = [
    # B, H, Hkv, T, S, D, kwargs
    (1, 2, 2, 17, 17, 64, dict(causal=True)),
    (1, 6, 2, 113, 113, 64, dict(causal=True, gate="h", shift="bhd")),
    (2, 3, 1, 17, 113, 80, dict(causal=True, kpm="full")),
    (2, 2, 1, 33, 70, 80, dict(causal=False, softcap=30.0, kpm="some")),
    (1, 2, 1, 113, 113, 256, dict(causal=True, sliding_window=20)),
    (1, 2, 2, 70, 113, 96, dict(causal=False, sliding_window=33, softcap=5.0, zero_heads=(1,))),
    (2, 4, 2, 1, 113, 64, dict(causal=True, kpm="full")),
    (1, 6, 2, 5, 70, 80, dict(causal=True, sliding_window=30, kpm="some", shift="bhd")),
    (1, 2, 1, 1, 1, 64, dict(causal=True)),
    (1, 2, 1, 17, 5, 64, dict(causal=True, gate=None, shift="bhd")),
    (2, 2, 2, 17, 40, 64, dict(causal=False, gate=None, shift=None, kpm="some")),
]


def _id(c):
    B, H, Hkv, T, S, D, kw = c
    return f"B{B}H{H}:{Hkv}T{T}S{S}D{D}-" + "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_triton_matches_reference(case, dtype):
    B, H, Hkv, T, S, D, kw = case
    check_case(B, H, Hkv, T, S, D, dtype, **dict(kw))


def test_triton_bf16_interpreter_upcast():
    check_case(1, 4, 2, 33, 50, 64, torch.bfloat16, causal=True, kpm="some")


@pytest.mark.parametrize("case", GRID, ids=_id)
def test_cpu_backend_matches_reference(case):
    B, H, Hkv, T, S, D, kw = case
    if (T, S) == (113, 113) and D == 256:
        T = S = 40  # keep the math path small
    check_case(B, H, Hkv, T, S, D, torch.float32, be="cpu", **dict(kw))


def test_fully_masked_rows_give_shift_without_nan():
    # T > S causal: the first T - S rows see no key; batch row 0 is fully padded.
    for be in ("triton", "cpu", "reference"):
        dev = TDEV if be == "triton" else "cpu"
        q, k, v, gt, sh, mask, leaves = make(2, 2, 1, 20, 9, 64, torch.float32, kpm="full", device=dev)
        do = torch.randn(2, 2, 20, 64, device=dev)
        out, grads = run(be, q, k, v, gt, sh, mask, leaves, do)
        assert all(torch.isfinite(x).all() for x in (out, *grads)), be
        torch.testing.assert_close(out[0], sh[:, None].expand(2, 20, 64).detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(out[1, :, :11], sh[:, None].expand(2, 11, 64).detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("T", [1, 40])
def test_head_skip_exact_and_not_computed(T):
    # gate == 0 without grad: those heads output exactly shift, and their key loop never runs (NaN in their
    # queries would otherwise show up); no NaN leaks into dk/dv through the skipped heads.
    B, H, Hkv, S, D = 2, 4, 2, 50, 64
    q, k, v, gt, sh, mask, leaves = make(B, H, Hkv, T, S, D, torch.float16, zero_heads=(0, 3), gate_grad=False,
                                         device=TDEV)
    with torch.no_grad():
        q[:, [0, 3]] = float("nan")
    do = torch.randn(B, H, T, D, device=TDEV).half()
    out, (dq, dk, dv, dsh) = run("triton", q, k, v, gt, sh, mask, leaves, do)
    assert torch.equal(out[:, [0, 3]], sh[[0, 3]][None, :, None, :].expand(B, 2, T, D).half())
    assert torch.isfinite(out[:, [1, 2]]).all()
    assert torch.equal(dq[:, [0, 3]], torch.zeros_like(dq[:, [0, 3]]))
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()
    # the active heads still match the reference
    q2 = q.detach().clone()
    q2[:, [0, 3]] = 0.0
    ref = xlkernels.reference.attention.steered_attention(q2.double(), k.double(), v.double(), gate=gt.double(),
                                                          shift=sh.double())
    assert (out[:, [1, 2]].double() - ref[:, [1, 2]]).abs().max() < 5e-3


@pytest.mark.parametrize("qkv_grad", [(False, False, False), (True, False, False), (False, True, False)],
                         ids=["steer-only", "q-only", "k-only"])
def test_partial_grads(qkv_grad):
    # frozen q/k/v (head importance on the first layer): only the rowsum(dO*O_raw) pass runs for gate/shift
    check_case(1, 4, 2, 33, 40, 64, torch.float16, zero_heads=(1,), qkv_grad=qkv_grad, kpm="some")


def test_zero_gate_with_grad_gives_gate_grad():
    # LAHIS: d gate at gate == 0 is sum dO * O_raw, so the head must be computed when gate needs grad.
    check_case(1, 4, 2, 33, 33, 64, torch.float32, zero_heads=(1, 2), gate_grad=True)


def test_output_layout_and_strided_inputs():
    B, H, Hkv, T, S, D = 2, 4, 2, 33, 40, 64
    qb = torch.randn(B, T, H, D, device=TDEV)  # (B,T,H,D) memory, as HF has it
    kb = torch.randn(B, S, 2 * Hkv, D, device=TDEV)[:, :, ::2]  # every other head: arbitrary strides
    vb = torch.randn(B, S, Hkv, D, device=TDEV)
    q, k, v = qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2)
    with backend("triton"):
        out = xlkernels.steered_attention(q, k, v, shift=torch.randn(H, D, device=TDEV))
    assert out.transpose(1, 2).is_contiguous()
    ref = xlkernels.reference.attention.attention_raw(q.double(), k.double(), v.double())
    with backend("triton"):
        raw = xlkernels.steered_attention(q, k, v)
    assert (raw.double() - ref).abs().max() < 1e-5
    # backward through the (B,T,H,D) layout HF uses: the incoming grad is a transposed view
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    w = torch.randn(B, T, H, D, device=TDEV)
    with backend("triton"):
        g = torch.autograd.grad((xlkernels.steered_attention(*leaves).transpose(1, 2) * w).sum(), leaves)
    l64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    g64 = torch.autograd.grad((xlkernels.reference.attention.attention_raw(*l64).transpose(1, 2) * w).sum(), l64)
    for a, b in zip(g, g64):
        assert (a.double() - b).abs().max() < 1e-4


def test_bad_inputs_name_the_argument():
    q, k, v = torch.randn(1, 4, 5, 64), torch.randn(1, 2, 7, 64), torch.randn(1, 2, 7, 64)
    f = xlkernels.steered_attention
    cases = [
        (dict(q=torch.randn(1, 4, 5, 300), k=torch.randn(1, 2, 7, 300), v=torch.randn(1, 2, 7, 300)), "head_dim"),
        (dict(k=torch.randn(1, 3, 7, 64), v=torch.randn(1, 3, 7, 64)), "multiple"),
        (dict(gate=torch.ones(3)), "gate"),
        (dict(gate=torch.ones(2, 4)), "gate"),
        (dict(gate=torch.ones(4, dtype=torch.int32)), "gate"),
        (dict(shift=torch.ones(4, 63)), "shift"),
        (dict(key_padding_mask=torch.ones(1, 6, dtype=torch.bool)), "key_padding_mask"),
        (dict(key_padding_mask=torch.ones(1, 7)), "key_padding_mask"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(softcap=-1.0), "softcap"),
        (dict(k=k.half()), "dtype"),
        (dict(v=torch.randn(1, 2, 8, 64)), "v"),
        (dict(q=torch.randn(4, 5, 64)), "q"),
    ]
    for kw, word in cases:
        args = dict(q=q, k=k, v=v)
        args.update(kw)
        a = (args.pop("q"), args.pop("k"), args.pop("v"))
        with pytest.raises((ValueError, TypeError), match=word):
            f(*a, **args)
    with backend("triton"), pytest.raises(TypeError, match="triton"):
        f(q.double(), k.double(), v.double())
    if HAS_GPU:
        with pytest.raises(ValueError, match="gate"):
            f(q, k, v, gate=torch.ones(4, device="cuda"))


def test_opcheck():
    q, k, v = (torch.randn(1, 2, 9, 16, device=TDEV), torch.randn(1, 1, 11, 16, device=TDEV),
               torch.randn(1, 1, 11, 16, device=TDEV))
    g, sh = torch.rand(1, 2, device=TDEV) + 0.5, torch.randn(1, 2, 16, device=TDEV)
    m = torch.rand(1, 11, device=TDEV) > 0.2
    for x in (q, k, v, g, sh):
        x.requires_grad_(True)
    op = torch.ops.xlkernels.steered_attention_fwd
    torch.library.opcheck(op, (q, k, v, g, sh, m, True, 0.25, 4, 10.0, False, True))
    torch.library.opcheck(op, (q, k, v, None, None, None, False, 0.25, 0, 0.0, False, False))
    out, o_raw, lse = op(q, k, v, g, sh, m, True, 0.25, 0, 0.0, False, True)
    do = torch.randn_like(out)
    torch.library.opcheck(torch.ops.xlkernels.steered_attention_bwd,
                          (do, q.detach(), k.detach(), v.detach(), out.detach(), o_raw, lse, g.detach(),
                           sh.detach(), m, True, 0.25, 0, 0.0, True, True, True, True))
    torch.library.opcheck(torch.ops.xlkernels.steered_attention_bwd,
                          (do, q.detach(), k.detach(), v.detach(), out.detach(), o_raw, lse, g.detach(),
                           sh.detach(), m, True, 0.25, 0, 0.0, False, False, True, False))


@pytest.mark.parametrize("be", ["reference", "cpu", "triton"])
def test_torch_compile_fullgraph(be):
    torch._dynamo.reset()
    B, H, Hkv, T, S, D = 1, 4, 2, 9, 12, 16
    q, k, v, gt, sh, mask, leaves = make(B, H, Hkv, T, S, D, torch.float32, kpm="some",
                                         device=TDEV if be == "triton" else "cpu")

    def f(q, k, v, gate, shift, mask):
        return xlkernels.steered_attention(q, k, v, gate=gate, shift=shift, key_padding_mask=mask,
                                           sliding_window=6) * 2.0

    with backend(be):
        cf = torch.compile(f, fullgraph=True, backend="aot_eager")
        a = cf(q, k, v, gt, sh, mask)
        b = f(q, k, v, gt, sh, mask)
        w = torch.randn_like(a)
        ga = torch.autograd.grad(a, leaves, w)
        gb = torch.autograd.grad(b, leaves, w)
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)
    torch._dynamo.reset()


# ------------------------------------------------------------------ non-deterministic dQ (fp32 atomics)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the separate dQ kernel ran on the atomic-dQ path")


@pytest.fixture
def atomic_dq(monkeypatch):
    """FlashAttention-2's dQ: accumulated by the dK/dV kernel with fp32 atomics; the dQ kernel must not run."""
    monkeypatch.setattr(tri_bwd, "DETERMINISTIC", False)
    monkeypatch.setattr(tri_bwd, "_bwd_dq_kernel", _NoLaunch())
    assert tri_bwd.atomic_dq()


# causal GQA 6:2 with an (H,) gate; fully padded batch row; softcap + padding; window + softcap + a zero gate
# with its gate grad
ATOMIC_GRID = [GRID[1], GRID[2], GRID[3], GRID[5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", ATOMIC_GRID, ids=[_id(c) for c in ATOMIC_GRID])
def test_atomic_dq_matches_reference(case, dtype, atomic_dq):
    B, H, Hkv, T, S, D, kw = case
    check_case(B, H, Hkv, T, S, D, dtype, **dict(kw))


def test_atomic_dq_off_in_torch_deterministic_mode(monkeypatch):
    monkeypatch.setattr(tri_bwd, "DETERMINISTIC", False)
    assert tri_bwd.atomic_dq()
    ran = []
    real = tri_bwd.launch
    monkeypatch.setattr(tri_bwd, "launch", lambda kernel, *a, **kw: ran.append(a[4].get("ATOMIC_DQ")) or
                        real(kernel, *a, **kw))
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not tri_bwd.atomic_dq()
        check_case(1, 2, 1, 17, 17, 64, torch.float32, causal=True)
        assert ran == [False, None]  # dK/dV without atomics, then the dQ kernel
    finally:
        torch.use_deterministic_algorithms(prev)


# ------------------------------------------------------------------ launch shapes: folded grids, GPU tiles


def test_folded_grids(monkeypatch):
    """(batch, head) pairs folded over grid axes 1 and 2, with spare programs: AXIS_MAX lowered to 4."""
    monkeypatch.setattr(grids, "AXIS_MAX", 4)
    assert tri_com.row_grid(40, 10, 32) == (2, 4, 3)
    check_case(5, 2, 1, 40, 40, 16, torch.float32, kpm="some", shift="bhd")  # 10 heads in 12 programs
    assert tri_dec.decode_grids(5, 2)[0] == (2, 3, 2)
    check_case(5, 2, 1, 3, 40, 16, torch.float32)  # decode: 5 packs of 2 heads in 6 programs


# One case per head-dim bucket (odd sizes); each runs every config of its bucket's tables as the GPU would.
GPU_CASES = [
    (1, 3, 1, 77, 77, 64, dict(causal=True, kpm="some")),
    (2, 2, 2, 45, 150, 80, dict(causal=True, softcap=20.0, shift="bhd")),
    (1, 2, 1, 70, 50, 256, dict(causal=False, sliding_window=30, zero_heads=(1,))),
]
TABLES = (tri.FWD_CONFIGS, tri_bwd.DKDV_CONFIGS, tri_bwd.DQ_CONFIGS)
GPU_PARAMS = [(c, i) for c in GPU_CASES for i in range(max(len(t[tri_com._dbucket(c[5])]) for t in TABLES))]


@pytest.mark.parametrize("case,config", GPU_PARAMS, ids=[f"{_id(c)}-config{i}" for c, i in GPU_PARAMS])
def test_gpu_tile_configs(case, config, monkeypatch):
    """The shipped GPU configs (BLOCK_M != BLOCK_N, blocks 16..128) against float64, here in the interpreter. The
    pointer forward even on Hopper (test_attention_tma.py runs the TMA one's configs)."""
    from xlkernels.triton import attention_tma
    monkeypatch.setattr(attention_tma, "MODE", "0")
    monkeypatch.setattr(grids, "GPU", {"config": config, "sms": 132})
    B, H, Hkv, T, S, D, kw = case
    check_case(B, H, Hkv, T, S, D, torch.float16, **dict(kw))


ATOMIC_GPU = [(c, i) for c in GPU_CASES for i in range(len(tri_bwd.DKDV_ATOMIC_CONFIGS[tri_com._dbucket(c[5])]))]


class _Tiles:
    """Wraps a kernel; records (BLOCK_M, BLOCK_N, num_warps, num_stages) of each launch."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.seen.append((kw["BLOCK_M"], kw["BLOCK_N"], kw.get("num_warps"), kw.get("num_stages")))
            return self.kernel[grid](*args, **kw)
        return launch


@pytest.mark.parametrize("case,config", ATOMIC_GPU, ids=[f"{_id(c)}-config{i}" for c, i in ATOMIC_GPU])
def test_atomic_dq_gpu_tile_configs(case, config, monkeypatch, atomic_dq):
    """Every config of the atomic-dQ dK/dV table (DKDV_ATOMIC_CONFIGS) in its GPU tiles, and only that table."""
    monkeypatch.setattr(grids, "GPU", {"config": config, "sms": 132})
    seen = []
    monkeypatch.setattr(tri_bwd, "_bwd_dkdv_kernel", _Tiles(tri_bwd._bwd_dkdv_kernel, seen))
    B, H, Hkv, T, S, D, kw = case
    check_case(B, H, Hkv, T, S, D, torch.float16, **dict(kw))
    cfg = tri_bwd.DKDV_ATOMIC_CONFIGS[tri_com._dbucket(D)][config]
    assert seen == [(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)]


def test_dkdv_tables_autotuned_apart(monkeypatch):
    """The dK/dV kernel's two tables get separate autotuners (the cache key holds the table, not only the name)."""
    monkeypatch.setattr(tri_com, "_TUNED", {})
    for table in (tri_bwd.DKDV_CONFIGS, tri_bwd.DKDV_ATOMIC_CONFIGS):
        for b in (64, 128, 256):
            assert tri_com._tuned(tri_bwd._bwd_dkdv_kernel, table, b).configs == table[b]


@pytest.mark.parametrize("sms,D,splits", [(1, 64, 1), (3, 64, 3), (132, 64, 5), (132, 256, 4)])
def test_gpu_decode_splits(sms, D, splits, monkeypatch):
    """Split-KV decode with the GPU's key block (64; 32 for D > 128) and SM-count-based splits."""
    monkeypatch.setattr(grids, "GPU", {"sms": sms})
    B, H, Hkv, T, S = 1, 4, 2 if D <= 128 else 1, 3 if D <= 128 else 1, 300 if D <= 128 else 100
    block_n = 64 if D <= 128 else 32
    assert tri_dec.splits(B * Hkv, S, block_n, sms)[0] == splits  # one program per KV head (GQA pack)
    check_case(B, H, Hkv, T, S, D, torch.float16, kpm="some", sliding_window=250)


@pytest.mark.parametrize("T", [1, 3])
def test_decode_combine_many_splits(T, monkeypatch):
    """The parallel combine with a split count that is not a power of two (10 -> 16 lanes, 6 padded), leading
    splits that see no key (window), and several column blocks per row (COMBINE_TILE lowered: 16 columns of 80)."""
    monkeypatch.setattr(grids, "GPU", {"sms": 132})
    monkeypatch.setattr(tri_dec, "COMBINE_TILE", 256)
    tri_dec.plan.cache_clear()
    try:
        B, H, Hkv, S, D = 1, 4, 2, 600, 80
        p = tri_dec.plan(B, H, T, Hkv, S, D, 128, True, 132)
        assert (p[4], p[7], p[8], p[9]) == (10, 16, 16, (B * H * T, 5))  # splits, SPLIT_P2, columns, grid
        assert p[11] == B * H * T * 10 * (D + 1)  # scratch: valid rows only
        check_case(B, H, Hkv, T, S, D, torch.float16, kpm="some", sliding_window=100)
    finally:
        tri_dec.plan.cache_clear()


def test_decode_combine_large_scores(monkeypatch):
    """Split LSEs far beyond fp32's exp2 range (scores ~ +-300 in log2 units): the combine must subtract the
    max before exponentiating."""
    monkeypatch.setattr(grids, "GPU", {"sms": 132})
    B, H, Hkv, T, S, D = 1, 4, 2, 2, 300, 64
    q, k, v, gt, sh, mask, _ = make(B, H, Hkv, T, S, D, torch.float32, gate_grad=False, device=TDEV)
    with torch.no_grad():
        q, k = q * 12, k * 12
        with backend("triton"):
            out = xlkernels.steered_attention(q, k, v, gate=gt, shift=sh)
        ref = ref_attn.steered_attention(q.double(), k.double(), v.double(), gate=gt.double(), shift=sh.double())
    assert (out.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("scale", [-0.3, 0.0])
@pytest.mark.parametrize("T", [3, 40], ids=["decode", "prefill"])
def test_forward_nonpositive_scale(scale, T):
    """The forward folds the scale into exp2(x * f - m) with f > 0 (q negated for a negative scale, a zero scale
    as the smallest normal float): negative and zero scales still match float64, masked keys included."""
    B, H, Hkv, S, D = 1, 4, 2, 50, 64
    q, k, v, gt, sh, mask, _ = make(B, H, Hkv, T, S, D, torch.float32, kpm="some", gate_grad=False, device=TDEV)
    with torch.no_grad():
        with backend("triton"):
            out = xlkernels.steered_attention(q, k, v, gate=gt, shift=sh, key_padding_mask=mask, scale=scale)
        ref = ref_attn.steered_attention(q.double(), k.double(), v.double(), gate=gt.double(), shift=sh.double(),
                                         key_padding_mask=mask, scale=scale)
    assert (out.double() - ref).abs().max() < 1e-4


def test_decode_plan_and_scratch_cached(monkeypatch):
    """Host side of a decode step: the launch plan is cached per shape and the partials' scratch reused (no
    allocation per call once grown); results unchanged."""
    monkeypatch.setattr(grids, "POISON", False)
    tri_dec._SCRATCH.clear()
    B, H, Hkv, T, S, D = 1, 4, 2, 1, 70, 64
    q, k, v, gt, sh, mask, _ = make(B, H, Hkv, T, S, D, torch.float32, gate_grad=False, device=TDEV)
    with backend("triton"), torch.no_grad():
        first = xlkernels.steered_attention(q, k, v, gate=gt, shift=sh)
        hits, buf = tri_dec.plan.cache_info().hits, next(iter(tri_dec._SCRATCH.values()))
        again = xlkernels.steered_attention(q, k, v, gate=gt, shift=sh)
    assert tri_dec.plan.cache_info().hits == hits + 1 and next(iter(tri_dec._SCRATCH.values())) is buf
    assert torch.equal(first, again)


@pytest.mark.parametrize("T", [1, 3])
def test_decode_fully_masked_pack(T):
    """A decode pack whose heads all have gate 0 (no key loop at all, NaN queries) and a fully padded batch row:
    both give exactly shift; the other heads match the reference."""
    B, H, Hkv, S, D = 2, 8, 2, 70, 64  # 4 query heads per KV head: packs are heads 0-3 and 4-7
    q, k, v, gt, sh, mask, _ = make(B, H, Hkv, T, S, D, torch.float16, kpm="full", zero_heads=(0, 1, 2, 3),
                                    gate_grad=False, device=TDEV)
    with torch.no_grad():
        q[:, :4] = float("nan")
    with backend("triton"), torch.no_grad():
        out = xlkernels.steered_attention(q, k, v, gate=gt, shift=sh, key_padding_mask=mask)
    want = sh.detach().half()[None, :, None, :].expand(B, H, T, D)
    assert torch.equal(out[:, :4], want[:, :4]) and torch.equal(out[0], want[0])
    ref = ref_attn.steered_attention(q[1:, 4:].double(), k[1:, 1:].double(), v[1:, 1:].double(),  # KV head 1
                                     gate=gt[1:, 4:].double(), shift=sh[4:].detach().double(),
                                     key_padding_mask=mask[1:])
    assert (out[1:, 4:].double() - ref).abs().max() < 2e-3


# ------------------------------------------------------------------ GPU: compiled Triton path, bf16/fp16

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_gpu_triton_matches_reference(case, dtype):
    B, H, Hkv, T, S, D, kw = case
    check_case(B, H, Hkv, T, S, D, dtype, device="cuda", **dict(kw))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_large(D):
    check_case(2, 16, 4, 1000, 1000, D, torch.bfloat16, device="cuda", causal=True, kpm="some")
    check_case(2, 8, 8, 777, 1500, D, torch.float16, device="cuda", causal=False, sliding_window=300)
    check_case(1, 8, 2, 1, 4097, D, torch.bfloat16, device="cuda", causal=True)


@pytest.mark.gpu
def test_gpu_head_skip_and_compile():
    q, k, v, gt, sh, mask, leaves = make(2, 8, 2, 300, 300, 128, torch.bfloat16, device="cuda", zero_heads=(0, 5),
                                         gate_grad=False)
    with torch.no_grad():
        q[:, [0, 5]] = float("nan")
    f = torch.compile(lambda *a: xlkernels.steered_attention(*a, gate=gt, shift=sh), fullgraph=True)
    with backend("triton"):
        out = f(q, k, v)
    assert torch.equal(out[:, [0, 5]], sh[[0, 5]][None, :, None, :].expand(2, 2, 300, 128).bfloat16())
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ GPU code path compiles (no GPU needed)

AOT = r'''
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton
from triton.backends.compiler import GPUTarget
from xlkernels.triton import attention as A
from xlkernels.triton import attention_bwd as AB
from xlkernels.triton import attention_decode as AD

FLOATS = ("scale_log2", "sc_scale", "sc_log2", "scale")


def build(fn, ptrs, consts, warps=4, stages=2):
    sig, cst = {}, {}
    for n in fn.arg_names:
        if n in consts:
            sig[n], cst[n] = "constexpr", consts[n]
        else:
            sig[n] = "*" + ptrs[n] if n in ptrs else "fp32" if n in FLOATS else "i32"
    triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cst), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=warps, num_stages=stages))


dt = "bf16"
c = dict(HEAD_D=80, CAUSAL=True, HAS_WINDOW=True, HAS_SOFTCAP=True, HAS_KPM=True, HAS_GATE=True, UPCAST=False,
         PREC=None, BLOCK_D=128)
f32 = dict(Lse="fp32", Delta="fp32", Gate="fp32", Shift="fp32", Kpm="i8", Part="fp32", DGate="fp32",
           DShift="fp32")
io = {n: dt for n in ("Q", "K", "V", "Out", "ORaw", "DO", "DQ", "DK", "DV", "O")}
p = {**io, **f32}
build(A._fwd_kernel, p, dict(c, HAS_SHIFT=True, SKIP_ZERO=True, SAVE_RAW=True, BLOCK_M=64, BLOCK_N=64))
build(AB._bwd_dkdv_kernel, p, dict(c, ATOMIC_DQ=False, HOIST=True, BLOCK_M=16, BLOCK_N=64))
build(AB._bwd_dkdv_kernel, dict(p, DQ="fp32"), dict(c, ATOMIC_DQ=True, HOIST=False, BLOCK_M=16, BLOCK_N=64))
build(AB._bwd_dq_kernel, p, dict(c, BLOCK_M=64, BLOCK_N=32))
build(AD._split_kernel, p, dict(c, SKIP_ZERO=True, PACK=4, BLOCK_M=16, BLOCK_N=64))
build(AD._combine_kernel, p, dict(HEAD_D=80, HAS_GATE=True, HAS_SHIFT=True, SKIP_ZERO=True, SAVE_RAW=True,
                                 SPLIT_P2=8, BLOCK_D=128))
build(AB._bwd_pre_kernel, p, dict(HEAD_D=80, NEED_DGATE=True, NEED_DSHIFT=True, BLOCK_M=64, BLOCK_D=128))
print("compiled")
'''


def test_kernels_compile_for_sm90():
    """Compile every kernel (all features on, bf16, padded head dim) for sm_90 with Triton's bundled ptxas, so a
    GPU-only compile error shows up here without a GPU."""
    import os
    import subprocess
    import sys

    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", AOT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


def test_bench_smoke():
    """bench/bench_attention.py --smoke: the GPU benchmark's code paths still run (tiny CPU config)."""
    from bench import bench_attention
    assert bench_attention.main(["--smoke"]) == 0
