"""What the attention kernels share: the @triton.jit helpers of the forward, backward, split-KV decode and TMA
kernels (scores, softcap tanh, position mask, key ranges, the online-softmax step and key loop, the query-block
setup, the forward epilogue) and the host side of their launches (config tables' entries, autotuning per head-dim
bucket, the interpreter's small tiles, grids, argument preparation).

Imports only grids and backends: attention.py (forward dispatch), attention_bwd.py, attention_decode.py and
attention_tma.py depend on this module and not on each other (tests/test_triton_imports.py checks the graph).
Under TRITON_INTERPRET=1, bf16 loads are upcast to fp32 (the interpreter's bf16 arithmetic is wrong) and each
kernel runs one small config instead of autotuning.
"""
import torch
import triton
import triton.language as tl

from ..backends import interpreting
from . import grids

LOG2E = 1.4426950408889634
INTERP = interpreting()
_empty, _empty_like = grids.empty, grids.empty_like  # NaN-filled while grids.POISON is set


@triton.jit
def _tanh(x):
    """tanh with one exp2 and one division for every x: 1 - 2 / (1 + exp(2x)) (exp2 overflowing to inf gives 1,
    underflowing to 0 gives -1). Max abs error vs float64 over [-20, 20]: 1.8e-7 in fp32 arithmetic (absolute,
    also near 0: the scores use t * softcap * log2e and the backward 1 - t^2, so no Taylor branch is needed).
    (The sign(x) (1 - e) / (1 + e), e = exp(-2|x|), form is as cheap but needs 40-50 more registers in the
    softcap forward on sm_90a, with spills at D 80/96.)"""
    return 1.0 - 2.0 / (1.0 + tl.exp2(x * 2.885390081777927))


@triton.jit
def _scores(q, kT, scale_log2, sc_scale, sc_log2, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr):
    """-> (scores in log2 units, the tanh value with softcap (its derivative is needed) else raw q.k)."""
    qk = tl.dot(q, kT, input_precision=PREC)
    if HAS_SOFTCAP:
        t = _tanh(qk * sc_scale)
        return t * sc_log2, t
    else:
        return qk * scale_log2, qk


@triton.jit
def _fwd_factor(scale_pos, sc_log2, HAS_SOFTCAP: tl.constexpr):
    """The forward's factor f > 0 with scores (log2 units) = x * f: x = tanh(q.k * sc_scale) and f = softcap * log2e
    with softcap, else x = q.k and f = scale_pos = |scale| * log2e from the host (which negates q for a negative
    scale and passes a zero scale as the smallest normal float: uniform weights). With f > 0 the row max of x times
    f is the row max of the scores, so p = exp2(x * f - m) is one FMA per score (FlashAttention-3)."""
    if HAS_SOFTCAP:
        return sc_log2
    else:
        return scale_pos


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
               fac, sc_scale, sc_log2,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               UPCAST: tl.constexpr, PREC: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    dmask = offs_d < HEAD_D
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + offs_n0
        rn = offs_n.to(tl.int64)  # row offsets in 64 bits: S * stride may pass 2**31
        if MASK:
            nmask = offs_n < S
            kT = tl.load(k_base + rn[None, :] * sks + offs_d[:, None], mask=nmask[None, :] & dmask[:, None],
                         other=0.0)
            v = tl.load(v_base + rn[:, None] * svs + offs_d[None, :], mask=nmask[:, None] & dmask[None, :],
                        other=0.0)
        else:
            kT = tl.load(k_base + rn[None, :] * sks + offs_d[:, None], mask=dmask[:, None], other=0.0)
            v = tl.load(v_base + rn[:, None] * svs + offs_d[None, :], mask=dmask[None, :], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kT, input_precision=PREC)  # raw: the scores are s * fac (fac > 0, _fwd_factor)
        if HAS_SOFTCAP:
            s = _tanh(s * sc_scale)
        if MASK:
            s = tl.where(_pos_mask(offs_m, offs_n, S, off, window, CAUSAL, HAS_WINDOW), s, float("-inf"))
        if HAS_KPM:
            if MASK:
                kp = tl.load(kp_base + offs_n, mask=offs_n < S, other=0)
            else:
                kp = tl.load(kp_base + offs_n)
            s = tl.where(kp[None, :] != 0, s, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, fac, MASK or HAS_KPM, PREC)
    return acc, m_i, l_i


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v, fac, MAY_BE_EMPTY: tl.constexpr, PREC: tl.constexpr):
    """One key block of the online softmax: scores s * fac (log2 units), then acc += P V. MAY_BE_EMPTY: rows may
    have seen no key yet (masked blocks): keep m = -inf there and subtract 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * fac)
    m_use = m_new
    if MAY_BE_EMPTY:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s * fac - m_use[:, None])  # one FMA per score
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, m_new, l_i


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
def _q_block(bh, H, GROUP, T, S, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
             REVERSE: tl.constexpr):
    """Program (query block, bh = b*H + h): b, h, KV head hk, key offset off = S - T, first row m0, rows offs_m
    (rows: the same in int64, for addresses) and head-dim offs_d with their masks. REVERSE (causal): program 0
    takes the last query block, the one with the most keys, so the heaviest blocks of a head start first and
    the light ones fill the tail of the wave."""
    pid_m = tl.program_id(0)
    if REVERSE:
        pid_m = tl.num_programs(0) - 1 - pid_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    off = S - T
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < T
    dmask = offs_d < HEAD_D
    return b, h, hk, off, m0, offs_m, offs_m.to(tl.int64), offs_d, mmask, dmask


@triton.jit
def _fwd_epilogue(acc, m_i, l_i, g, b, h, rows, offs_d, mmask, dmask, Out, ORaw, Lse, Shift,
                  sob, soh, sot, srb, srh, srt, ssb, ssh, H, T, HAS_SHIFT: tl.constexpr, SAVE_RAW: tl.constexpr):
    empty = l_i == 0.0  # rows that see no key: o_raw = 0, lse = +inf (p = 0 in the backward)
    o_raw = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    out = o_raw * g
    if HAS_SHIFT:
        sh = tl.load(Shift + b * ssb + h * ssh + offs_d, mask=dmask, other=0.0).to(tl.float32)
        out = out + sh[None, :]
    omask = mmask[:, None] & dmask[None, :]
    tl.store(Out + b * sob + h * soh + rows[:, None] * sot + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=omask)
    if SAVE_RAW:
        tl.store(ORaw + b * srb + h * srh + rows[:, None] * srt + offs_d[None, :],
                 o_raw.to(ORaw.dtype.element_ty), mask=omask)
    tl.store(Lse + (b * H + h) * T + rows, lse, mask=mmask)


# ------------------------------------------------------------------ launch configuration


def _cfg(bm, bn, w, s, **kw):
    """A config: tiles, warps, stages, and further constexprs of the kernel (kw)."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **kw}, num_warps=w, num_stages=s)


