"""FlashAttention-2 backward of steered attention (recomputation from the stored LSE; no TxS matrix).

Preprocess: Delta_raw = rowsum(dO*O_raw) per row, plus d gate = sum_t Delta_raw and d shift = sum_t dO (fp32
atomics). Since dO_raw = gate*dO and Delta = gate*Delta_raw, the q/k/v gradients are gate times the unsteered
ones: dV = g P^T dO, dS = g P (dO V^T - Delta_raw); heads with gate == 0 are skipped. dK/dV: one program per key
block and KV head looping over its GQA group's query heads (no K/V repeat, no atomics); dQ: one program per query
block and head.
"""
import os

import torch
import triton
import triton.language as tl

from . import grids
from .attention_common import (_cfg, _empty, _empty_like, _key_ranges, _pos_mask, _q_block, _scores, bucket, common,
                               launch, row_grid)
from .grids import folded_id



@triton.jit
def _bwd_pre_kernel(O, DO, Delta, DGate, DShift, sob, soh, sot, sdb, sdh, sdt, BH, H, T,
                    HEAD_D: tl.constexpr, NEED_DGATE: tl.constexpr, NEED_DSHIFT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = folded_id()
    if bh >= BH:
        return
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < HEAD_D)[None, :]
    o = tl.load(O + b * sob + h * soh + rows[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdt + offs_d[None, :], mask=mask, other=0.0)
    o = o.to(tl.float32)
    do = do.to(tl.float32)
    delta = tl.sum(o * do, 1)  # rowsum(dO * O_raw)
    tl.store(Delta + bh.to(tl.int64) * T + rows, delta, mask=offs_m < T)
    if NEED_DGATE:
        tl.atomic_add(DGate + bh, tl.sum(delta, 0))
    if NEED_DSHIFT:
        tl.atomic_add(DShift + bh.to(tl.int64) * HEAD_D + offs_d, tl.sum(do, 0), mask=offs_d < HEAD_D)


@triton.jit
def _dkdv_inner(dk, dv, k, v, kp, g, Q, DO, Lse, Delta, DQ, sqt, sdt, sdqt, start, stop, offs_n, offs_d, T, S, off,
                window, scale, scale_log2, sc_scale, sc_log2,
                MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
                PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr, HOIST: tl.constexpr):
    """Transposed form (as the Triton tutorial): scores^T = k q^T is (BLOCK_N, BLOCK_M), no transposes of P.
    ATOMIC_DQ: also add this key block's dQ = scale * dS K (dS = dsT^T, gate included) to the fp32 buffer DQ.
    HOIST=False: the loop-invariant address and mask arithmetic is recomputed in the loop instead of being kept
    live across it (a few integer ops per block; for the configs that would otherwise spill it)."""
    offs_m0 = tl.arange(0, BLOCK_M)
    dmask = offs_d < HEAD_D
    for start_m in tl.range(start, stop, BLOCK_M, disable_licm=not HOIST):
        offs_m = start_m + offs_m0
        rm = offs_m.to(tl.int64)
        if MASK:
            mm = offs_m < T
            qT = tl.load(Q + rm[None, :] * sqt + offs_d[:, None], mask=mm[None, :] & dmask[:, None], other=0.0)
            do = tl.load(DO + rm[:, None] * sdt + offs_d[None, :], mask=mm[:, None] & dmask[None, :],
                         other=0.0)
            lse = tl.load(Lse + offs_m, mask=mm, other=float("inf"))
            delta = tl.load(Delta + offs_m, mask=mm, other=0.0)
        else:
            qT = tl.load(Q + rm[None, :] * sqt + offs_d[:, None], mask=dmask[:, None], other=0.0)
            do = tl.load(DO + rm[:, None] * sdt + offs_d[None, :], mask=dmask[None, :], other=0.0)
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
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=PREC) * scale
            dq_ptr = DQ + rm[:, None] * sdqt + offs_d[None, :]
            if MASK:
                tl.atomic_add(dq_ptr, dq, mask=mm[:, None] & dmask[None, :], sem="relaxed")
            else:
                tl.atomic_add(dq_ptr, dq, mask=dmask[None, :], sem="relaxed")
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
def _bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, Gate, Kpm, DQ,
                     sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sdb, sdh, sdt,
                     sdkb, sdkh, sdks, sdvb, sdvh, sdvs, sgb, sgh, skpb, sdqb, sdqh, sdqt,
                     BHK, H, GROUP, T, S, window, scale, scale_log2, sc_scale, sc_log2, T_BUCKET, S_BUCKET,
                     HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr, HAS_GATE: tl.constexpr,
                     UPCAST: tl.constexpr, PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HOIST: tl.constexpr = True):
    pid_n = tl.program_id(0)
    bhk = folded_id()
    if bhk >= BHK:
        return
    Hkv = H // GROUP
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    off = S - T
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    rn = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < S
    dmask = offs_d < HEAD_D
    kvmask = nmask[:, None] & dmask[None, :]
    k = tl.load(K + b * skb + hk * skh + rn[:, None] * sks + offs_d[None, :], mask=kvmask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + rn[:, None] * svs + offs_d[None, :], mask=kvmask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kp = nmask.to(tl.int8)
    if HAS_KPM:
        kp = tl.load(Kpm + b * skpb + offs_n, mask=nmask, other=0).to(tl.int8)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _query_ranges(n0, T, off, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    # GQA: the group's query heads one after another. Each runs three query-block loops (masked / full / masked), and
    # each loop's pipeline prologue needs that head's addresses and masks. Hoisted above this loop (LICM) they
    # stayed live across all three query loops and ptxas spilled them, reloading on every head: 4-212 B per thread
    # in 84 rows of the static record (issue 19 §2). disable_licm keeps that set-up in the head's own iteration.
    for j in tl.range(0, GROUP, disable_licm=True):
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
        dq_base = DQ + b * sdqb + h * sdqh
        dk, dv = _dkdv_inner(dk, dv, k, v, kp, g, q_base, do_base, lse_base, dl_base, dq_base, sqt, sdt, sdqt,
                             lo, tl.minimum(full_lo, stop), offs_n, offs_d, T, S, off, window, scale,
                             scale_log2, sc_scale, sc_log2, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HEAD_D,
                             BLOCK_M, UPCAST, PREC, ATOMIC_DQ, HOIST)
        dk, dv = _dkdv_inner(dk, dv, k, v, kp, g, q_base, do_base, lse_base, dl_base, dq_base, sqt, sdt, sdqt,
                             tl.minimum(full_lo, stop), tl.minimum(full_hi, stop), offs_n, offs_d, T, S, off,
                             window, scale, scale_log2, sc_scale, sc_log2, False, CAUSAL, HAS_WINDOW,
                             HAS_SOFTCAP, HEAD_D, BLOCK_M, UPCAST, PREC, ATOMIC_DQ, HOIST)
        dk, dv = _dkdv_inner(dk, dv, k, v, kp, g, q_base, do_base, lse_base, dl_base, dq_base, sqt, sdt, sdqt,
                             tl.minimum(full_hi, stop), stop, offs_n, offs_d, T, S, off, window, scale,
                             scale_log2, sc_scale, sc_log2, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HEAD_D,
                             BLOCK_M, UPCAST, PREC, ATOMIC_DQ, HOIST)
    smask = nmask[:, None] & dmask[None, :]
    tl.store(DK + b * sdkb + hk * sdkh + rn[:, None] * sdks + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=smask)
    tl.store(DV + b * sdvb + hk * sdvh + rn[:, None] * sdvs + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=smask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DQ, Gate, Kpm,
                   sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sdb, sdh, sdt, sdqb, sdqh, sdqt, sgb, sgh, skpb,
                   BH, H, GROUP, T, S, window, scale, scale_log2, sc_scale, sc_log2, T_BUCKET, S_BUCKET,
                   HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_KPM: tl.constexpr, HAS_GATE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = folded_id()
    if bh >= BH:
        return
    b, h, hk, off, m0, offs_m, rows, offs_d, mmask, dmask = _q_block(bh, H, GROUP, T, S, HEAD_D, BLOCK_M, BLOCK_D,
                                                                     CAUSAL)
    qmask = mmask[:, None] & dmask[None, :]
    g = 1.0
    lo, full_lo, full_hi, hi = _key_ranges(m0, S, off, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    if HAS_GATE:
        g = tl.load(Gate + b * sgb + h * sgh).to(tl.float32)
        hi = tl.where(g == 0.0, lo, hi)
        full_lo = tl.minimum(full_lo, hi)
        full_hi = tl.minimum(full_hi, hi)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdt + offs_d[None, :], mask=qmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + (b * H + h) * T + rows, mask=mmask, other=float("inf"))
    delta = tl.load(Delta + (b * H + h) * T + rows, mask=mmask, other=0.0)
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
    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
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
        rn = offs_n.to(tl.int64)
        if MASK:
            lm = (offs_n < S)[None, :] & dmask[:, None]
        else:
            lm = dmask[:, None]
        kT = tl.load(k_base + rn[None, :] * sks + offs_d[:, None], mask=lm, other=0.0)
        vT = tl.load(v_base + rn[None, :] * svs + offs_d[:, None], mask=lm, other=0.0)
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



# dQ path. Deterministic (default): a separate dQ kernel recomputes S and P per query block. Otherwise
# (XLKERNELS_DETERMINISTIC=0 or DETERMINISTIC = False here) FlashAttention-2's scheme: the dK/dV kernel also adds
# dS K into an fp32 buffer with atomics (order-dependent rounding), then one cast; torch's deterministic mode
# (torch.use_deterministic_algorithms) always takes the deterministic path.
DETERMINISTIC = os.environ.get("XLKERNELS_DETERMINISTIC", "1") != "0"


def atomic_dq() -> bool:
    return not DETERMINISTIC and not torch.are_deterministic_algorithms_enabled()


# Per head-dim bucket; no spill stores or reloads inside any loop on sm_90a, fp16/bf16, plain and full (the static
# record, bench/results/static/sm90a.md). HOIST=False (see _dkdv_inner) where the query loop's hoisted arithmetic
# was otherwise spilled across it (issue 19 §2; figures without it): D 64 M64 N128 (8 B reloaded in the head loop,
# full) and D 256 M16 N64 (104-136 B reloaded, 8-12 B stored).
DKDV_CONFIGS = {
    64: [_cfg(32, 128, 8, 3), _cfg(64, 128, 8, 3, HOIST=False), _cfg(32, 64, 4, 3)],
    # 2026-11-30: M32 N128 w8 s2 added at D 128 (twice the query depth per wgmma); at D 256 M16 N32 w4 (56 B spill
    # stores in the loop) replaced by M16 N64 w8, the first D 256 dK/dV config on wgmma (64-key tile = one
    # warpgroup's M). The two mma.sync configs stay for the autotuner.
    128: [_cfg(16, 128, 8, 3), _cfg(32, 64, 8, 3), _cfg(16, 64, 4, 3), _cfg(32, 128, 8, 2)],
    256: [_cfg(16, 32, 8, 2), _cfg(32, 32, 8, 2), _cfg(16, 64, 8, 2, HOIST=False)],
}
# dK/dV with ATOMIC_DQ (the extra dS^T K product and its fp32 tile), with the same guarantee (bench/NOTES.md, "opt-in
# atomic dQ"; M32 N64 w8 with HOIST=False: without it 12-160 B reloaded in the head loop, up to 8 B stored). The
# 64-query-row configs tried and the D 256 64-key (wgmma) ones all store spills in the loop, so D 256 stays on
# mma.sync.
DKDV_ATOMIC_CONFIGS = {
    64: [_cfg(32, 128, 8, 3), _cfg(32, 128, 8, 2), _cfg(32, 64, 4, 2)],
    128: [_cfg(16, 128, 8, 2), _cfg(16, 128, 8, 3), _cfg(32, 64, 8, 2, HOIST=False)],
    256: [_cfg(16, 32, 8, 2), _cfg(16, 32, 8, 3), _cfg(32, 16, 8, 2)],
}
DQ_CONFIGS = {
    64: [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 32, 4, 3)],
    128: [_cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3), _cfg(64, 64, 8, 3), _cfg(64, 32, 4, 3)],
    # 2026-11-30: was M32 N32 w8 / M32 N16 w4 (mma.sync: 32 query rows < wgmma's 64); all three spill-free
    256: [_cfg(64, 32, 8, 2), _cfg(128, 32, 8, 2), _cfg(64, 16, 4, 2)],
}


def backward(do, q, k, v, out, o_raw, lse, gate, shift, kpm, causal, scale, window, softcap, need_dq, need_dkdv,
             need_dgate, need_dshift):
    B, H, T, D, Hkv, S, block_d, consts, scal, g, gs, kp, kps = common(q, k, gate, shift, kpm, causal, scale,
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
    bm_pre = 64 if grids.gpu_shapes() else 32
    _bwd_pre_kernel[row_grid(T, B * H, bm_pre)](
        o, do, delta, dgate if need_dgate else delta, dshift if need_dshift else delta,
        o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), B * H, H, T,
        HEAD_D=D, NEED_DGATE=need_dgate, NEED_DSHIFT=need_dshift, BLOCK_M=bm_pre, BLOCK_D=block_d)
    c = {n: consts[n] for n in ("HEAD_D", "CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_KPM", "HAS_GATE", "UPCAST",
                                "PREC", "BLOCK_D")}
    sc = (scal["window"], scale, scal["scale_log2"], scal["sc_scale"], scal["sc_log2"], bucket(T), bucket(S))
    qs = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
          v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    atomic = need_dq and need_dkdv and atomic_dq()
    if need_dkdv:
        dq32 = torch.zeros(B, H, T, D, dtype=f32, device=q.device) if atomic else delta
        table = DKDV_ATOMIC_CONFIGS if atomic else DKDV_CONFIGS
        launch(_bwd_dkdv_kernel, table, lambda meta: row_grid(S, B * Hkv, meta["BLOCK_N"]), block_d,
               (q, k, v, do, lse, delta, dk, dv, g, kp, dq32, *qs, dk.stride(0), dk.stride(1), dk.stride(2),
                dv.stride(0), dv.stride(1), dv.stride(2), gs[0], gs[1], kps,
                *(dq32.stride()[:3] if atomic else (0,) * 3),
                B * Hkv, H, H // Hkv, T, S, *sc), dict(c, ATOMIC_DQ=atomic), reset=("DQ",) if atomic else ())
        if atomic:
            dq.copy_(dq32)
    if need_dq and not atomic:
        launch(_bwd_dq_kernel, DQ_CONFIGS, lambda meta: row_grid(T, B * H, meta["BLOCK_M"]), block_d,
               (q, k, v, do, lse, delta, dq, g, kp, *qs, dq.stride(0), dq.stride(1), dq.stride(2),
                gs[0], gs[1], kps, B * H, H, H // Hkv, T, S, *sc), c)
    return dq, dk, dv, dgate, dshift
