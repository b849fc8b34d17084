"""Steered flash attention in Triton: the forward (pointer) kernel, its config table and the forward dispatch
(split-KV decode for short queries: attention_decode.py; TMA on Hopper: attention_tma.py; the shared @triton.jit
helpers and launch code: attention_common.py; FlashAttention-2 backward: attention_bwd.py).

Forward (per query block of one (b,h)): online softmax in base 2 (log2e folded into the scale), causal /
sliding-window block skipping (only boundary blocks apply the position mask), then the fused epilogue
out = gate*o_raw + shift. A head with gate == 0 that needs no gradient runs no key loop at all. The LSE is
stored (log2 units) for the backward.
"""
import torch
import triton
import triton.language as tl

from . import attention_decode, attention_tma
from .attention_common import (_cfg, _empty, _fwd_epilogue, _fwd_factor, _fwd_inner, _key_ranges, _q_block, bucket,
                               common, launch, row_grid)
from .grids import folded_id


@triton.jit
def _fwd_kernel(Q, K, V, Out, ORaw, Lse, Gate, Shift, Kpm,
                sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot, srb, srh, srt,
                sgb, sgh, ssb, ssh, skpb,
                BH, H, GROUP, T, S, window, scale_log2, sc_scale, sc_log2, T_BUCKET, S_BUCKET,
                HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_KPM: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr, SKIP_ZERO: tl.constexpr,
                SAVE_RAW: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = folded_id()
    if bh >= BH:
        return
    b, h, hk, off, m0, offs_m, rows, offs_d, mmask, dmask = _q_block(bh, H, GROUP, T, S, HEAD_D, BLOCK_M, BLOCK_D,
                                                                     CAUSAL)

    g = 1.0
    if HAS_GATE:
        g = tl.load(Gate + b * sgb + h * sgh).to(tl.float32)
    lo, full_lo, full_hi, hi = _key_ranges(m0, S, off, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    if SKIP_ZERO:  # hard head mask: no key loop at all
        hi = tl.where(g == 0.0, lo, hi)
        full_lo = tl.minimum(full_lo, hi)
        full_hi = tl.minimum(full_hi, hi)

    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    fac = _fwd_factor(scale_log2, sc_log2, HAS_SOFTCAP)  # (scale_log2 here: forward_scale's value)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    kp_base = Kpm + b * skpb
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, kp_base, sks, svs, lo, full_lo, offs_m, offs_d,
                               S, off, window, fac, sc_scale, sc_log2, True, CAUSAL, HAS_WINDOW, HAS_KPM,
                               HAS_SOFTCAP, HEAD_D, BLOCK_N, BLOCK_D, UPCAST, PREC)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, kp_base, sks, svs, full_lo, full_hi, offs_m,
                               offs_d, S, off, window, fac, sc_scale, sc_log2, False, CAUSAL, HAS_WINDOW,
                               HAS_KPM, HAS_SOFTCAP, HEAD_D, BLOCK_N, BLOCK_D, UPCAST, PREC)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, kp_base, sks, svs, full_hi, hi, offs_m, offs_d,
                               S, off, window, fac, sc_scale, sc_log2, True, CAUSAL, HAS_WINDOW, HAS_KPM,
                               HAS_SOFTCAP, HEAD_D, BLOCK_N, BLOCK_D, UPCAST, PREC)
    _fwd_epilogue(acc, m_i, l_i, g, b, h, rows, offs_d, mmask, dmask, Out, ORaw, Lse, Shift,
                  sob, soh, sot, srb, srh, srt, ssb, ssh, H, T, HAS_SHIFT, SAVE_RAW)


# ------------------------------------------------------------------ launch configuration


# Configs per head-dim bucket (<= 64, <= 128, <= 256). Each was compiled offline for sm_90 (bf16, all features
# on) and has no register spills inside its key/query loops; the autotuner picks among them on the device.
FWD_CONFIGS = {
    # 2026-11-30: M128 N128 w8 dropped at D 64/128 (48 B / 4 B spill stores inside the key loop with all
    # features on, at 2 and 3 stages alike); M32 N32 w4 at D 256 (mma.sync) replaced by M64 N64 w8 (wgmma).
    64: [_cfg(128, 64, 8, 3), _cfg(64, 128, 4, 3), _cfg(64, 64, 4, 3)],
    128: [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(64, 128, 8, 3)],
    256: [_cfg(64, 32, 8, 2), _cfg(64, 64, 8, 2), _cfg(64, 16, 4, 2)],
}
DECODE_MAX_T = 16
TINY = 1.1754943508222875e-38  # smallest normal fp32


def forward_scale(q, scal, has_softcap):
    """(q, scal) for the forward kernels, whose online softmax needs a positive factor (_fwd_factor): without
    softcap a negative scale becomes -q with |scale| (one copy of q, only then), a zero scale TINY. The backward
    keeps the caller's q and signed scale (the same scores, so the saved LSE matches)."""
    if has_softcap:
        return q, scal
    s = scal["scale_log2"]
    return (-q if s < 0 else q), dict(scal, scale_log2=max(abs(s), TINY))


def forward(q, k, v, gate, shift, kpm, causal, scale, window, softcap, skip_zero, save_raw):
    B, H, T, D, Hkv, S, block_d, consts, scal, g, gs, kp, kps = common(q, k, gate, shift, kpm, causal, scale,
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
    q, scal = forward_scale(q, scal, softcap > 0)
    if T <= DECODE_MAX_T:
        attention_decode.decode(q, k, v, out, o_r, lse, g, gs, sh, ss, kp, kps, B, H, T, Hkv, S, consts, scal, skip,
                                save_raw)
        return out, o_raw, lse
    if attention_tma.usable(q, k, v):
        attention_tma.forward(q, k, v, out, o_r, lse, g, gs, sh, ss, kp, kps, B, H, T, Hkv, S, consts, scal, skip,
                              save_raw, shift is not None)
        return out, o_raw, lse
    args = (q, k, v, out, o_r, lse, g, sh, kp,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            o_r.stride(0), o_r.stride(1), o_r.stride(2), gs[0], gs[1], ss[0], ss[1], kps,
            B * H, H, H // Hkv, T, S, scal["window"], scal["scale_log2"], scal["sc_scale"], scal["sc_log2"],
            bucket(T), bucket(S))
    launch(_fwd_kernel, FWD_CONFIGS, lambda meta: row_grid(T, B * H, meta["BLOCK_M"]), consts["BLOCK_D"], args,
           dict(consts, HAS_SHIFT=shift is not None, SKIP_ZERO=skip, SAVE_RAW=save_raw))
    return out, o_raw, lse