INTERP_BLOCKS = (32, 32)  # (BLOCK_M, BLOCK_N) under the interpreter: small, so tests cover many blocks


def _dbucket(block_d):
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


_TUNED = {}


def _tuned(kernel, table, bucket, reset=()):
    """Autotuned kernel on the GPU: a small config set per head-dim bucket, keyed on the shape class (length
    buckets, not exact lengths, so decoding with a growing cache does not retune every step). `reset`: buffers
    the kernel accumulates into (atomics), zeroed before each timed run and the real one. One entry per table
    (the dK/dV kernel has two)."""
    key = (kernel.__name__, id(table), bucket, tuple(reset))
    if key not in _TUNED:
        _TUNED[key] = triton.autotune(configs=table[bucket], reset_to_zero=list(reset) or None, key=[
            "HEAD_D", "CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_KPM", "HAS_GATE", "T_BUCKET", "S_BUCKET"])(kernel)
    return _TUNED[key]


def bucket(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def forced_config(table, block_d):
    """Config grids.GPU["config"] of `table`'s head-dim bucket (taken modulo its length), or None."""
    i = grids.GPU.get("config")
    if i is None:
        return None
    cfgs = table[_dbucket(block_d)]
    return cfgs[i % len(cfgs)]


def launch(kernel, table, grid, block_d, args, consts, reset=()):
    """Run `kernel`: autotuned over `table` on the GPU, one small config under the interpreter, or the config
    forced through grids.GPU."""
    cfg = forced_config(table, block_d)
    if cfg is not None:
        kernel[grid(cfg.kwargs)](*args, **consts, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif INTERP:
        bm, bn = INTERP_BLOCKS
        kernel[grid({"BLOCK_M": bm, "BLOCK_N": bn})](*args, **consts, BLOCK_M=bm, BLOCK_N=bn)
    else:
        _tuned(kernel, table, _dbucket(block_d), reset)[grid](*args, **consts)


def row_grid(n, heads, block):
    """Grid of the forward, dQ, dK/dV and preprocess kernels: blocks of `block` rows of n on axis 0, the
    (batch, head) pairs folded over axes 1 and 2."""
    return grids.fold(triton.cdiv(n, block), heads)


def common(q, k, gate, shift, kpm, causal, scale, window, softcap):
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


