"""head_steer in Triton (fallback where the CUDA extension is not built): out = gate * o + shift, exactly shift
where gate == 0 (o is not read there). Math in fp32. Backward: one program per (b*H + h, chunk of t) sums
dO and dO*o over its rows and adds them with fp32 atomics; grad_o = gate * dO (0 where gate == 0).
"""
import torch
import triton
import triton.language as tl

from . import grids


@triton.jit
def _fwd_kernel(o, out, gate, shift, R, T, H, D, sb, st, sh, gate_bs, shift_bs,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    mask = rmask[:, None] & (cols < D)[None, :]
    r = rows.to(tl.int64)
    h = r % H
    t = (r // H) % T
    b = r // (H * T)
    g = tl.load(gate + b * gate_bs + h, mask=rmask, other=1.0)
    x = tl.load(o + (b * sb + t * st + h * sh)[:, None] + cols[None, :], mask=mask & (g != 0.0)[:, None],
                other=0.0).to(tl.float32)
    s = tl.load(shift + (b * shift_bs + h * D)[:, None] + cols[None, :], mask=mask, other=0.0)
    y = tl.where((g == 0.0)[:, None], s, g[:, None] * x + s)
    tl.store(out + r[:, None] * D + cols[None, :], y.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(dout, o, gate, grad_o, ggate, gshift, T, H, D, sb, st, sh, gate_bs, ggate_bs, gshift_bs, CHUNK,
                NEED_O: tl.constexpr, NEED_G: tl.constexpr, NEED_S: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    g = tl.load(gate + b * gate_bs + h)
    acc_s = tl.zeros([BLOCK_D], tl.float32)
    acc_g = tl.zeros([BLOCK_D], tl.float32)
    t0 = tl.program_id(1) * CHUNK
    t_end = tl.minimum(t0 + CHUNK, T)
    for tt in range(t0, t_end, BLOCK_T):
        ts = tt + tl.arange(0, BLOCK_T)
        mask = (ts < t_end)[:, None] & cmask[None, :]
        offs = ((b * T + ts.to(tl.int64)) * H + h)[:, None] * D + cols[None, :]
        dy = tl.load(dout + offs, mask=mask, other=0.0).to(tl.float32)
        if NEED_O:
            tl.store(grad_o + offs, tl.where(g == 0.0, 0.0, g * dy).to(grad_o.dtype.element_ty), mask=mask)
        if NEED_S:
            acc_s += tl.sum(dy, axis=0)
        if NEED_G:
            x = tl.load(o + (b * sb + ts.to(tl.int64) * st + h * sh)[:, None] + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            if g == 0.0:  # garbage at skipped heads counts as 0
                x = tl.where(tl.abs(x) < float("inf"), x, 0.0)
            acc_g += tl.sum(dy * x, axis=0)
    if NEED_S:
        tl.atomic_add(gshift + b * gshift_bs + h * D + cols, acc_s, mask=cmask)
    if NEED_G:
        tl.atomic_add(ggate + b * ggate_bs + h, tl.sum(acc_g, axis=0))


def _params(o, gate, shift):
    """fp32 contiguous gate (ones if None) and shift (zeros if None) with their batch strides."""
    B, T, H, D = o.shape
    g = torch.ones(H, device=o.device) if gate is None else gate.float().contiguous()
    s = torch.zeros(H, D, device=o.device) if shift is None else shift.float().contiguous()
    return g, (H if g.dim() == 2 else 0), s, (H * D if s.dim() == 3 else 0)


def fwd_grid(rows, block_r):
    """Row blocks on axis 0 (one column block: BLOCK_D covers D)."""
    return (triton.cdiv(rows, block_r), 1)


def bwd_grid(B, H, T, block_t, sms):
    """-> (grid, rows per chunk): (b, h) pairs on axis 0, chunks of t (enough to fill `sms` SMs) on axis 1."""
    chunks = max(1, min(triton.cdiv(4 * (sms or 1), B * H), triton.cdiv(T, block_t)))
    chunk = triton.cdiv(triton.cdiv(T, chunks), block_t) * block_t
    return (B * H, triton.cdiv(T, chunk)), chunk


def forward(o, gate, shift):
    B, T, H, D = o.shape
    out = grids.empty(B, T, H, D, dtype=o.dtype, device=o.device)
    if out.numel() == 0:
        return out
    g, gbs, s, sbs = _params(o, gate, shift)
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_R = max(1, min(64 if grids.gpu_shapes() else 16, 4096 // BLOCK_D))
    grid = fwd_grid(B * T * H, BLOCK_R)
    _fwd_kernel[grid](o, out, g, s, B * T * H, T, H, D, o.stride(0), o.stride(1), o.stride(2), gbs, sbs,
                      BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    return out


def backward(grad, o, gate, shift, need_o, need_gate, need_shift):
    """-> (grad_o | empty, grad_gate (gate's shape, dtype) | empty, grad_shift | empty)."""
    B, T, H, D = o.shape
    dev = o.device
    f32 = dict(dtype=torch.float32, device=dev)
    need_gate = need_gate and gate is not None
    need_shift = need_shift and shift is not None
    grad = grad.contiguous()
    go = grids.empty(B, T, H, D, dtype=o.dtype, device=dev) if need_o else torch.empty(0, dtype=o.dtype, device=dev)
    gg = torch.zeros(gate.shape, **f32) if need_gate else torch.empty(0, **f32)
    gs = torch.zeros(shift.shape, **f32) if need_shift else torch.empty(0, **f32)
    if (need_o or need_gate or need_shift) and B * H * T * D > 0:
        g, gbs, _, _ = _params(o, gate, None)
        BLOCK_D = triton.next_power_of_2(D)
        BLOCK_T = max(1, min(32, 4096 // BLOCK_D))
        grid, chunk = bwd_grid(B, H, T, BLOCK_T, grids.sm_count(dev))
        _bwd_kernel[grid](grad, o, g, go, gg, gs, T, H, D, o.stride(0), o.stride(1), o.stride(2), gbs,
                          H if need_gate and gate.dim() == 2 else 0, H * D if need_shift and shift.dim() == 3 else 0,
                          chunk, NEED_O=need_o, NEED_G=need_gate, NEED_S=need_shift, BLOCK_T=BLOCK_T,
                          BLOCK_D=BLOCK_D)
    if need_gate:
        gg = gg.to(gate.dtype)
    if need_shift:
        gs = gs.to(shift.dtype)
    return go, gg, gs
