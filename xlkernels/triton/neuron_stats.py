"""Per-group neuron statistics in Triton (also used by the fused glu kernel in glu.py).

Grid: (neuron blocks, row chunks). A program walks its rows in (BLOCK_R, BLOCK_I) tiles. A tile whose rows all
share one group id is reduced in registers and added to running float64/int64 accumulators; the accumulators are
flushed with ONE atomic per (group, neuron) when the group changes (a run ends) or the chunk ends. A tile with
mixed ids falls back to per-element atomics. max uses an ordered-int atomic (signed max for values >= 0 and
canonical NaN, unsigned min for negatives), so NaN sticks. tokens are counted with one index_add_ on the host side.
"""
import torch
import triton
import triton.language as tl

from . import grids

NAN_BITS = 0x7FC00000


@triton.jit
def _max_atomic(mx_i32, offs, m, mask):
    """Atomic float max on an int32 view; NaN (canonicalised) wins over everything."""
    bits = m.to(tl.int32, bitcast=True)
    bits = tl.where(m != m, 0x7FC00000, bits)
    tl.atomic_max(mx_i32 + offs, bits, mask=mask & (bits >= 0))
    mx_u32 = mx_i32.to(tl.pointer_type(tl.uint32))
    tl.atomic_min(mx_u32 + offs, bits.to(tl.uint32, bitcast=True), mask=mask & (bits < 0))


@triton.jit
def _flush(g, cols, cmask, I, pos_ptr, sum_ptr, sq_ptr, mx_i32, a_pos, a_sum, a_sq, a_mx):
    offs = g.to(tl.int64) * I + cols
    tl.atomic_add(pos_ptr + offs, a_pos, mask=cmask)
    tl.atomic_add(sum_ptr + offs, a_sum, mask=cmask)
    tl.atomic_add(sq_ptr + offs, a_sq, mask=cmask)
    _max_atomic(mx_i32, offs, a_mx, cmask)


@triton.jit
def _consume(x, g, rmask, cols, cmask, I, pos_ptr, sum_ptr, sq_ptr, mx_i32, a_pos, a_sum, a_sq, a_mx, cur):
    """Fold one (BLOCK_R, BLOCK_I) fp32 tile with row ids g into the running accumulators of group `cur`."""
    gv = tl.where(rmask, g, -1)
    gmax = tl.max(gv, axis=0)
    gmin = tl.min(tl.where(rmask, g, 2147483647), axis=0)
    uniform = gmin == gmax
    if (cur >= 0) & ((gmin != gmax) | (gmax != cur)):  # run ended: one atomic per (group, neuron)
        _flush(cur, cols, cmask, I, pos_ptr, sum_ptr, sq_ptr, mx_i32, a_pos, a_sum, a_sq, a_mx)
        a_pos = tl.zeros_like(a_pos)
        a_sum = tl.zeros_like(a_sum)
        a_sq = tl.zeros_like(a_sq)
        a_mx = tl.full(a_mx.shape, float("-inf"), tl.float32)
        cur = cur * 0 - 1
    valid = (gv >= 0)[:, None] & cmask[None, :]
    x64 = x.to(tl.float64)
    isnan = x != x
    if uniform:
        if gmax >= 0:
            a_pos += tl.sum(tl.where(valid & (x > 0), 1, 0).to(tl.int64), axis=0)
            a_sum += tl.sum(tl.where(valid, x64, 0.0), axis=0)
            a_sq += tl.sum(tl.where(valid, x64 * x64, 0.0), axis=0)
            tmax = tl.max(tl.where(valid & ~isnan, x, float("-inf")), axis=0)
            tnan = tl.max(tl.where(valid & isnan, 1, 0), axis=0) > 0
            a_mx = tl.where(tnan | (a_mx != a_mx), float("nan"), tl.maximum(a_mx, tmax))
            cur = gmax
    else:  # mixed ids in this tile: per-element atomics
        offs = tl.maximum(gv, 0).to(tl.int64)[:, None] * I + cols[None, :]
        tl.atomic_add(pos_ptr + offs, tl.where(x > 0, 1, 0).to(tl.int64), mask=valid)
        tl.atomic_add(sum_ptr + offs, x64, mask=valid)
        tl.atomic_add(sq_ptr + offs, x64 * x64, mask=valid)
        _max_atomic(mx_i32, offs, x, valid)
    return a_pos, a_sum, a_sq, a_mx, cur


