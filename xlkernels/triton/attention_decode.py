"""Split-KV flash-decoding for short queries (T <= DECODE_MAX_T), with the steering epilogue in the merge."""
import functools

import torch
import triton
import triton.language as tl

from . import grids
from .attention_common import _fwd_factor, _fwd_inner, _key_ranges
from .grids import folded_id

# One program per (key split, batch, pack of PACK query heads sharing a KV head): the M rows are
# (head, position) pairs, r -> head h0 + r // T, position r % T, so K/V are read once per GQA group.


@triton.jit
def _pack_rows(bp, H, T, PACK: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Batch b and first head h0 of program bp; its BLOCK_M rows r = (head hrow, query trow) (valid: rmask)
    and head-dim offsets (valid: dmask); b, h0, hrow and trow in int64."""
    npack = H // PACK
    b = (bp // npack).to(tl.int64)
    h0 = (bp % npack).to(tl.int64) * PACK
    r = tl.arange(0, BLOCK_M)
    hrow = h0 + r // T
    trow = (r % T).to(tl.int64)
    rmask = r < PACK * T
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_D
    return b, h0, r, hrow, trow, rmask, offs_d, dmask


@triton.jit
def _split_kernel(Q, K, V, Part, Gate, Kpm,
                  sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sgb, sgh, skpb,
                  NPROG, H, GROUP, T, S, window, scale_log2, sc_scale, sc_log2, split_len,
                  HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  HAS_KPM: tl.constexpr, HAS_GATE: tl.constexpr, SKIP_ZERO: tl.constexpr, UPCAST: tl.constexpr,
                  PREC: tl.constexpr, PACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Partial attention of PACK heads x T rows (<= BLOCK_M) over keys [split*split_len, (split+1)*split_len).
    Stores, for the PACK * T valid rows only, the normalised partial output (HEAD_D columns) and its LSE (log2;
    -inf where the split saw no key) into Part: output row i = (b*H + h)*T + t, split sp at (i*NSPLIT + sp)."""
    sp = tl.program_id(0)
    bp = folded_id()
    if bp >= NPROG:
        return
    nsplit = tl.num_programs(0)
    b, h0, r, hrow, trow, rmask, offs_d, dmask = _pack_rows(bp, H, T, PACK, HEAD_D, BLOCK_M, BLOCK_D)
    hk = h0 // GROUP
    off = S - T
    lo, _a, _b, hi = _key_ranges(0, S, off, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    start = tl.maximum(sp * split_len, lo)
    stop = tl.minimum((sp + 1) * split_len, hi)
    stop = tl.maximum(stop, start)
    if HAS_GATE:
        if SKIP_ZERO:  # every head of the pack masked: no key loop
            g = tl.load(Gate + b * sgb + hrow * sgh, mask=rmask, other=0.0).to(tl.float32)
            stop = tl.where(tl.max(tl.abs(g), 0) == 0.0, start, stop)
    q = tl.load(Q + b * sqb + hrow[:, None] * sqh + trow[:, None] * sqt + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    fac = _fwd_factor(scale_log2, sc_log2, HAS_SOFTCAP)  # (scale_log2: attention.forward_scale's value)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K + b * skb + hk * skh, V + b * svb + hk * svh, Kpm + b * skpb,
                               sks, svs, start, stop, r % T, offs_d, S, off, window, fac, sc_scale,
                               sc_log2, True, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_SOFTCAP, HEAD_D, BLOCK_N, BLOCK_D,
                               UPCAST, PREC)
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    nrows = (tl.zeros([], tl.int64) + NPROG) * (PACK * T)  # (NPROG may arrive as the constant 1)
    row = (bp.to(tl.int64) * (PACK * T) + r) * nsplit + sp
    tl.store(Part + row[:, None] * HEAD_D + offs_d[None, :], o, mask=rmask[:, None] & dmask[None, :])
    tl.store(Part + nrows * nsplit * HEAD_D + row, lse, mask=rmask)


@triton.jit
def _combine_kernel(Part, Out, ORaw, Lse, Gate, Shift, NSPLIT,
                    sob, soh, sot, srb, srh, srt, sgb, sgh, ssb, ssh, H, T,
                    HEAD_D: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr, SKIP_ZERO: tl.constexpr,
                    SAVE_RAW: tl.constexpr, SPLIT_P2: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (output row i = (b*H + h)*T + t, block of BLOCK_D columns): all splits' LSEs in one
    vector (padded to SPLIT_P2, padding = -inf), then one weighted sum of the partial outputs."""
    i = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK_D
    nrows = tl.num_programs(0).to(tl.int64)
    t = i % T
    bh = i // T
    h = bh % H
    b = bh // H
    sp = tl.arange(0, SPLIT_P2)
    smask = sp < NSPLIT
    lse_s = tl.load(Part + nrows * NSPLIT * HEAD_D + i * NSPLIT + sp, mask=smask, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # no split saw a key: every weight 0
    w = tl.exp2(lse_s - m_safe)
    l = tl.sum(w, 0)
    offs_c = c0 + tl.arange(0, BLOCK_D)
    cmask = offs_c < HEAD_D
    o_s = tl.load(Part + (i * NSPLIT + sp)[:, None] * HEAD_D + offs_c[None, :], mask=smask[:, None] & cmask[None, :],
                  other=0.0)
    empty = l == 0.0
    o_raw = tl.sum(w[:, None] * o_s, 0) / tl.where(empty, 1.0, l)
    out = o_raw
    if HAS_GATE:
        g = tl.load(Gate + b * sgb + h * sgh).to(tl.float32)
        out = o_raw * g
        if SKIP_ZERO:  # hard head mask: exactly shift, whatever the packed rows computed
            out = tl.where(g == 0.0, 0.0, out)
    if HAS_SHIFT:
        out += tl.load(Shift + b * ssb + h * ssh + offs_c, mask=cmask, other=0.0).to(tl.float32)
    tl.store(Out + b * sob + h * soh + t * sot + offs_c, out.to(Out.dtype.element_ty), mask=cmask)
    if SAVE_RAW:
        tl.store(ORaw + b * srb + h * srh + t * srt + offs_c, o_raw.to(ORaw.dtype.element_ty), mask=cmask)
    if tl.program_id(1) == 0:
        tl.store(Lse + i, tl.where(empty, float("inf"), m_safe + tl.log2(tl.where(empty, 1.0, l))))


def splits(nprog, S, block_n, sms):
    """(key splits, keys per split) for nprog programs on a GPU with `sms` SMs (None: the interpreter's 4)."""
    nblocks = triton.cdiv(S, block_n)
    n = min(nblocks, 4) if sms is None else min(nblocks, triton.cdiv(2 * sms, nprog), 128)
    split_len = triton.cdiv(nblocks, max(1, n)) * block_n
    return triton.cdiv(S, split_len), split_len


def decode_grids(nprog, nsplit, nrows=1, ncols=1):
    """Grids of the split kernel (splits on axis 0, packs folded over axes 1 and 2) and the combine kernel
    (output rows on axis 0, column blocks on axis 1)."""
    return grids.fold(nsplit, nprog), (nrows, ncols)


COMBINE_TILE = 4096  # fp32 partial-output elements per combine program (32 per thread at 4 warps)


@functools.lru_cache(maxsize=1024)
def plan(B, H, T, Hkv, S, D, block_d, gpu, sms):
    """Launch plan of one decode shape (cached: a decode loop calls this with the same shape class each step):
    pack, BLOCK_M, BLOCK_N, packs, splits, keys per split, the two grids, SPLIT_P2, combine BLOCK_D and warps,
    scratch elements."""
    group = H // Hkv
    pack = group if group * T <= (64 if block_d <= 128 else 16) else 1
    block_m = max(16, triton.next_power_of_2(pack * T))
    block_n = 64 if gpu and block_d <= 128 else 32
    nprog = B * H // pack
    nsplit, split_len = splits(nprog, S, block_n, sms)
    split_p2 = triton.next_power_of_2(nsplit)
    block_c = min(block_d, max(16, COMBINE_TILE // split_p2))
    split_grid, combine_grid = decode_grids(nprog, nsplit, B * H * T, triton.cdiv(D, block_c))
    warps = 4 if split_p2 * block_c >= 2048 else 2
    scratch = B * H * T * nsplit * (D + 1)  # valid rows only: partial outputs, then their LSEs
    return pack, block_m, block_n, nprog, nsplit, split_len, split_grid, split_p2, block_c, combine_grid, warps, scratch


_SCRATCH = {}


def scratch(n, device):
    """n fp32 of scratch for the partials, from a buffer kept per (device, stream) and grown on demand (no
    allocation per call; kernels on one stream run in order, so reuse is safe). Fresh NaN under grids.POISON, so
    a partial row the split kernel fails to write shows; fresh during CUDA graph capture (the graph's pool must
    own its scratch: a cached buffer could be replaced, and freed, while a graph still writes to it)."""
    cuda = device.type == "cuda"
    if grids.POISON or (cuda and torch.cuda.is_current_stream_capturing()):
        return grids.empty(n, dtype=torch.float32, device=device)
    key = (device, torch.cuda.current_stream(device).stream_id if cuda else 0)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH[key] = torch.empty(max(n, 2 * buf.numel() if buf is not None else 0), dtype=torch.float32,
                                          device=device)
    return buf


_SPLIT_CONSTS = ("HEAD_D", "CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_KPM", "HAS_GATE", "UPCAST", "PREC", "BLOCK_D")


def decode(q, k, v, out, o_r, lse, g, gs, sh, ss, kp, kps, B, H, T, Hkv, S, consts, scal, skip, save_raw):
    """Flash-decoding: split the keys over programs (each takes the query heads of one KV head, so K/V are read
    once per group), then merge the partial softmaxes and apply the gate/shift epilogue."""
    D = consts["HEAD_D"]
    (pack, block_m, block_n, nprog, nsplit, split_len, split_grid, split_p2, block_c, combine_grid, warps,
     n) = plan(B, H, T, Hkv, S, D, consts["BLOCK_D"], grids.gpu_shapes(), grids.sm_count(q.device))
    part = scratch(n, q.device)
    _split_kernel[split_grid](
        q, k, v, part, g, kp, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), gs[0], gs[1], kps, nprog, H, H // Hkv, T, S, scal["window"],
        scal["scale_log2"], scal["sc_scale"], scal["sc_log2"], split_len, **{c: consts[c] for c in _SPLIT_CONSTS},
        SKIP_ZERO=skip, PACK=pack, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=3)
    _combine_kernel[combine_grid](
        part, out, o_r, lse, g, sh, nsplit, out.stride(0), out.stride(1), out.stride(2),
        o_r.stride(0), o_r.stride(1), o_r.stride(2), gs[0], gs[1], ss[0], ss[1], H, T,
        HEAD_D=D, HAS_GATE=consts["HAS_GATE"], HAS_SHIFT=sh is not q, SKIP_ZERO=skip,
        SAVE_RAW=save_raw, SPLIT_P2=split_p2, BLOCK_D=block_c, num_warps=warps)
