"""Split-KV flash-decoding for short queries (T <= DECODE_MAX_T), with the steering epilogue in the merge."""
import torch
import triton
import triton.language as tl

from . import grids
from .attention import _empty, _fwd_inner, _key_ranges
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
def _split_kernel(Q, K, V, Acc, Ml, Gate, Kpm,
                  sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sgb, sgh, skpb,
                  NPROG, H, GROUP, T, S, window, scale_log2, sc_scale, sc_log2, split_len,
                  HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  HAS_KPM: tl.constexpr, HAS_GATE: tl.constexpr, SKIP_ZERO: tl.constexpr, UPCAST: tl.constexpr,
                  PREC: tl.constexpr, PACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Partial attention of PACK heads x T rows (<= BLOCK_M) over keys [split*split_len, (split+1)*split_len)."""
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
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K + b * skb + hk * skh, V + b * svb + hk * svh, Kpm + b * skpb,
                               sks, svs, start, stop, r % T, offs_d, S, off, window, scale_log2, sc_scale,
                               sc_log2, True, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_SOFTCAP, HEAD_D, BLOCK_N, BLOCK_D,
                               UPCAST, PREC)
    row = (bp.to(tl.int64) * nsplit + sp) * BLOCK_M + r
    tl.store(Acc + row[:, None] * BLOCK_D + offs_d[None, :], acc)
    tl.store(Ml + row * 2, m_i)
    tl.store(Ml + row * 2 + 1, l_i)


@triton.jit
def _combine_kernel(Acc, Ml, Out, ORaw, Lse, Gate, Shift, NSPLIT,
                    sob, soh, sot, srb, srh, srt, sgb, sgh, ssb, ssh, H, T,
                    HEAD_D: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr, SKIP_ZERO: tl.constexpr,
                    SAVE_RAW: tl.constexpr, PACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bp = tl.program_id(0).to(tl.int64)
    b, h0, r, hrow, trow, rmask, offs_d, dmask = _pack_rows(bp, H, T, PACK, HEAD_D, BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for sp in range(0, NSPLIT):
        m_i = tl.maximum(m_i, tl.load(Ml + ((bp * NSPLIT + sp) * BLOCK_M + r) * 2))
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for sp in range(0, NSPLIT):
        row = (bp * NSPLIT + sp) * BLOCK_M + r
        w = tl.exp2(tl.load(Ml + row * 2) - m_safe)
        l_i += w * tl.load(Ml + row * 2 + 1)
        acc += w[:, None] * tl.load(Acc + row[:, None] * BLOCK_D + offs_d[None, :])
    empty = l_i == 0.0
    o_raw = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_safe + tl.log2(tl.where(empty, 1.0, l_i)))
    out = o_raw
    if HAS_GATE:
        g = tl.load(Gate + b * sgb + hrow * sgh, mask=rmask, other=0.0).to(tl.float32)
        out = o_raw * g[:, None]
        if SKIP_ZERO:  # hard head mask: exactly shift, whatever the packed rows computed
            out = tl.where(g[:, None] == 0.0, 0.0, out)
    omask = rmask[:, None] & dmask[None, :]
    if HAS_SHIFT:
        out += tl.load(Shift + b * ssb + hrow[:, None] * ssh + offs_d[None, :], mask=omask, other=0.0).to(tl.float32)
    tl.store(Out + b * sob + hrow[:, None] * soh + trow[:, None] * sot + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=omask)
    if SAVE_RAW:
        tl.store(ORaw + b * srb + hrow[:, None] * srh + trow[:, None] * srt + offs_d[None, :],
                 o_raw.to(ORaw.dtype.element_ty), mask=omask)
    tl.store(Lse + (b * H + hrow) * T + trow, lse, mask=rmask)


def splits(nprog, S, block_n, sms):
    """(key splits, keys per split) for nprog programs on a GPU with `sms` SMs (None: the interpreter's 4)."""
    nblocks = triton.cdiv(S, block_n)
    n = min(nblocks, 4) if sms is None else min(nblocks, triton.cdiv(2 * sms, nprog), 128)
    split_len = triton.cdiv(nblocks, max(1, n)) * block_n
    return triton.cdiv(S, split_len), split_len


def decode_grids(nprog, nsplit):
    """Grids of the split kernel (splits on axis 0, packs folded over axes 1 and 2) and the combine kernel."""
    return grids.fold(nsplit, nprog), (nprog,)


def decode(q, k, v, out, o_r, lse, g, gs, sh, ss, kp, kps, B, H, T, Hkv, S, consts, scal, skip, save_raw):
    """Flash-decoding: split the keys over programs (each takes the query heads of one KV head, so K/V are read
    once per group), then merge the partial softmaxes and apply the gate/shift epilogue."""
    group = H // Hkv
    block_d = consts["BLOCK_D"]
    pack = group if group * T <= (64 if block_d <= 128 else 16) else 1
    block_m = max(16, triton.next_power_of_2(pack * T))
    block_n = 64 if grids.gpu_shapes() and block_d <= 128 else 32
    nprog = B * H // pack
    nsplit, split_len = splits(nprog, S, block_n, grids.sm_count(q.device))
    split_grid, combine_grid = decode_grids(nprog, nsplit)
    acc = _empty(nprog * nsplit * block_m, block_d, dtype=torch.float32, device=q.device)
    ml = _empty(nprog * nsplit * block_m, 2, dtype=torch.float32, device=q.device)
    c = {n: consts[n] for n in ("HEAD_D", "CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_KPM", "HAS_GATE", "UPCAST",
                                "PREC", "BLOCK_D")}
    extra = {"num_warps": 4, "num_stages": 3}  # (the interpreter ignores these)
    _split_kernel[split_grid](
        q, k, v, acc, ml, g, kp, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), gs[0], gs[1], kps, nprog, H, group, T, S, scal["window"],
        scal["scale_log2"], scal["sc_scale"], scal["sc_log2"], split_len, **c, SKIP_ZERO=skip, PACK=pack,
        BLOCK_M=block_m, BLOCK_N=block_n, **extra)
    _combine_kernel[combine_grid](
        acc, ml, out, o_r, lse, g, sh, nsplit, out.stride(0), out.stride(1), out.stride(2),
        o_r.stride(0), o_r.stride(1), o_r.stride(2), gs[0], gs[1], ss[0], ss[1], H, T,
        HEAD_D=consts["HEAD_D"], HAS_GATE=consts["HAS_GATE"], HAS_SHIFT=sh is not q, SKIP_ZERO=skip,
        SAVE_RAW=save_raw, PACK=pack, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)


