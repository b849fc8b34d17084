"""steered_attention: FlashAttention with a per-head gate/shift epilogue fused in.

out[b,h] = gate[b,h] * softmax(mask(softcap(scale * q k^T))) v + shift[b,h]

Backends: 'triton' (fused forward + FlashAttention-2 backward; d gate and d shift come out of the backward's
rowsum(dO*O) pass), 'cpu'/'cuda' (torch SDPA, or math attention when softcap is set, then the head_steer
epilogue; no head skipping), 'reference' (pure PyTorch in the input dtype). On CUDA the rule table in
xlkernels/dispatch.py picks 'triton' or 'cuda' per call (backends.select).
Triton details: T <= 16 (decode) runs a split-KV flash-decoding kernel whose programs take all query heads of
one KV head (K/V read once per GQA group) and a merge kernel that applies the epilogue; longer T runs the
FlashAttention-2 forward. A gate == 0 that needs no grad skips that head's key loop (forward and backward).
Gate/shift gradients accumulate with fp32 atomics (not bitwise deterministic). torch.compile sees the ops as
opaque custom ops (fake impls registered); the backend is fixed when a function is traced.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _checks, backends, dispatch
from ..reference import attention as ref
from . import _direct, sdpa_steer
from . import head_steer as hs

OP = "steered_attention"
backends.register_op(OP, ("cuda", "triton", "cpu", "reference"))

MAX_HEAD_DIM = 256


DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: reference/cpu backends only


def _validate(q, k, v, gate, shift, causal, scale, key_padding_mask, sliding_window, softcap):
    _checks.tensor(q, "q", ndim=4, dtypes=DTYPES)
    _checks.tensor(k, "k", ndim=4, dtypes=DTYPES)
    _checks.tensor(v, "v", ndim=4, dtypes=DTYPES)
    B, H, T, D = q.shape
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    _checks.same_device("k", k, q, "q")
    _checks.same_device("v", v, q, "q")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (q.shape[-1]) must be in 1..{MAX_HEAD_DIM}, got {D}")
    Hkv, S = k.shape[1], k.shape[2]
    _checks.tensor(k, "k", shape=(B, None, None, D))
    _checks.tensor(v, "v", shape=(B, Hkv, S, D))
    if S == 0:
        raise ValueError(f"k and v must hold at least one key (k.shape[2] >= 1), got shape {tuple(k.shape)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({Hkv}) (GQA/MQA)")
    if gate is not None:
        _checks.tensor(gate, "gate", ndim=(1, 2), dtypes=DTYPES)
        _checks.tensor(gate, "gate", shape=(H,) if gate.dim() == 1 else (B, H))
        _checks.same_device("gate", gate, q, "q")
    if shift is not None:
        _checks.tensor(shift, "shift", ndim=(2, 3), dtypes=DTYPES)
        _checks.tensor(shift, "shift", shape=(H, D) if shift.dim() == 2 else (B, H, D))
        _checks.same_device("shift", shift, q, "q")
    if key_padding_mask is not None:
        _checks.tensor(key_padding_mask, "key_padding_mask", ndim=2, dtypes=(torch.bool,), shape=(B, S))
        _checks.same_device("key_padding_mask", key_padding_mask, q, "q")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                              or not (scale == scale) or abs(scale) == float("inf")):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if sliding_window is not None:
        if not isinstance(sliding_window, int) or isinstance(sliding_window, bool) or sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if softcap is not None:
        if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not softcap > 0 \
                or softcap == float("inf"):
            raise ValueError(f"softcap must be a positive finite float or None, got {softcap!r}")
    return B, H, T, D, Hkv, S


def steered_attention(q: Tensor, k: Tensor, v: Tensor, *, gate: Optional[Tensor] = None,
                      shift: Optional[Tensor] = None, causal: bool = True, scale: Optional[float] = None,
                      key_padding_mask: Optional[Tensor] = None, sliding_window: Optional[int] = None,
                      softcap: Optional[float] = None, masked_heads: bool = False) -> Tensor:
    """Attention with a per-head gate and shift: q (B,H,T,D), k/v (B,Hkv,S,D) -> (B,H,T,D).

    gate None|(H,)|(B,H), shift None|(H,D)|(B,H,D), broadcast over T. Causal masking is aligned bottom-right
    (query i sits at absolute position p = i + S - T); a sliding window W lets p see keys p - W < j <= p;
    softcap c maps scores s -> c*tanh(s/c) before masking; key_padding_mask (B,S) bool, True = real token.
    A row that sees no key outputs `shift` (0 without shift). scale defaults to D**-0.5.
    gate == 0 with a gate that needs no grad is a hard head mask: the triton backend skips those heads.
    masked_heads: a hint that gate holds such zeros (not checked: reading gate would sync with the device); on
    CUDA the dispatch rules then prefer the fused kernel.
    Differentiable in q, k, v, gate and shift. On the triton backend the result is a transposed view of
    (B,T,H,D) memory.
    """
    B, H, T, D, Hkv, S = _validate(q, k, v, gate, shift, causal, scale, key_padding_mask, sliding_window, softcap)
    if scale is None:
        scale = D ** -0.5
    scale = float(scale)
    softcap = None if softcap is None else float(softcap)
    facts = None
    if q.device.type == "cuda":
        gate_grad = gate is not None and torch.is_grad_enabled() and gate.requires_grad
        facts = dispatch.Facts(dispatch.capability(q.device), D, T, S, dispatch.dtype_name(q.dtype), gate_grad,
                               bool(masked_heads) and gate is not None and not gate_grad, softcap is not None)
    which = backends.select(OP, q.device, facts)
    if which == "reference":
        return ref.steered_attention(q, k, v, gate=gate, shift=shift, causal=causal, scale=scale,
                                     key_padding_mask=key_padding_mask, sliding_window=sliding_window,
                                     softcap=softcap)
    if which == "triton":
        return _triton(q, k, v, gate, shift, causal, scale, key_padding_mask, sliding_window, softcap)
    return _sdpa_steer(q, k, v, gate, shift, causal, scale, key_padding_mask, sliding_window, softcap)


# ---------------------------------------------------------------- cpu / cuda: SDPA (or math) + head_steer


def _head_steer(o_bthd, gate, shift):
    if gate is not None and gate.dtype == torch.float64:
        gate = gate.float()
    if shift is not None and shift.dtype == torch.float64:
        shift = shift.float()
    if not hs.HAS_COMPILED:
        return hs.head_steer(o_bthd, gate, shift)
    # the backend is already chosen ('cpu'/'cuda'): call the compiled epilogue op directly (keeps
    # torch.compile(fullgraph=True) free of a second, untraceable backend lookup); _validate checked gate/shift
    return _direct.call(torch.ops.xlkernels.head_steer, (o_bthd, gate, shift), (o_bthd, gate, shift))


def _sdpa_steer(q, k, v, gate, shift, causal, scale, key_padding_mask, sliding_window, softcap):
    o = sdpa_steer.attention(q, k, v, causal, scale, key_padding_mask, sliding_window, softcap)
    return _epilogue(o, gate, shift)


def _epilogue(o, gate, shift):
    B, H, T, D = o.shape
    if gate is None and shift is None:
        return o
    if o.dtype == torch.float64:  # head_steer has no float64 kernel
        o = o if gate is None else o * gate.to(o.dtype).expand(B, H)[:, :, None, None]
        return o if shift is None else o + shift.to(o.dtype).expand(B, H, D)[:, :, None, :]
    return _head_steer(o.transpose(1, 2), gate, shift).transpose(1, 2)


# ---------------------------------------------------------------- triton: fused kernels as torch.library ops
# custom_op (the FlashAttention pattern): opaque to torch.compile, which uses the fake impls. (triton_op would
# let inductor trace into the launches, but cannot be traced under the Triton interpreter, where we test.)


@torch.library.custom_op("xlkernels::steered_attention_fwd", mutates_args=())
def _fwd(q: Tensor, k: Tensor, v: Tensor, gate: Optional[Tensor], shift: Optional[Tensor],
         key_padding_mask: Optional[Tensor], causal: bool, scale: float, window: int, softcap: float,
         skip_zero: bool, save_raw: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> out (B,H,T,D) view of (B,T,H,D) memory, o_raw (pre gate/shift, same layout; empty unless save_raw),
    lse (B,H,T) float32 in log2 units. window/softcap <= 0 mean off."""
    from ..triton import attention as kern
    return kern.forward(q, k, v, gate, shift, key_padding_mask, causal, scale, window, softcap, skip_zero,
                        save_raw)


