"""neuron_stats: per-group FFN neuron statistics in one pass over the activations.

Layers: torch.ops.xlkernels.neuron_stats_accum (C++: CPU in csrc/cpu/neuron_stats.cpp, CUDA in csrc/cuda/),
torch.ops.xlkernels.neuron_stats_accum_triton (xlkernels/triton/neuron_stats.py), the float64 reference
(xlkernels/reference/neuron_stats.py), then the public `neuron_stats`. All accumulate in place into a NeuronStats.
"""
import torch

from .. import _checks, backends
from ..reference import neuron_stats as ref
from ..stats import NeuronStats

backends.register_op("neuron_stats", ("cuda", "triton", "cpu", "reference"))

_MUT = ("tokens", "positive", "sum", "sum_sq", "max")

if hasattr(torch.ops.xlkernels, "neuron_stats_accum"):
    @torch.library.register_fake("xlkernels::neuron_stats_accum")
    def _accum_fake(act, group_ids, tokens, positive, sum, sum_sq, max):  # noqa: A002
        return None


@torch.library.custom_op("xlkernels::neuron_stats_accum_triton", mutates_args=_MUT)
def _accum_triton(act: torch.Tensor, group_ids: torch.Tensor, tokens: torch.Tensor, positive: torch.Tensor,
                  sum: torch.Tensor, sum_sq: torch.Tensor, max: torch.Tensor) -> None:  # noqa: A002
    from ..triton import neuron_stats as tri
    tri.accumulate(act, group_ids, tokens, positive, sum, sum_sq, max)


@_accum_triton.register_fake
def _(act, group_ids, tokens, positive, sum, sum_sq, max):  # noqa: A002
    return None


def check_stats(stats, num_groups: int, num_neurons: int, device: torch.device, name: str = "stats"):
    """Validate a NeuronStats passed for in-place accumulation into (G, I) = (num_groups, num_neurons)."""
    if not isinstance(stats, NeuronStats):
        raise TypeError(f"{name} must be a NeuronStats, got {type(stats).__name__}")
    stats.validate()
    if stats.sum.dim() != 2:
        raise ValueError(f"{name} must have shape (G, I) (use stats.layer(i) for stacked stats), "
                         f"got {tuple(stats.sum.shape)}")
    if stats.num_groups != num_groups:
        raise ValueError(f"{name} has {stats.num_groups} groups, expected num_groups={num_groups}")
    if stats.num_neurons != num_neurons:
        raise ValueError(f"{name} has {stats.num_neurons} neurons, the activations have {num_neurons}")
    if stats.device != device:
        raise ValueError(f"{name} is on {stats.device}, the activations on {device}")
    for f in _MUT:
        if not getattr(stats, f).is_contiguous():
            raise ValueError(f"{name}.{f} must be contiguous")
    return stats


def check_group_ids(group_ids, lead_shape, device, num_groups: "int | None", name: str = "group_ids") -> torch.Tensor:
    """Check group_ids match the activations' leading shape and lie in [-1, num_groups) (range not checked when
    num_groups is None: the ids are unused); returns flat int64."""
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(group_ids).__name__}")
    if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {group_ids.dtype}")
    if tuple(group_ids.shape) != tuple(lead_shape):
        raise ValueError(f"{name} must have shape {tuple(lead_shape)} (the activations' leading dims), "
                         f"got {tuple(group_ids.shape)}")
    _checks.same_device(name, group_ids, torch.empty(0, device=device), "act")
    ids = group_ids.reshape(-1).to(torch.int64).contiguous()
    if num_groups is not None and not torch.compiler.is_compiling():  # data-dependent (syncs on CUDA); under
        # torch.compile the kernels guard instead (the CPU kernels raise, CUDA/Triton skip out-of-range ids)
        _checks.ids_in_range(ids, name, num_groups)
    return ids


def accumulate(backend: str, act2, ids, stats: NeuronStats) -> None:
    """Run the chosen backend on checked, flattened inputs."""
    args = (act2, ids, stats.tokens, stats.positive, stats.sum, stats.sum_sq, stats.max)
    if backend in ("cpu", "cuda"):
        torch.ops.xlkernels.neuron_stats_accum(*args)
    elif backend == "triton":
        torch.ops.xlkernels.neuron_stats_accum_triton(*args)
    else:
        ref.accumulate(*args)


def neuron_stats(act: torch.Tensor, group_ids: torch.Tensor, num_groups: int, stats=None) -> NeuronStats:
    """Per-group statistics of FFN activations in one pass (see NeuronStats for fields, precision, NaN policy).

    act: (N, I) or (B, T, I) float32/float16/bfloat16 (any strides). group_ids: (N,) or (B, T) integer,
    values in [0, num_groups) or -1 (row skipped, e.g. padding). stats: a (G, I) NeuronStats to accumulate into
    in place (streaming); a new one is created when None. Returns the stats.
    """
    _checks.tensor(act, "act", ndim=(2, 3), dtypes=_checks.FLOATS)
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    n_neurons = act.shape[-1]
    if n_neurons < 1:
        raise ValueError(f"act must have at least one neuron (last dim), got shape {tuple(act.shape)}")
    ids = check_group_ids(group_ids, act.shape[:-1], act.device, num_groups)
    if stats is None:
        stats = NeuronStats.empty(num_groups, n_neurons, device=act.device)
    else:
        check_stats(stats, num_groups, n_neurons, act.device)
    act2 = act.reshape(-1, n_neurons).contiguous()
    accumulate(backends.select("neuron_stats", act.device), act2, ids, stats)
    return stats
