"""GLU with fused neuron stats and intervention in Triton: out = (act(gate) * mul + add) * up.

Forward: same grid and run-based stats accumulation as neuron_stats.py (stats of the pre-intervention act, one
atomic per (group, neuron) per run per program). MODE: 0 no intervention, 1 per-neuron (I,), 2 per-group (G, I)
(rows with id -1 untouched). Backward: element-wise, d up = go * act', d gate = go * up * mul * act'(gate).
Math in fp32 (bf16 inputs are widened on load, which also keeps the interpreter's bf16 arithmetic out).
"""
import torch
import triton
import triton.language as tl

from . import grids
from . import neuron_stats as tns
from .grids import folded_id

GELU_K = 0.7978845608028654


@triton.jit
def _act(x, ACT: tl.constexpr):
    """-> (act(x), s) with act = x * s: silu s = sigmoid(x), gelu_tanh s = sigmoid(2k(x + c x^3))."""
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-x))
    else:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        s = 1.0 / (1.0 + tl.exp(-2.0 * u))
    return x * s, s


@triton.jit
def _iv(ids_g, cols, cmask, rmask, I, mul_ptr, add_ptr, MODE: tl.constexpr):
    """(mul, add) tiles broadcastable to (BLOCK_R, BLOCK_I)."""
    if MODE == 1:
        m = tl.load(mul_ptr + cols, mask=cmask, other=1.0)[None, :]
        b = tl.load(add_ptr + cols, mask=cmask, other=0.0)[None, :]
    else:
        ok = (ids_g >= 0)[:, None] & rmask[:, None] & cmask[None, :]
        offs = tl.maximum(ids_g, 0).to(tl.int64)[:, None] * I + cols[None, :]
        m = tl.load(mul_ptr + offs, mask=ok, other=1.0)
        b = tl.load(add_ptr + offs, mask=ok, other=0.0)
    return m, b


@triton.jit
def _fwd_kernel(gate, up, out, ids, mul_ptr, add_ptr, pos_ptr, sum_ptr, sq_ptr, mx_i32, N, I, ROWS,
                ACT: tl.constexpr, MODE: tl.constexpr, STATS: tl.constexpr, HAS_IDS: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    cols, cmask, r0, r_end, a_pos, a_sum, a_sq, a_mx, cur = tns._start(N, I, ROWS, BLOCK_I)
    for r in range(r0, r_end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * I + cols[None, :]
        x = tl.load(gate + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up + offs, mask=mask, other=0.0).to(tl.float32)
        a, s = _act(x, ACT)
        if HAS_IDS:
            g = tl.load(ids + rows, mask=rmask, other=-1).to(tl.int32)
        else:
            g = tl.zeros([BLOCK_R], tl.int32) - 1
        if STATS:
            a_pos, a_sum, a_sq, a_mx, cur = tns._consume(a, g, rmask, cols, cmask, I, pos_ptr, sum_ptr, sq_ptr,
                                                         mx_i32, a_pos, a_sum, a_sq, a_mx, cur)
        if MODE != 0:
            m, b = _iv(g, cols, cmask, rmask, I, mul_ptr, add_ptr, MODE)
            a = a * m + b
        tl.store(out + offs, (a * u).to(out.dtype.element_ty), mask=mask)
    if STATS:
        if cur >= 0:
            tns._flush(cur, cols, cmask, I, pos_ptr, sum_ptr, sq_ptr, mx_i32, a_pos, a_sum, a_sq, a_mx)


@triton.jit
def _bwd_kernel(go, gate, up, dgate, dup, ids, mul_ptr, add_ptr, N, I, ACT: tl.constexpr, MODE: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    rows = folded_id() * BLOCK_R + tl.arange(0, BLOCK_R)
    cmask = cols < I
    rmask = rows < N  # (also masks the spare programs of a folded grid)
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * I + cols[None, :]
    x = tl.load(gate + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(go + offs, mask=mask, other=0.0).to(tl.float32)
    a, s = _act(x, ACT)
    if ACT == 0:
        d = s * (1.0 + x * (1.0 - s))
    else:
        d = s + 2.0 * x * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    if MODE != 0:
        if MODE == 2:
            g = tl.load(ids + rows, mask=rmask, other=-1).to(tl.int32)
        else:
            g = tl.zeros([BLOCK_R], tl.int32) - 1
        m, b = _iv(g, cols, cmask, rmask, I, mul_ptr, add_ptr, MODE)
        a = a * m + b
        d = d * m
    tl.store(dup + offs, (o * a).to(dup.dtype.element_ty), mask=mask)
    tl.store(dgate + offs, (o * u * d).to(dgate.dtype.element_ty), mask=mask)


def _mode(mul):
    return 0 if mul is None else (1 if mul.dim() == 1 else 2)


def forward(gate, up, activation, ids, mul, add, stats):
    """gate/up (N, I) contiguous; stats None or (tokens, positive, sum, sum_sq, max) updated in place."""
    n, nn = gate.shape
    out = grids.empty_like(gate)
    if stats is not None:
        tns.add_tokens(ids, stats[0])
    if n == 0:
        return out
    mode = _mode(mul)
    br, bi = tns.blocks(nn)
    gx, gy, rows = tns.grid_shape(n, nn, br, bi, grids.sm_count(gate.device))
    dummy = gate  # never dereferenced when its feature is off
    st = stats if stats is not None else (None, dummy, dummy, dummy, dummy)
    mx = st[4].view(torch.int32) if stats is not None else dummy
    _fwd_kernel[(gx, gy)](gate, up, out, ids if ids is not None else dummy,
                          mul if mul is not None else dummy, add if add is not None else dummy,
                          st[1], st[2], st[3], mx, n, nn, rows,
                          ACT=0 if activation == "silu" else 1, MODE=mode, STATS=stats is not None,
                          HAS_IDS=ids is not None, BLOCK_R=br, BLOCK_I=bi, num_warps=4)
    return out


def bwd_grid(n, nn, block_r, block_i):
    """Column blocks on axis 0, row blocks folded over axes 1 and 2."""
    return grids.fold(triton.cdiv(nn, block_i), triton.cdiv(n, block_r))


def backward(grad_out, gate, up, activation, ids, mul, add):
    n, nn = gate.shape
    dgate, dup = grids.empty_like(gate), grids.empty_like(up)
    if n == 0:
        return dgate, dup
    br, bi = tns.blocks(nn)
    if not grids.gpu_shapes():  # few, large programs
        br = max(16, triton.next_power_of_2(min(n, 128)))
    _bwd_kernel[bwd_grid(n, nn, br, bi)](
        grad_out, gate, up, dgate, dup, ids if ids is not None else gate, mul if mul is not None else gate,
        add if add is not None else gate, n, nn, ACT=0 if activation == "silu" else 1, MODE=_mode(mul),
        BLOCK_R=br, BLOCK_I=bi, num_warps=4)
    return dgate, dup
