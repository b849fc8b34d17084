"""Steered flash attention in Triton: forward, split-KV decode, FlashAttention-2 backward.

Forward (per query block of one (b,h)): online softmax in base 2 (log2e folded into the scale), causal /
sliding-window block skipping (only boundary blocks apply the position mask), then the fused epilogue
out = gate*o_raw + shift. A head with gate == 0 that needs no gradient runs no key loop at all.
Backward: o_raw and dO give Delta_raw = rowsum(dO*O_raw) once (preprocess kernel, which also accumulates
d gate = sum_t Delta_raw and d shift = sum_t dO). Since dO_raw = gate*dO and Delta = gate*Delta_raw, every
gradient of q/k/v is gate times the unsteered one: dV = g P^T dO, dS = g P (dO V^T - Delta_raw).
dK/dV: one program per key block and KV head, looping over the query heads of its GQA group (no K/V repeat,
no atomics). dQ: one program per query block and head. The LSE is stored (log2 units), no TxS matrix.
Under TRITON_INTERPRET=1, bf16 loads are upcast to fp32 (the interpreter's bf16 arithmetic is wrong) and
autotuning uses a single config.
"""
import functools

import torch
import triton
import triton.language as tl

from ..backends import interpreting

LOG2E = 1.4426950408889634
INTERP = interpreting()
POISON = False  # tests set this: every output buffer starts as NaN, so each element must be written


def _empty(*shape, dtype, device):
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_like(x):
    return torch.full_like(x, float("nan")) if POISON else torch.empty_like(x)


@triton.jit
def _tanh(x):
    a = tl.abs(x)
    e = tl.exp2(a * -2.885390081777927)  # exp(-2|x|)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    y2 = x * x  # Taylor series where 1 - e would cancel
    small = x * (1.0 + y2 * (-0.3333333333333333 + y2 * (0.13333333333333333 + y2 * (
        -0.05396825396825397 + y2 * (0.021869488536155203 + y2 * (-0.008863235529902197
                                                                 + y2 * 0.003592128036572481))))))
    return tl.where(a < 0.3, small, big)


@triton.jit
def _scores(q, kT, scale_log2, sc_scale, sc_log2, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr):
    """-> (scores in log2 units, tanh value or None)."""
    qk = tl.dot(q, kT, input_precision=PREC)
    if HAS_SOFTCAP:
        t = _tanh(qk * sc_scale)
        return t * sc_log2, t
    else:
        return qk * scale_log2, qk