@triton.jit
def _start(N, I, ROWS, BLOCK_I: tl.constexpr):
    """This program's columns and row range [r0, r_end), and empty running stats (cur = -1: no run yet)."""
    cols = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    cmask = cols < I
    r0 = tl.program_id(1) * ROWS
    r_end = tl.minimum(r0 + ROWS, N)
    a_pos = tl.zeros([BLOCK_I], tl.int64)
    a_sum = tl.zeros([BLOCK_I], tl.float64)
    a_sq = tl.zeros([BLOCK_I], tl.float64)
    a_mx = tl.full([BLOCK_I], float("-inf"), tl.float32)
    cur = tl.program_id(0) * 0 - 1
    return cols, cmask, r0, r_end, a_pos, a_sum, a_sq, a_mx, cur


@triton.jit
def _stats_kernel(act, ids, pos_ptr, sum_ptr, sq_ptr, mx_i32, N, I, ROWS,
                  BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    cols, cmask, r0, r_end, a_pos, a_sum, a_sq, a_mx, cur = _start(N, I, ROWS, BLOCK_I)
    for r in range(r0, r_end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        g = tl.load(ids + rows, mask=rmask, other=-1).to(tl.int32)
        x = tl.load(act + rows.to(tl.int64)[:, None] * I + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        a_pos, a_sum, a_sq, a_mx, cur = _consume(x, g, rmask, cols, cmask, I, pos_ptr, sum_ptr, sq_ptr, mx_i32,
                                                 a_pos, a_sum, a_sq, a_mx, cur)
    if cur >= 0:
        _flush(cur, cols, cmask, I, pos_ptr, sum_ptr, sq_ptr, mx_i32, a_pos, a_sum, a_sq, a_mx)


def grid_shape(n: int, nn: int, block_r: int, block_i: int, sms):
    """(neuron blocks, row chunks, rows per chunk): enough programs to fill `sms` SMs (a chunk per column block
    when sms is None: the interpreter). Row chunks stay <= 4 * sms, far inside grid axis 1's limit."""
    col_blocks = triton.cdiv(nn, block_i)
    if sms is None:
        return col_blocks, 1, max(n, 1)
    chunks = max(1, min(triton.cdiv(n, block_r), triton.cdiv(4 * sms, col_blocks)))
    rows = triton.cdiv(triton.cdiv(n, chunks), block_r) * block_r
    return col_blocks, triton.cdiv(n, rows), rows


def blocks(nn: int):
    if grids.gpu_shapes():
        return 16, min(128, triton.next_power_of_2(nn))
    return 16, min(1024, triton.next_power_of_2(nn))


def add_tokens(ids: torch.Tensor, tokens: torch.Tensor) -> None:
    keep = ids >= 0
    tokens.index_add_(0, ids.clamp_min(0), keep.to(torch.int64))


def accumulate(act, ids, tokens, positive, sum_, sum_sq, max_) -> None:
    """act (N, I) contiguous, ids (N,) int64; stats tensors updated in place."""
    n, nn = act.shape
    add_tokens(ids, tokens)
    if n == 0:
        return
    br, bi = blocks(nn)
    gx, gy, rows = grid_shape(n, nn, br, bi, grids.sm_count(act.device))
    _stats_kernel[(gx, gy)](act, ids, positive, sum_, sum_sq, max_.view(torch.int32), n, nn, rows,
                            BLOCK_R=br, BLOCK_I=bi, num_warps=4)
