"""glu: act_fn(gate) * up with fused neuron stats and neuron intervention.

out = (act_fn(gate) * mul + add) * up, where mul/add come from a NeuronIntervention ((I,) or per group (G, I));
stats of the PRE-intervention act_fn(gate) accumulate into a NeuronStats for rows with group id >= 0.

Ops (all in the xlkernels namespace): C++ glu_fwd / glu_fwd_stats / glu_bwd (csrc/cpu/glu.cpp, csrc/cuda/glu*),
Triton glu_fwd_triton / glu_fwd_stats_triton / glu_bwd_triton (xlkernels/triton/glu.py); fake impls and
autograd are registered here. glu_fwd(_triton) is functional and gets torch.library.register_autograd;
the stats variants mutate the stats, which torch.library cannot give an autograd formula, so when a gradient is
needed they run inside a small autograd.Function whose backward is the same glu_bwd op.
"""
from typing import Optional

import torch

from .. import _checks, backends
from ..intervention import NeuronIntervention
from ..reference import glu as ref
from ..stats import NeuronStats
from . import _direct
from . import neuron_stats as ns

backends.register_op("glu", ("cuda", "triton", "cpu", "reference"))

ACTIVATIONS = ref.ACTIVATIONS
_MUT = ("tokens", "positive", "sum", "sum_sq", "max")
T = torch.Tensor
OT = Optional[torch.Tensor]


# ---- Triton ops -----------------------------------------------------------------------------------
@torch.library.custom_op("xlkernels::glu_fwd_triton", mutates_args=())
def _fwd_triton(gate: T, up: T, activation: str, group_ids: OT, mul: OT, add: OT) -> T:
    from ..triton import glu as tri
    return tri.forward(gate, up, activation, group_ids, mul, add, None)


@torch.library.custom_op("xlkernels::glu_fwd_stats_triton", mutates_args=_MUT)
def _fwd_stats_triton(gate: T, up: T, activation: str, group_ids: T, mul: OT, add: OT, tokens: T, positive: T,
                      sum: T, sum_sq: T, max: T) -> T:  # noqa: A002
    from ..triton import glu as tri
    return tri.forward(gate, up, activation, group_ids, mul, add, (tokens, positive, sum, sum_sq, max))


@torch.library.custom_op("xlkernels::glu_bwd_triton", mutates_args=())
def _bwd_triton(grad_out: T, gate: T, up: T, activation: str, group_ids: OT, mul: OT, add: OT) -> tuple[T, T]:
    from ..triton import glu as tri
    return tri.backward(grad_out, gate, up, activation, group_ids, mul, add)


# ---- fake impls + autograd for both compiled and Triton ops ----------------------------------------
def _fake_fwd(gate, up, activation, group_ids, mul, add, *stats):
    return torch.empty_like(gate)


def _fake_bwd(grad_out, gate, up, activation, group_ids, mul, add):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup(ctx, inputs, output):
    gate, up, activation, group_ids, mul, add = inputs[:6]
    ctx.activation = activation
    ctx.save_for_backward(gate, up, group_ids, mul, add)


def _make_backward(bwd_name):
    def backward(ctx, grad):
        gate, up, group_ids, mul, add = ctx.saved_tensors
        bwd = getattr(torch.ops.xlkernels, bwd_name)
        gg, gu = bwd(grad.contiguous(), gate, up, ctx.activation, group_ids, mul, add)
        return gg, gu, None, None, None, None
    return backward


_OPS = {"triton": ("glu_fwd_triton", "glu_fwd_stats_triton", "glu_bwd_triton")}
if hasattr(torch.ops.xlkernels, "glu_fwd"):
    _OPS["cpu"] = _OPS["cuda"] = ("glu_fwd", "glu_fwd_stats", "glu_bwd")

for _fwd, _fwd_stats, _bwd in {v for v in _OPS.values()}:
    if not _fwd.endswith("_triton"):
        torch.library.register_fake(f"xlkernels::{_fwd}")(_fake_fwd)
        torch.library.register_fake(f"xlkernels::{_fwd_stats}")(_fake_fwd)
        torch.library.register_fake(f"xlkernels::{_bwd}")(_fake_bwd)
    else:
        _fwd_triton.register_fake(_fake_fwd)
        _fwd_stats_triton.register_fake(_fake_fwd)
        _bwd_triton.register_fake(_fake_bwd)
    torch.library.register_autograd(f"xlkernels::{_fwd}", _make_backward(_bwd), setup_context=_setup)


class _GluStats(torch.autograd.Function):
    """Differentiable wrapper of a stats-accumulating forward op (mutating ops get no register_autograd)."""

    @staticmethod
    def forward(ctx, gate, up, activation, group_ids, mul, add, names, stats_t):
        ctx.activation, ctx.bwd = activation, names[2]
        ctx.save_for_backward(gate, up, group_ids, mul, add)
        return getattr(torch.ops.xlkernels, names[1])(gate, up, activation, group_ids, mul, add, *stats_t)

    @staticmethod
    def backward(ctx, grad):
        gate, up, group_ids, mul, add = ctx.saved_tensors
        gg, gu = getattr(torch.ops.xlkernels, ctx.bwd)(grad.contiguous(), gate, up, ctx.activation,
                                                        group_ids, mul, add)
        return gg, gu, None, None, None, None, None, None