@triton.jit
def _pos_mask(offs_m, offs_n, S, off, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(BM,BN) visibility from key bounds and causal/window position rules. off = S - T."""
    p = offs_m[:, None] + off
    j = offs_n[None, :]
    ok = j < S
    if CAUSAL or HAS_WINDOW:
        ok = ok & (j <= p)
    if HAS_WINDOW:
        ok = ok & (j > p - window)
    return ok


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, kp_base, sks, svs, start, stop, offs_m, offs_d, S, off, window,
               scale_log2, sc_scale, sc_log2,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               UPCAST: tl.constexpr, PREC: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    dmask = offs_d < HEAD_D
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + offs_n0
        if MASK:
            nmask = offs_n < S
            kT = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None], mask=nmask[None, :] & dmask[:, None],
                         other=0.0)
            v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :], mask=nmask[:, None] & dmask[None, :],
                        other=0.0)
        else:
            kT = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None], mask=dmask[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :], mask=dmask[None, :], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
            v = v.to(tl.float32)
        s, t = _scores(q, kT, scale_log2, sc_scale, sc_log2, HAS_SOFTCAP, PREC)
        if MASK:
            s = tl.where(_pos_mask(offs_m, offs_n, S, off, window, CAUSAL, HAS_WINDOW), s, float("-inf"))
        if HAS_KPM:
            if MASK:
                kp = tl.load(kp_base + offs_n, mask=offs_n < S, other=0)
            else:
                kp = tl.load(kp_base + offs_n)
            s = tl.where(kp[None, :] != 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
        if MASK or HAS_KPM:  # rows with no visible key yet: keep m = -inf, subtract 0
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _key_ranges(m0, S, off, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr):
    """Key-block ranges for query rows [m0, m0+BLOCK_M): [lo, full_lo) masked, [full_lo, full_hi) fully
    visible, [full_hi, hi) masked."""
    p_min = m0 + off
    p_max = m0 + BLOCK_M - 1 + off
    lo = 0
    hi = S
    full_lo = 0
    full_hi = (S // BLOCK_N) * BLOCK_N
    if CAUSAL or HAS_WINDOW:
        hi = tl.minimum(tl.maximum(p_max + 1, 0), S)
        full_hi = tl.minimum(full_hi, (tl.maximum(p_min + 1, 0) // BLOCK_N) * BLOCK_N)
    if HAS_WINDOW:
        lo = (tl.maximum(p_min - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(p_max - window + 1, 0), BLOCK_N) * BLOCK_N
    lo = tl.minimum(lo, hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _fwd_kernel(Q, K, V, Out, ORaw, Lse, Gate, Shift, Kpm,
                sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot, srb, srh, srt,
                sgb, sgh, ssb, ssh, skpb,
                H, GROUP, T, S, window, scale_log2, sc_scale, sc_log2, T_BUCKET, S_BUCKET,
                HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_KPM: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr, SKIP_ZERO: tl.constexpr,
                SAVE_RAW: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    off = S - T
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < T
    dmask = offs_d < HEAD_D

    g = 1.0
    if HAS_GATE:
        g = tl.load(Gate + b * sgb + h * sgh).to(tl.float32)
    lo, full_lo, full_hi, hi = _key_ranges(m0, S, off, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    if SKIP_ZERO:  # hard head mask: no key loop at all
        hi = tl.where(g == 0.0, lo, hi)
        full_lo = tl.minimum(full_lo, hi)
        full_hi = tl.minimum(full_hi, hi)

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    kp_base = Kpm + b * skpb
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, kp_base, sks, svs, lo, full_lo, offs_m, offs_d,
                               S, off, window, scale_log2, sc_scale, sc_log2, True, CAUSAL, HAS_WINDOW, HAS_KPM,
                               HAS_SOFTCAP, HEAD_D, BLOCK_N, BLOCK_D, UPCAST, PREC)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, kp_base, sks, svs, full_lo, full_hi, offs_m,
                               offs_d, S, off, window, scale_log2, sc_scale, sc_log2, False, CAUSAL, HAS_WINDOW,
                               HAS_KPM, HAS_SOFTCAP, HEAD_D, BLOCK_N, BLOCK_D, UPCAST, PREC)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, kp_base, sks, svs, full_hi, hi, offs_m, offs_d,
                               S, off, window, scale_log2, sc_scale, sc_log2, True, CAUSAL, HAS_WINDOW, HAS_KPM,
                               HAS_SOFTCAP, HEAD_D, BLOCK_N, BLOCK_D, UPCAST, PREC)
    _fwd_epilogue(acc, m_i, l_i, g, b, h, offs_m, offs_d, mmask, dmask, Out, ORaw, Lse, Shift,
                  sob, soh, sot, srb, srh, srt, ssb, ssh, H, T, HAS_SHIFT, SAVE_RAW)


@triton.jit
def _fwd_epilogue(acc, m_i, l_i, g, b, h, offs_m, offs_d, mmask, dmask, Out, ORaw, Lse, Shift,
                  sob, soh, sot, srb, srh, srt, ssb, ssh, H, T, HAS_SHIFT: tl.constexpr, SAVE_RAW: tl.constexpr):
    empty = l_i == 0.0  # rows that see no key: o_raw = 0, lse = +inf (p = 0 in the backward)
    o_raw = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    out = o_raw * g
    if HAS_SHIFT:
        sh = tl.load(Shift + b * ssb + h * ssh + offs_d, mask=dmask, other=0.0).to(tl.float32)
        out = out + sh[None, :]
    omask = mmask[:, None] & dmask[None, :]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=omask)
    if SAVE_RAW:
        tl.store(ORaw + b * srb + h * srh + offs_m[:, None] * srt + offs_d[None, :],
                 o_raw.to(ORaw.dtype.element_ty), mask=omask)
    tl.store(Lse + (b * H + h) * T + offs_m, lse, mask=mmask)


# ------------------------------------------------------------------ split-KV decode (small T)
# One program per (key split, batch, pack of PACK query heads sharing a KV head): the M rows are
# (head, position) pairs, r -> head h0 + r // T, position r % T, so K/V are read once per GQA group.


@triton.jit
def _split_kernel(Q, K, V, Acc, Ml, Gate, Kpm,
                  sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sgb, sgh, skpb,
                  H, GROUP, T, S, window, scale_log2, sc_scale, sc_log2, split_len,
                  HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  HAS_KPM: tl.constexpr, HAS_GATE: tl.constexpr, SKIP_ZERO: tl.constexpr, UPCAST: tl.constexpr,
                  PREC: tl.constexpr, PACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Partial attention of PACK heads x T rows (<= BLOCK_M) over keys [split*split_len, (split+1)*split_len)."""
    sp = tl.program_id(0)
    bp = tl.program_id(1)
    nsplit = tl.num_programs(0)
    npack = H // PACK
    b = (bp // npack).to(tl.int64)
    h0 = (bp % npack).to(tl.int64) * PACK
    hk = h0 // GROUP
    off = S - T
    r = tl.arange(0, BLOCK_M)
    hrow = h0 + r // T
    trow = r % T
    rmask = r < PACK * T
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_D
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
                               sks, svs, start, stop, trow, offs_d, S, off, window, scale_log2, sc_scale,
                               sc_log2, True, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_SOFTCAP, HEAD_D, BLOCK_N, BLOCK_D,
                               UPCAST, PREC)
    row = (bp * nsplit + sp) * BLOCK_M + r
    tl.store(Acc + row[:, None] * BLOCK_D + offs_d[None, :], acc)
    tl.store(Ml + row * 2, m_i)
    tl.store(Ml + row * 2 + 1, l_i)


@triton.jit
def _combine_kernel(Acc, Ml, Out, ORaw, Lse, Gate, Shift, NSPLIT,
                    sob, soh, sot, srb, srh, srt, sgb, sgh, ssb, ssh, H, T,
                    HEAD_D: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr, SKIP_ZERO: tl.constexpr,
                    SAVE_RAW: tl.constexpr, PACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bp = tl.program_id(0)
    npack = H // PACK
    b = (bp // npack).to(tl.int64)
    h0 = (bp % npack).to(tl.int64) * PACK
    r = tl.arange(0, BLOCK_M)
    hrow = h0 + r // T
    trow = r % T
    rmask = r < PACK * T
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_D
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


# ------------------------------------------------------------------ backward


@triton.jit
def _bwd_pre_kernel(O, DO, Delta, DGate, DShift, sob, soh, sot, sdb, sdh, sdt, H, T,
                    HEAD_D: tl.constexpr, NEED_DGATE: tl.constexpr, NEED_DSHIFT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < HEAD_D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=mask, other=0.0)
    o = o.to(tl.float32)
    do = do.to(tl.float32)
    delta = tl.sum(o * do, 1)  # rowsum(dO * O_raw)
    tl.store(Delta + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)
    if NEED_DGATE:
        tl.atomic_add(DGate + bh, tl.sum(delta, 0))
    if NEED_DSHIFT:
        tl.atomic_add(DShift + bh.to(tl.int64) * HEAD_D + offs_d, tl.sum(do, 0), mask=offs_d < HEAD_D)


@triton.jit
def _dkdv_inner(dk, dv, k, v, kp, g, Q, DO, Lse, Delta, sqt, sdt, start, stop, offs_n, offs_d, T, S, off,
                window, scale_log2, sc_scale, sc_log2,
                MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
                PREC: tl.constexpr):
    """Transposed form (as the Triton tutorial): scores^T = k q^T is (BLOCK_N, BLOCK_M), no transposes of P."""
    offs_m0 = tl.arange(0, BLOCK_M)
    dmask = offs_d < HEAD_D
    for start_m in range(start, stop, BLOCK_M):
        offs_m = start_m + offs_m0
        if MASK:
            mm = offs_m < T
            qT = tl.load(Q + offs_m[None, :] * sqt + offs_d[:, None], mask=mm[None, :] & dmask[:, None], other=0.0)
            do = tl.load(DO + offs_m[:, None] * sdt + offs_d[None, :], mask=mm[:, None] & dmask[None, :],
                         other=0.0)
            lse = tl.load(Lse + offs_m, mask=mm, other=float("inf"))
            delta = tl.load(Delta + offs_m, mask=mm, other=0.0)
        else:
            qT = tl.load(Q + offs_m[None, :] * sqt + offs_d[:, None], mask=dmask[:, None], other=0.0)
            do = tl.load(DO + offs_m[:, None] * sdt + offs_d[None, :], mask=dmask[None, :], other=0.0)
            lse = tl.load(Lse + offs_m)
            delta = tl.load(Delta + offs_m)
        if UPCAST:
            qT = qT.to(tl.float32)
            do = do.to(tl.float32)
        sT, tT = _scores(k, qT, scale_log2, sc_scale, sc_log2, HAS_SOFTCAP, PREC)
        pT = tl.exp2(sT - lse[None, :])
        if MASK:
            pos = offs_m[None, :] + off
            j = offs_n[:, None]
            ok = j < S
            if CAUSAL or HAS_WINDOW:
                ok = ok & (j <= pos)
            if HAS_WINDOW:
                ok = ok & (j > pos - window)
            pT = tl.where(ok, pT, 0.0)
        pT = tl.where(kp[:, None] != 0, pT, 0.0) * g  # padded or out-of-range keys
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _query_ranges(n0, T, off, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_WINDOW: tl.constexpr):
    """Query-block ranges for keys [n0, n0+BLOCK_N): [lo, full_lo) masked, [full_lo, full_hi) fully visible,
    [full_hi, hi) masked. Row i (position i + off) sees key j iff j <= i + off and j > i + off - window."""
    lo = 0
    hi = T
    full_lo = 0
    full_hi = (T // BLOCK_M) * BLOCK_M
    if CAUSAL or HAS_WINDOW:
        lo = (tl.maximum(n0 - off, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 + window - off, 0), T)
        full_hi = tl.minimum(full_hi, (tl.maximum(n0 + window - off, 0) // BLOCK_M) * BLOCK_M)
    lo = tl.minimum(lo, hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, Gate, Kpm,
                     sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sdb, sdh, sdt,
                     sdkb, sdkh, sdks, sdvb, sdvh, sdvs, sgb, sgh, skpb,
                     H, GROUP, T, S, window, scale, scale_log2, sc_scale, sc_log2, T_BUCKET, S_BUCKET,
                     HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr, HAS_GATE: tl.constexpr,
                     UPCAST: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    Hkv = H // GROUP
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    off = S - T
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < S
    dmask = offs_d < HEAD_D
    kvmask = nmask[:, None] & dmask[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :], mask=kvmask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svs + offs_d[None, :], mask=kvmask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kp = nmask.to(tl.int8)
    if HAS_KPM:
        kp = tl.load(Kpm + b * skpb + offs_n, mask=nmask, other=0).to(tl.int8)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _query_ranges(n0, T, off, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for j in range(0, GROUP):
        h = hk * GROUP + j
        g = 1.0
        stop = hi
        if HAS_GATE:
            g = tl.load(Gate + b * sgb + h * sgh).to(tl.float32)
            stop = tl.where(g == 0.0, lo, hi)  # a zero gate contributes nothing to dk/dv
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        lse_base = Lse + (b * H + h) * T
        dl_base = Delta + (b * H + h) * T
        dk, dv = _dkdv_inner(dk, dv, k, v, kp, g, q_base, do_base, lse_base, dl_base, sqt, sdt,
                             lo, tl.minimum(full_lo, stop), offs_n, offs_d, T, S, off, window, scale_log2,
                             sc_scale, sc_log2, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HEAD_D, BLOCK_M,
                             UPCAST, PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, kp, g, q_base, do_base, lse_base, dl_base, sqt, sdt,
                             tl.minimum(full_lo, stop), tl.minimum(full_hi, stop), offs_n, offs_d, T, S, off,
                             window, scale_log2, sc_scale, sc_log2, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                             HEAD_D, BLOCK_M, UPCAST, PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, kp, g, q_base, do_base, lse_base, dl_base, sqt, sdt,
                             tl.minimum(full_hi, stop), stop, offs_n, offs_d, T, S, off, window, scale_log2,
                             sc_scale, sc_log2, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HEAD_D, BLOCK_M,
                             UPCAST, PREC)
    smask = nmask[:, None] & dmask[None, :]
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdks + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=smask)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvs + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=smask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DQ, Gate, Kpm,
                   sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sdb, sdh, sdt, sdqb, sdqh, sdqt, sgb, sgh, skpb,
                   H, GROUP, T, S, window, scale, scale_log2, sc_scale, sc_log2, T_BUCKET, S_BUCKET,
                   HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_KPM: tl.constexpr, HAS_GATE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    off = S - T
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < T
    dmask = offs_d < HEAD_D
    qmask = mmask[:, None] & dmask[None, :]
    g = 1.0
    lo, full_lo, full_hi, hi = _key_ranges(m0, S, off, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    if HAS_GATE:
        g = tl.load(Gate + b * sgb + h * sgh).to(tl.float32)
        hi = tl.where(g == 0.0, lo, hi)
        full_lo = tl.minimum(full_lo, hi)
        full_hi = tl.minimum(full_hi, hi)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=qmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + (b * H + h) * T + offs_m, mask=mmask, other=float("inf"))
    delta = tl.load(Delta + (b * H + h) * T + offs_m, mask=mmask, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    kp_base = Kpm + b * skpb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, kp_base, sks, svs, lo, full_lo, offs_m, offs_d, S, off,
                   window, scale_log2, sc_scale, sc_log2, True, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_SOFTCAP, HEAD_D,
                   BLOCK_N, UPCAST, PREC)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, kp_base, sks, svs, full_lo, full_hi, offs_m, offs_d, S,
                   off, window, scale_log2, sc_scale, sc_log2, False, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_SOFTCAP,
                   HEAD_D, BLOCK_N, UPCAST, PREC)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, kp_base, sks, svs, full_hi, hi, offs_m, offs_d, S, off,
                   window, scale_log2, sc_scale, sc_log2, True, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_SOFTCAP, HEAD_D,
                   BLOCK_N, UPCAST, PREC)
    dq = dq * (g * scale)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=qmask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, kp_base, sks, svs, start, stop, offs_m, offs_d, S, off, window,
              scale_log2, sc_scale, sc_log2,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
              PREC: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    dmask = offs_d < HEAD_D
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + offs_n0
        if MASK:
            lm = (offs_n < S)[None, :] & dmask[:, None]
        else:
            lm = dmask[:, None]
        kT = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None], mask=lm, other=0.0)
        vT = tl.load(v_base + offs_n[None, :] * svs + offs_d[:, None], mask=lm, other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        s, t = _scores(q, kT, scale_log2, sc_scale, sc_log2, HAS_SOFTCAP, PREC)
        p = tl.exp2(s - lse[:, None])
        if MASK:
            p = tl.where(_pos_mask(offs_m, offs_n, S, off, window, CAUSAL, HAS_WINDOW), p, 0.0)
        if HAS_KPM:
            if MASK:
                kp = tl.load(kp_base + offs_n, mask=offs_n < S, other=0)
            else:
                kp = tl.load(kp_base + offs_n)
            p = tl.where(kp[None, :] != 0, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)
    return dq


# ------------------------------------------------------------------ launch configuration


def _cfg(bm, bn, w, s):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


# Configs per head-dim bucket (<= 64, <= 128, <= 256). Each was compiled offline for sm_90 (bf16, all features
# on) and has no register spills inside its key/query loops; the autotuner picks among them on the device.
FWD_CONFIGS = {
    64: [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3)],
    128: [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(64, 128, 8, 3)],
    256: [_cfg(64, 32, 8, 2), _cfg(32, 32, 4, 2), _cfg(64, 16, 4, 2)],
}
DKDV_CONFIGS = {
    64: [_cfg(32, 128, 8, 3), _cfg(64, 128, 8, 3), _cfg(32, 64, 4, 3)],
    128: [_cfg(16, 128, 8, 3), _cfg(32, 64, 8, 3), _cfg(16, 64, 4, 3)],
    256: [_cfg(16, 32, 8, 2), _cfg(32, 32, 8, 2), _cfg(16, 32, 4, 2)],
}
DQ_CONFIGS = {
    64: [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 32, 4, 3)],
    128: [_cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3), _cfg(64, 64, 8, 3), _cfg(64, 32, 4, 3)],
    256: [_cfg(32, 32, 8, 2), _cfg(32, 16, 4, 2)],
}
INTERP_CFG = {"fwd": (32, 32), "dkdv": (32, 32), "dq": (32, 32)}  # small blocks: fewer wasted rows in tests


def _dbucket(block_d):
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


@functools.lru_cache(maxsize=None)
def _tuned(name, bucket):
    """Autotuned kernel on the GPU: a small config set per head-dim bucket, keyed on the shape class (length
    buckets, not exact lengths, so decoding with a growing cache does not retune every step)."""
    kernel, table = {"fwd": (_fwd_kernel, FWD_CONFIGS), "dkdv": (_bwd_dkdv_kernel, DKDV_CONFIGS),
                     "dq": (_bwd_dq_kernel, DQ_CONFIGS)}[name]
    return triton.autotune(configs=table[bucket], key=["HEAD_D", "CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_KPM",
                                                       "HAS_GATE", "T_BUCKET", "S_BUCKET"])(kernel)


def _bucket(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def _launch(name, grid, block_d, args, consts):
    """Run kernel `name`: autotuned on the GPU, one small config under the interpreter."""
    if INTERP:
        bm, bn = INTERP_CFG[name]
        kernel = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}[name]
        kernel[grid({"BLOCK_M": bm, "BLOCK_N": bn})](*args, **consts, BLOCK_M=bm, BLOCK_N=bn)
    else:
        _tuned(name, _dbucket(block_d))[grid](*args, **consts)


def _common(q, k, gate, shift, kpm, causal, scale, window, softcap):
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    block_d = max(16, triton.next_power_of_2(D))
    has_sc = softcap > 0
    consts = dict(HEAD_D=D, CAUSAL=causal, HAS_WINDOW=window > 0, HAS_SOFTCAP=has_sc, HAS_KPM=kpm is not None,
                  HAS_GATE=gate is not None, UPCAST=INTERP and q.dtype == torch.bfloat16,
                  PREC="ieee" if q.dtype == torch.float32 else None, BLOCK_D=block_d)
    scal = dict(window=max(int(window), 0), scale_log2=scale * LOG2E,
                sc_scale=(scale / softcap) if has_sc else 0.0, sc_log2=(softcap * LOG2E) if has_sc else 0.0)
    g = gate if gate is not None else q
    gs = (gate.stride(0), gate.stride(1)) if gate is not None else (0, 0)
    if kpm is not None:
        kpm = kpm.to(torch.int8)
    kp = kpm if kpm is not None else q
    kps = kpm.stride(0) if kpm is not None else 0
    return B, H, T, D, Hkv, S, block_d, consts, scal, g, gs, kp, kps


@functools.lru_cache(maxsize=None)
def _num_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(B, H, S, block_n, device):
    nblocks = triton.cdiv(S, block_n)
    if INTERP or device.type != "cuda":
        return max(1, min(nblocks, 4))
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(nblocks, triton.cdiv(2 * sms, B * H), 128))


