"""Per-group neuron statistics in Triton (also used by the fused glu kernel in glu.py).

Grid: (neuron blocks, row chunks). A program walks its rows in (BLOCK_R, BLOCK_I) tiles. A tile whose valid rows
(id >= 0; padding rows are masked out) all share one group id is reduced in registers and added to running
float64/int64 accumulators; the accumulators are flushed with ONE atomic per (group, neuron) when the group changes
(a run ends) or the chunk ends. A tile holding two or more groups flushes the run and adds its rows one by one
(one atomic per neuron and field per valid row). tile_paths() counts these cases on the CPU for given ids.
max uses an ordered-int atomic (signed max for values >= 0 and canonical NaN, unsigned min for negatives), so NaN
sticks. tokens are counted with one index_add_ on the host side.

Precision: inputs are widened to fp32. A uniform tile's column sums (and sums of squares) are taken in fp32 over
its BLOCK_R rows, then added to float64 running accumulators (one fp32 -> fp64 conversion per column and tile
instead of one per element; mixed tiles add each row's exact fp32 value in float64). The fp32 partials restart
every tile, so the error does not grow with the number of tokens: per entry it is at most
BLOCK_R * 2**-24 * sum|x| (sum_sq: * sum x^2; rounding of the tile sums and of the squares) plus the float64
part (N / BLOCK_R + flushes) * 2**-53 * sum|x|. With BLOCK_R = 16 that is 9.5e-7 + 7e-9 of sum|x| after 1e9 tokens
in one call, in the worst case; random-sign rounding gives about 1e-8. Squares overflow to inf in fp32 above
|x| = 1.8e19 (activations never come near). The CPU and CUDA C++ kernels keep every element in float64.
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
    """Fold one (BLOCK_R, BLOCK_I) fp32 tile with row ids g into the running accumulators of group `cur`.

    The tile's min/max are taken over its valid ids only (padding rows, id -1, and rows past the end take no
    part and are masked out of the sums), so a tile of one language plus padding stays on the uniform path:
    reduced in registers and added to the run. A tile with two or more languages flushes the run and then adds
    its rows one at a time (row i extracted by a masked column reduction, then one atomic per neuron and field,
    in row order); that keeps the live registers to a few column vectors (no (BLOCK_R, BLOCK_I) tensors of
    64-bit pointers and fp64 values, which spilled at 255 registers)."""
    gv = tl.where(rmask, g, -1)
    gmax = tl.max(gv, axis=0)
    gmin = tl.min(tl.where(gv >= 0, gv, 2147483647), axis=0)  # over valid ids only
    if gmax >= 0:
        if gmin == gmax:  # one language (plus padding): the uniform path
            if gmax != cur:
                if cur >= 0:  # run ended: one atomic per (group, neuron)
                    _flush(cur, cols, cmask, I, pos_ptr, sum_ptr, sq_ptr, mx_i32, a_pos, a_sum, a_sq, a_mx)
                a_pos = tl.zeros_like(a_pos)
                a_sum = tl.zeros_like(a_sum)
                a_sq = tl.zeros_like(a_sq)
                a_mx = tl.full(a_mx.shape, float("-inf"), tl.float32)
                cur = gmax
            sel = (gv >= 0)[:, None]
            isnan = x != x
            xs = tl.where(sel, x, 0.0)
            a_pos += tl.sum(tl.where(sel & (x > 0), 1, 0), axis=0).to(tl.int64)
            a_sum += tl.sum(xs, axis=0).to(tl.float64)  # fp32 over the tile's rows, folded into float64
            a_sq += tl.sum(xs * xs, axis=0).to(tl.float64)
            tmax = tl.max(tl.where(sel & ~isnan, x, float("-inf")), axis=0)
            tnan = tl.max(tl.where(sel & isnan, 1, 0), axis=0) > 0
            a_mx = tl.where(tnan | (a_mx != a_mx), float("nan"), tl.maximum(a_mx, tmax))
        else:  # several languages in this tile: flush the run, then row by row
            if cur >= 0:
                _flush(cur, cols, cmask, I, pos_ptr, sum_ptr, sq_ptr, mx_i32, a_pos, a_sum, a_sq, a_mx)
                a_pos = tl.zeros_like(a_pos)
                a_sum = tl.zeros_like(a_sum)
                a_sq = tl.zeros_like(a_sq)
                a_mx = tl.full(a_mx.shape, float("-inf"), tl.float32)
                cur = cur * 0 - 1
            ridx = tl.arange(0, x.shape[0])
            for i in range(x.shape[0]):
                gi = tl.max(tl.where(ridx == i, gv, -1), axis=0)
                if gi >= 0:
                    xr = tl.sum(tl.where((ridx == i)[:, None], x, 0.0), axis=0)
                    xr64 = xr.to(tl.float64)
                    _flush(gi, cols, cmask, I, pos_ptr, sum_ptr, sq_ptr, mx_i32, (xr > 0).to(tl.int64), xr64,
                           xr64 * xr64, xr)
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


def tile_paths(ids: torch.Tensor, block_r: int = 16, rows_per_chunk: int = None) -> dict:
    """Simulate on the CPU how the stats kernels classify the BLOCK_R-row tiles of one column block for these
    row ids (rows in chunks of rows_per_chunk as grid_shape makes them; one chunk when None). Per tile:
      mixed_with_padding: its ids, padding (-1) included, are not all equal: the kernel before 2026-11-30 sent
                          every such tile to per-element fp64 atomics;
      multi_group:        it holds two or more valid ids: the current kernel adds it row by row (one atomic per
                          neuron and field per valid row), every other tile stays on the uniform path;
      flushes:            run flushes of the current kernel (one atomic per neuron and field each).
    -> counts and the fractions of tiles."""
    ids = ids.reshape(-1).to(torch.int64).cpu()
    n = ids.numel()
    rows_per_chunk = rows_per_chunk or max(n, 1)
    tiles = mixed = multi = flushes = 0
    for c0 in range(0, n, rows_per_chunk):
        c1 = min(c0 + rows_per_chunk, n)
        cur = -1
        for r in range(c0, c1, block_r):
            t = ids[r:min(r + block_r, c1)]
            tiles += 1
            mixed += int(t.min() != t.max())
            valid = t[t >= 0]
            if valid.numel() == 0:
                continue
            if valid.min() == valid.max():
                flushes += int(cur >= 0 and cur != int(valid[0]))
                cur = int(valid[0])
            else:
                multi += 1
                flushes += int(cur >= 0)
                cur = -1
        flushes += int(cur >= 0)
    return dict(tiles=tiles, mixed_with_padding=mixed, multi_group=multi, flushes=flushes,
                frac_mixed_with_padding=mixed / max(tiles, 1), frac_multi_group=multi / max(tiles, 1))
