"""Hopper forward: q, k and v read through TMA tensor descriptors, the key loop warp-specialised where the installed
Triton supports it. Same math, block skipping and epilogue as attention._fwd_kernel (the pointer path, kept for
older GPUs, fp32, layouts TMA cannot describe, and the interpreter unless a test forces this one).

The descriptors are 4-d over the caller's (B, H, T, D) views, so HF's strided q/k/v need no copy, and TMA's zero
fill past S or D replaces the load masks (the score mask of the boundary blocks stays).
MODE (XLKERNELS_TMA): "auto" = Hopper (capability 9.x: the configs were compiled for sm_90a only); "0" = never;
"1" = wherever the layout allows (newer GPUs; the interpreter tests).
"""
import inspect
import os

import torch
import triton
import triton.language as tl

from . import attention_common as ac
from . import grids
from .attention_common import _fwd_epilogue, _fwd_factor, _key_ranges, _pos_mask, _q_block, _softmax_step, _tanh
from .grids import folded_id

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4
    TensorDescriptor = None
HAS_WS = "warp_specialize" in inspect.signature(tl.range).parameters
MODE = os.environ.get("XLKERNELS_TMA", "auto")


@triton.jit
def _tma_inner(acc, m_i, l_i, q, Kd, Vd, kp_base, b, hk, start, stop, offs_m, S, off, window, fac, sc_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
               PREC: tl.constexpr, WS: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(start, stop, BLOCK_N, warp_specialize=WS):
        k = Kd.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = Vd.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k.T, input_precision=PREC)
        if HAS_SOFTCAP:
            s = _tanh(s * sc_scale)
        offs_n = start_n + offs_n0
        if MASK:
            s = tl.where(_pos_mask(offs_m, offs_n, S, off, window, CAUSAL, HAS_WINDOW), s, float("-inf"))
        if HAS_KPM:
            kp = tl.load(kp_base + offs_n, mask=offs_n < S, other=0)
            s = tl.where(kp[None, :] != 0, s, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, fac, MASK or HAS_KPM, PREC)
    return acc, m_i, l_i