DECODE_MAX_T = 16


def forward(q, k, v, gate, shift, kpm, causal, scale, window, softcap, skip_zero, save_raw):
    B, H, T, D, Hkv, S, block_d, consts, scal, g, gs, kp, kps = _common(q, k, gate, shift, kpm, causal, scale,
                                                                         window, softcap)
    out = _empty(B, T, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    o_raw = _empty(B, T, H, D, dtype=q.dtype, device=q.device).transpose(1, 2) if save_raw else q.new_empty(0)
    lse = _empty(B, H, T, dtype=torch.float32, device=q.device)
    if B * H * T == 0:
        return out, o_raw, lse
    o_r = o_raw if save_raw else out
    sh = shift if shift is not None else q
    ss = (shift.stride(0), shift.stride(1)) if shift is not None else (0, 0)
    skip = skip_zero and gate is not None
    if T <= DECODE_MAX_T:
        _decode(q, k, v, out, o_r, lse, g, gs, sh, ss, kp, kps, B, H, T, Hkv, S, consts, scal, skip, save_raw)
        return out, o_raw, lse
    args = (q, k, v, out, o_r, lse, g, sh, kp,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            o_r.stride(0), o_r.stride(1), o_r.stride(2), gs[0], gs[1], ss[0], ss[1], kps,
            H, H // Hkv, T, S, scal["window"], scal["scale_log2"], scal["sc_scale"], scal["sc_log2"],
            _bucket(T), _bucket(S))
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _launch("fwd", grid, consts["BLOCK_D"], args,
            dict(consts, HAS_SHIFT=shift is not None, SKIP_ZERO=skip, SAVE_RAW=save_raw))
    return out, o_raw, lse


def _decode(q, k, v, out, o_r, lse, g, gs, sh, ss, kp, kps, B, H, T, Hkv, S, consts, scal, skip, save_raw):
    """Flash-decoding: split the keys over programs (each takes the query heads of one KV head, so K/V are read
    once per group), then merge the partial softmaxes and apply the gate/shift epilogue."""
    group = H // Hkv
    block_d = consts["BLOCK_D"]
    pack = group if group * T <= (64 if block_d <= 128 else 16) else 1
    block_m = max(16, triton.next_power_of_2(pack * T))
    block_n = 32 if INTERP or block_d > 128 else 64
    nprog = B * H // pack
    nsplit = _num_splits(nprog, 1, S, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(S, block_n), nsplit) * block_n
    nsplit = max(1, triton.cdiv(S, split_len))
    acc = _empty(nprog * nsplit * block_m, block_d, dtype=torch.float32, device=q.device)
    ml = _empty(nprog * nsplit * block_m, 2, dtype=torch.float32, device=q.device)
    c = {n: consts[n] for n in ("HEAD_D", "CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_KPM", "HAS_GATE", "UPCAST",
                                "PREC", "BLOCK_D")}
    extra = {} if INTERP else {"num_warps": 4, "num_stages": 3}
    _split_kernel[(nsplit, nprog)](
        q, k, v, acc, ml, g, kp, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), gs[0], gs[1], kps, H, group, T, S, scal["window"],
        scal["scale_log2"], scal["sc_scale"], scal["sc_log2"], split_len, **c, SKIP_ZERO=skip, PACK=pack,
        BLOCK_M=block_m, BLOCK_N=block_n, **extra)
    _combine_kernel[(nprog,)](
        acc, ml, out, o_r, lse, g, sh, nsplit, out.stride(0), out.stride(1), out.stride(2),
        o_r.stride(0), o_r.stride(1), o_r.stride(2), gs[0], gs[1], ss[0], ss[1], H, T,
        HEAD_D=consts["HEAD_D"], HAS_GATE=consts["HAS_GATE"], HAS_SHIFT=sh is not q, SKIP_ZERO=skip,
        SAVE_RAW=save_raw, PACK=pack, BLOCK_M=block_m, BLOCK_D=block_d, **({} if INTERP else {"num_warps": 4}))