def _reference(gate, up, activation, ids, mul, add, stats):
    out, a = ref.glu(gate, up, activation, ids, mul, add)
    if stats is not None:
        with torch.no_grad():
            from ..reference.neuron_stats import accumulate
            accumulate(a.detach(), ids, stats.tokens, stats.positive, stats.sum, stats.sum_sq, stats.max)
    return out


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu", *, stats: "NeuronStats | None" = None,
        group_ids: "torch.Tensor | None" = None, intervention: "NeuronIntervention | None" = None) -> torch.Tensor:
    """act_fn(gate) * up, optionally recording neuron stats and applying a neuron intervention in the same pass.

    gate, up: (..., I) float32/float16/bfloat16, same shape/dtype/device. activation: "silu" or "gelu_tanh".
    stats: a (G, I) NeuronStats; the PRE-intervention act_fn(gate) of rows with group_ids >= 0 is accumulated
    into it in place (requires group_ids). group_ids: gate.shape[:-1] integer ids in [-1, G).
    intervention: NeuronIntervention; act' = act * mul + add. A per-group (G, I) one needs group_ids and leaves
    rows with id -1 untouched; a per-neuron (I,) one applies to every row.
    Differentiable in gate and up: zeroed/set neurons pass zero gradient to gate, scaled ones scale it.
    """
    _checks.tensor(gate, "gate", dtypes=_checks.FLOATS)
    _checks.tensor(up, "up", dtypes=_checks.FLOATS)
    if gate.dim() < 1 or gate.shape[-1] < 1:
        raise ValueError(f"gate must have shape (..., I) with I >= 1, got {tuple(gate.shape)}")
    if up.shape != gate.shape:
        raise ValueError(f"up must have the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"up must have the dtype of gate ({gate.dtype}), got {up.dtype}")
    _checks.same_device("up", up, gate, "gate")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    n_neurons = gate.shape[-1]
    num_groups = None
    if stats is not None:
        if not isinstance(stats, NeuronStats):
            raise TypeError(f"stats must be a NeuronStats, got {type(stats).__name__}")
        num_groups = stats.num_groups
        ns.check_stats(stats, num_groups, n_neurons, gate.device)
        if group_ids is None:
            raise ValueError("group_ids is required when stats is given")
    mul = add = None
    if intervention is not None:
        if not isinstance(intervention, NeuronIntervention):
            raise TypeError(f"intervention must be a NeuronIntervention, got {type(intervention).__name__}")
        if intervention.num_neurons != n_neurons:
            raise ValueError(f"intervention has {intervention.num_neurons} neurons, gate has {n_neurons}")
        if intervention.device != gate.device:
            raise ValueError(f"intervention is on {intervention.device}, gate on {gate.device}")
        mul, add = intervention.mul, intervention.add
        if intervention.num_groups is not None:
            if group_ids is None:
                raise ValueError("group_ids is required for a per-group intervention")
            if num_groups is not None and intervention.num_groups != num_groups:
                raise ValueError(f"intervention has {intervention.num_groups} groups, stats has {num_groups}")
            num_groups = intervention.num_groups
    ids = None
    if group_ids is not None:
        ids = ns.check_group_ids(group_ids, gate.shape[:-1], gate.device, num_groups)
        if num_groups is None:
            ids = None  # neither stats nor a per-group intervention: the kernel does not need them
    return glu_checked(gate, up, activation, ids, mul, add, stats)


def glu_checked(gate, up, activation: str, ids, mul, add, stats) -> torch.Tensor:
    """glu on arguments already checked: ids flat int64 (None unless stats or a per-group mul/add need them),
    mul/add from a NeuronIntervention, stats a (G, I) NeuronStats. The patched HF MLPs call this (their
    arguments are checked once per record_neurons / set_neuron_intervention, not per layer)."""
    backend = backends.select("glu", gate.device)
    shape, n_neurons = gate.shape, gate.shape[-1]
    g2, u2 = gate.reshape(-1, n_neurons).contiguous(), up.reshape(-1, n_neurons).contiguous()
    if backend == "reference":
        return _reference(g2, u2, activation, ids, mul, add, stats).reshape(shape)
    names = _OPS[backend]
    if stats is None:
        out = _direct.call(getattr(torch.ops.xlkernels, names[0]), (g2, u2, activation, ids, mul, add), (g2, u2))
    else:
        st = (stats.tokens, stats.positive, stats.sum, stats.sum_sq, stats.max)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            out = _GluStats.apply(g2, u2, activation, ids, mul, add, names, st)
        else:
            out = getattr(torch.ops.xlkernels, names[1])(g2, u2, activation, ids, mul, add, *st)
    return out.reshape(shape)