@_fwd.register_fake
def _fwd_fake(q, k, v, gate, shift, key_padding_mask, causal, scale, window, softcap, skip_zero, save_raw):
    B, H, T, D = q.shape
    out = q.new_empty(B, T, H, D).transpose(1, 2)
    o_raw = q.new_empty(B, T, H, D).transpose(1, 2) if save_raw else q.new_empty(0)
    lse = q.new_empty(B, H, T, dtype=torch.float32)
    return out, o_raw, lse


@torch.library.custom_op("xlkernels::steered_attention_bwd", mutates_args=())
def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, o_raw: Tensor, lse: Tensor,
         gate: Optional[Tensor], shift: Optional[Tensor], key_padding_mask: Optional[Tensor], causal: bool,
         scale: float, window: int, softcap: float, need_dq: bool, need_dkdv: bool, need_dgate: bool,
         need_dshift: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dq (empty unless need_dq), dk, dv (empty unless need_dkdv), dgate (B,H) float32 (empty unless
    need_dgate), dshift (B,H,D) float32 (empty unless need_dshift). With only gate/shift grads wanted (e.g.
    head importance on a frozen first layer) just the rowsum(dO*O_raw) pass runs."""
    from ..triton import attention_bwd as kern
    return kern.backward(do, q, k, v, out, o_raw, lse, gate, shift, key_padding_mask, causal, scale, window,
                         softcap, need_dq, need_dkdv, need_dgate, need_dshift)


@_bwd.register_fake
def _bwd_fake(do, q, k, v, out, o_raw, lse, gate, shift, key_padding_mask, causal, scale, window, softcap,
              need_dq, need_dkdv, need_dgate, need_dshift):
    B, H, T, D = q.shape
    f32 = torch.float32
    dq = torch.empty_like(q) if need_dq else q.new_empty(0)
    dk = torch.empty_like(k) if need_dkdv else k.new_empty(0)
    dv = torch.empty_like(v) if need_dkdv else v.new_empty(0)
    dgate = q.new_empty(B, H, dtype=f32) if need_dgate else q.new_empty(0, dtype=f32)
    dshift = q.new_empty(B, H, D, dtype=f32) if need_dshift else q.new_empty(0, dtype=f32)
    return dq, dk, dv, dgate, dshift


def _setup(ctx, inputs, output):
    q, k, v, gate, shift, kpm, causal, scale, window, softcap, skip_zero, save_raw = inputs
    out, o_raw, lse = output
    ctx.save_for_backward(q, k, v, out, o_raw, lse, gate, shift, kpm)
    ctx.params = (causal, scale, window, softcap)
    ctx.mark_non_differentiable(o_raw, lse)


def _backward(ctx, dout, do_raw, dlse):
    q, k, v, out, o_raw, lse, gate, shift, kpm = ctx.saved_tensors
    causal, scale, window, softcap = ctx.params
    need_dq = ctx.needs_input_grad[0]
    need_dkdv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    need_dgate = gate is not None and ctx.needs_input_grad[3]
    need_dshift = shift is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dgate, dshift = torch.ops.xlkernels.steered_attention_bwd(
        dout, q, k, v, out, o_raw, lse, gate, shift, kpm, causal, scale, window, softcap, need_dq, need_dkdv,
        need_dgate, need_dshift)
    dq = dq if need_dq else None
    dk = dk if ctx.needs_input_grad[1] else None
    dv = dv if ctx.needs_input_grad[2] else None
    dgate = dgate.to(gate.dtype) if need_dgate else None
    dshift = dshift.to(shift.dtype) if need_dshift else None
    return dq, dk, dv, dgate, dshift, None, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup)


def _triton(q, k, v, gate, shift, causal, scale, key_padding_mask, sliding_window, softcap):
    B, H, T, D = q.shape
    if q.dtype not in _checks.FLOATS:
        raise TypeError(f"the triton backend needs q/k/v in float32, float16 or bfloat16, got {q.dtype}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    g = None if gate is None else gate.expand(B, H)
    sh = None if shift is None else shift.expand(B, H, D)
    grad = torch.is_grad_enabled()
    gate_grad = grad and gate is not None and gate.requires_grad
    any_grad = grad and any(x is not None and x.requires_grad for x in (q, k, v, gate, shift))
    # o_raw (pre gate/shift) is kept for the backward's rowsum(dO*O_raw) whenever the output is steered
    save_raw = any_grad and (gate is not None or shift is not None)
    out, _, _ = torch.ops.xlkernels.steered_attention_fwd(
        q, k, v, g, sh, key_padding_mask, causal, scale, sliding_window or 0, softcap or 0.0,
        gate is not None and not gate_grad, save_raw)
    return out