def backward(do, q, k, v, out, o_raw, lse, gate, shift, kpm, causal, scale, window, softcap, need_dq, need_dkdv,
             need_dgate, need_dshift):
    B, H, T, D, Hkv, S, block_d, consts, scal, g, gs, kp, kps = _common(q, k, gate, shift, kpm, causal, scale,
                                                                         window, softcap)
    if do.stride(-1) != 1:
        do = do.contiguous()
    f32 = torch.float32
    dq = _empty_like(q) if need_dq else q.new_empty(0)
    dk = _empty_like(k) if need_dkdv else k.new_empty(0)
    dv = _empty_like(v) if need_dkdv else v.new_empty(0)
    dgate = torch.zeros(B, H, dtype=f32, device=q.device) if need_dgate else q.new_empty(0, dtype=f32)
    dshift = torch.zeros(B, H, D, dtype=f32, device=q.device) if need_dshift else q.new_empty(0, dtype=f32)
    if B * H * T == 0 or S == 0:
        dq.zero_(), dk.zero_(), dv.zero_()  # (S == 0 is rejected by the public function)
        if need_dshift and B * H * T:
            dshift.copy_(do.float().sum(2))
        return dq, dk, dv, dgate, dshift
    o = o_raw if o_raw.numel() else out  # pre-epilogue output
    delta = _empty(B, H, T, dtype=f32, device=q.device)
    bm_pre = 32 if INTERP else 64
    _bwd_pre_kernel[(triton.cdiv(T, bm_pre), B * H)](
        o, do, delta, dgate if need_dgate else delta, dshift if need_dshift else delta,
        o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), H, T,
        HEAD_D=D, NEED_DGATE=need_dgate, NEED_DSHIFT=need_dshift, BLOCK_M=bm_pre, BLOCK_D=block_d)
    c = {n: consts[n] for n in ("HEAD_D", "CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_KPM", "HAS_GATE", "UPCAST",
                                "PREC", "BLOCK_D")}
    sc = (scal["window"], scale, scal["scale_log2"], scal["sc_scale"], scal["sc_log2"], _bucket(T), _bucket(S))
    qs = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
          v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    if need_dkdv:
        _launch("dkdv", lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * Hkv), block_d,
                (q, k, v, do, lse, delta, dk, dv, g, kp, *qs, dk.stride(0), dk.stride(1), dk.stride(2),
                 dv.stride(0), dv.stride(1), dv.stride(2), gs[0], gs[1], kps, H, H // Hkv, T, S, *sc), c)
    if need_dq:
        _launch("dq", lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H), block_d,
                (q, k, v, do, lse, delta, dq, g, kp, *qs, dq.stride(0), dq.stride(1), dq.stride(2),
                 gs[0], gs[1], kps, H, H // Hkv, T, S, *sc), c)
    return dq, dk, dv, dgate, dshift
