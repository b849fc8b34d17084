"""head_steer: the per-head epilogue of attention, out = gate[b,h] * o[b,t,h,:] + shift[b,h,:].

o (B,T,H,D) float32/float16/bfloat16 (last dim contiguous; other strides free, e.g. a transposed view of
(B,H,T,D)); gate None | (H,) | (B,H); shift None | (H,D) | (B,H,D), any float dtype (float64 too; read as float32). Math in float32, output in
o's dtype, contiguous (B,T,H,D). Where gate == 0 the output is exactly shift (a select, not a multiply), so
whatever o holds at skipped heads (even NaN) is ignored. Gradients: grad_o = gate*dO (0 where gate == 0),
grad_gate[b,h] = sum_{t,d} dO*o (non-finite o at gate == 0 counts as 0), grad_shift[b,h,:] = sum_t dO, each
summed over B when gate/shift had no batch dim. CUDA grads of gate/shift use fp32 atomics (not bitwise
deterministic across runs).

Ops: xlkernels::head_steer and xlkernels::head_steer_backward (C++: csrc/cpu/head_steer.cpp,
csrc/cuda/head_steer*), xlkernels::head_steer_triton / head_steer_backward_triton (xlkernels/triton/head_steer.py,
a fallback for CUDA tensors when the extension has no CUDA kernels); fake impls and autograd are registered here.
"""
import warnings
from typing import Optional

import torch

from .. import _checks, backends
from ..reference import head_steer as ref
from . import _direct

backends.register_op("head_steer", ("cuda", "triton", "cpu", "reference"))

HAS_COMPILED = hasattr(torch.ops.xlkernels, "head_steer")
T = torch.Tensor
OT = Optional[torch.Tensor]


# ---- Triton ops (xlkernels/triton/head_steer.py) --------------------------------------------------------
@torch.library.custom_op("xlkernels::head_steer_triton", mutates_args=())
def _fwd_triton(o: T, gate: OT, shift: OT) -> T:
    from ..triton import head_steer as tri
    check_args(o, gate, shift)
    return tri.forward(o if o.shape[-1] <= 1 or o.stride(-1) == 1 else o.contiguous(), gate, shift)


@torch.library.custom_op("xlkernels::head_steer_backward_triton", mutates_args=())
def _bwd_triton(grad_out: T, o: T, gate: OT, shift: OT, need_o: bool, need_gate: bool,
                need_shift: bool) -> tuple[T, T, T]:
    from ..triton import head_steer as tri
    o = o if o.shape[-1] <= 1 or o.stride(-1) == 1 else o.contiguous()
    return tri.backward(grad_out, o, gate, shift, need_o, need_gate, need_shift)


def _fake(o, gate, shift):
    return o.new_empty(o.shape)


def _fake_backward(grad_out, o, gate, shift, need_o, need_gate, need_shift):
    f32 = dict(dtype=torch.float32)
    go = o.new_empty(o.shape) if need_o else o.new_empty((0,))
    gg = gate.new_empty(gate.shape) if need_gate and gate is not None else o.new_empty((0,), **f32)
    gs = shift.new_empty(shift.shape) if need_shift and shift is not None else o.new_empty((0,), **f32)
    return go, gg, gs


def _setup(ctx, inputs, output):
    o, gate, shift = inputs
    need_o, need_gate, need_shift = ctx.needs_input_grad[:3]
    ctx.need = (need_o, need_gate and gate is not None, need_shift and shift is not None)
    # o is only read for grad_gate (grad_out stands in for it otherwise: same shape and dtype); shift only
    # gives its shape and dtype (no copy: it is the caller's tensor).
    ctx.save_for_backward(o if ctx.need[1] else None, gate if ctx.need[0] or ctx.need[1] else None,
                          shift if ctx.need[2] else None)


def _make_backward(bwd_op):
    def _backward(ctx, grad):
        o, gate, shift = ctx.saved_tensors
        need_o, need_gate, need_shift = ctx.need
        go, gg, gs = bwd_op(grad, o if o is not None else grad, gate, shift, need_o, need_gate, need_shift)
        return go if need_o else None, gg if need_gate else None, gs if need_shift else None
    return _backward


_fwd_triton.register_fake(_fake)
_bwd_triton.register_fake(_fake_backward)
torch.library.register_autograd("xlkernels::head_steer_triton", _make_backward(_bwd_triton), setup_context=_setup)
if HAS_COMPILED:
    torch.library.register_fake("xlkernels::head_steer")(_fake)
    torch.library.register_fake("xlkernels::head_steer_backward")(_fake_backward)
    torch.library.register_autograd("xlkernels::head_steer", _make_backward(torch.ops.xlkernels.head_steer_backward),
                                    setup_context=_setup)


PARAM_DTYPES = _checks.FLOATS + (torch.float64,)


def check_args(o, gate, shift):
    _checks.tensor(o, "o", ndim=4, dtypes=_checks.FLOATS)
    B, T, H, D = o.shape
    if gate is not None:
        _checks.tensor(gate, "gate", dtypes=PARAM_DTYPES)
        _checks.same_device("gate", gate, o, "o")
        if tuple(gate.shape) not in ((H,), (B, H)):
            raise ValueError(f"gate must have shape (H,) = ({H},) or (B, H) = ({B}, {H}), got {tuple(gate.shape)}")
    if shift is not None:
        _checks.tensor(shift, "shift", dtypes=PARAM_DTYPES)
        _checks.same_device("shift", shift, o, "o")
        if tuple(shift.shape) not in ((H, D), (B, H, D)):
            raise ValueError(f"shift must have shape (H, D) = ({H}, {D}) or (B, H, D) = ({B}, {H}, {D}), "
                             f"got {tuple(shift.shape)}")


_warned = False


def head_steer(o: torch.Tensor, gate: "torch.Tensor | None" = None, shift: "torch.Tensor | None" = None) -> torch.Tensor:
    """gate[b,h] * o[b,t,h,:] + shift[b,h,:] for o (B,T,H,D); exactly shift where gate == 0. See module doc."""
    global _warned
    check_args(o, gate, shift)
    if o.shape[-1] > 1 and o.stride(-1) != 1:
        o = o.contiguous()
    backend = backends.select("head_steer", o.device)
    if backend in ("cpu", "cuda") and not HAS_COMPILED:
        if not _warned:
            warnings.warn("xlkernels._C lacks head_steer (stale build; run scripts/rebuild.sh): using the reference")
            _warned = True
        backend = "reference"
    if backend == "reference":
        return ref.head_steer(o, gate, shift)
    if backend == "triton":
        return _fwd_triton(o, gate, shift)
    return _direct.call(torch.ops.xlkernels.head_steer, (o, gate, shift), (o, gate, shift))