@triton.jit
def _fwd_tma_kernel(Qd, Kd, Vd, Out, ORaw, Lse, Gate, Shift, Kpm,
                    sob, soh, sot, srb, srh, srt, sgb, sgh, ssb, ssh, skpb,
                    BH, H, GROUP, T, S, window, scale_log2, sc_scale, sc_log2, T_BUCKET, S_BUCKET,
                    HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr, HAS_GATE: tl.constexpr,
                    HAS_SHIFT: tl.constexpr, SKIP_ZERO: tl.constexpr, SAVE_RAW: tl.constexpr, UPCAST: tl.constexpr,
                    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    WS: tl.constexpr = False):
    # spare programs of a folded grid run no key loop and store nothing (an early return here makes Triton 3.9's
    # Hopper warp-specialisation pass fail)
    bh = folded_id()
    spare = bh >= BH
    b, h, hk, off, m0, offs_m, rows, offs_d, mmask, dmask = _q_block(tl.minimum(bh, BH - 1), H, GROUP, T, S, HEAD_D,
                                                                     BLOCK_M, BLOCK_D, CAUSAL)
    mmask = offs_m < tl.where(spare, 0, T)
    g = 1.0
    if HAS_GATE:
        g = tl.load(Gate + b * sgb + h * sgh).to(tl.float32)
    lo, full_lo, full_hi, hi = _key_ranges(m0, S, off, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    if SKIP_ZERO:
        hi = tl.where(g == 0.0, lo, hi)
    hi = tl.where(spare, lo, hi)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.minimum(full_hi, hi)
    b32 = b.to(tl.int32)
    hk32 = hk.to(tl.int32)
    q = Qd.load([b32, h.to(tl.int32), m0, 0]).reshape(BLOCK_M, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    fac = _fwd_factor(scale_log2, sc_log2, HAS_SOFTCAP)
    kp_base = Kpm + b * skpb
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if WS:  # one masked loop: Triton 3.9's Hopper warp-specialisation pass fails on kernels with several loops
        acc, m_i, l_i = _tma_inner(acc, m_i, l_i, q, Kd, Vd, kp_base, b32, hk32, lo, hi, offs_m, S, off, window,
                                   fac, sc_scale, True, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_SOFTCAP, BLOCK_N, BLOCK_D,
                                   UPCAST, PREC, True)
    else:  # the position mask only on the boundary blocks
        acc, m_i, l_i = _tma_inner(acc, m_i, l_i, q, Kd, Vd, kp_base, b32, hk32, lo, full_lo, offs_m, S, off,
                                   window, fac, sc_scale, True, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_SOFTCAP, BLOCK_N,
                                   BLOCK_D, UPCAST, PREC, False)
        acc, m_i, l_i = _tma_inner(acc, m_i, l_i, q, Kd, Vd, kp_base, b32, hk32, full_lo, full_hi, offs_m, S, off,
                                   window, fac, sc_scale, False, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_SOFTCAP, BLOCK_N,
                                   BLOCK_D, UPCAST, PREC, False)
        acc, m_i, l_i = _tma_inner(acc, m_i, l_i, q, Kd, Vd, kp_base, b32, hk32, full_hi, hi, offs_m, S, off,
                                   window, fac, sc_scale, True, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_SOFTCAP, BLOCK_N,
                                   BLOCK_D, UPCAST, PREC, False)
    _fwd_epilogue(acc, m_i, l_i, g, b, h, rows, offs_d, mmask, dmask, Out, ORaw, Lse, Shift,
                  sob, soh, sot, srb, srh, srt, ssb, ssh, H, T, HAS_SHIFT, SAVE_RAW)


def _blocks(nargs):
    """Autotune pre-hook: the descriptors' boxes follow the config's tile sizes."""
    bm, bn, bd = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_D"]
    nargs["Qd"].block_shape = [1, 1, bm, bd]
    nargs["Kd"].block_shape = [1, 1, bn, bd]
    nargs["Vd"].block_shape = [1, 1, bn, bd]


def _cfg(bm, bn, w, s, ws=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WS": ws and HAS_WS}, num_warps=w, num_stages=s,
                         pre_hook=_blocks)


# Per head-dim bucket; compiled for sm_90a with all features on (bench/results/static/sm90a.md): wgmma, TMA
# loads, no spills. The warp-specialised config (one producer and two consumer warpgroups, 384 threads) compiles
# only as M64 N64 w4 here: larger tiles fail Triton 3.9's pass, and at D 256 it spills inside the loop.
TMA_CONFIGS = {
    64: [_cfg(128, 64, 8, 3), _cfg(64, 128, 4, 3), _cfg(64, 64, 4, 2, ws=True)],
    128: [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(64, 64, 4, 2, ws=True)],
    256: [_cfg(64, 64, 8, 2), _cfg(64, 32, 8, 2)],
}


def _describable(x):
    """TMA's rules (cuTensorMapEncodeTiled): 16-byte aligned base, unit last stride, other strides positive
    multiples of 16 bytes below 2**40 (so no expand()ed dims), rows of at least 16 bytes."""
    s = x.stride()
    n = x.element_size()
    return (s[-1] == 1 and x.data_ptr() % 16 == 0 and all(0 < st * n < 2 ** 40 and st * n % 16 == 0 for st in s[:-1])
            and x.shape[-1] * n >= 16)


def usable(q, k, v) -> bool:
    """Whether the forward takes the TMA kernel for these (B, H, T, D) views."""
    if MODE == "0" or TensorDescriptor is None or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if MODE != "1":
        if q.device.type != "cuda" or ac.INTERP or torch.cuda.get_device_capability(q.device)[0] != 9:
            return False
    return all(_describable(x) for x in (q, k, v))


def _desc(x, rows, block_d):
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, block_d])


def forward(q, k, v, out, o_r, lse, g, gs, sh, ss, kp, kps, B, H, T, Hkv, S, consts, scal, skip, save_raw,
            has_shift):
    bd = consts["BLOCK_D"]
    cfg = ac.forced_config(TMA_CONFIGS, bd)
    # the boxes of the tile ac.launch will run; autotuned configs set their own in _blocks
    bm, bn = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]) if cfg else ac.INTERP_BLOCKS if ac.INTERP else (64, 64)
    descs = (_desc(q, bm, bd), _desc(k, bn, bd), _desc(v, bn, bd))
    args = (*descs, out, o_r, lse, g, sh, kp, out.stride(0), out.stride(1), out.stride(2),
            o_r.stride(0), o_r.stride(1), o_r.stride(2), gs[0], gs[1], ss[0], ss[1], kps,
            B * H, H, H // Hkv, T, S, scal["window"], scal["scale_log2"], scal["sc_scale"], scal["sc_log2"],
            ac.bucket(T), ac.bucket(S))
    ac.launch(_fwd_tma_kernel, TMA_CONFIGS, lambda meta: ac.row_grid(T, B * H, meta["BLOCK_M"]), bd, args,
               dict(consts, HAS_SHIFT=has_shift, SKIP_ZERO=skip, SAVE_RAW=save_raw))
