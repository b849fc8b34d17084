"""Pure-PyTorch GLU with neuron intervention: out = (act_fn(gate) * mul + add) * up. Differentiable."""
import math

import torch

ACTIVATIONS = ("silu", "gelu_tanh")


def act_fn(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return g * torch.sigmoid(g)
    if activation == "gelu_tanh":
        return 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g * g * g)))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def intervene(a: torch.Tensor, group_ids, mul, add) -> torch.Tensor:
    """a * mul + add; mul/add (I,) for every row, or (G, I) per group (rows with id -1 untouched)."""
    if mul is None:
        return a
    mul, add = mul.to(a.dtype), add.to(a.dtype)
    if mul.dim() == 1:
        return a * mul + add
    ids = group_ids.reshape(a.shape[:-1]).long()
    ok = (ids >= 0).unsqueeze(-1)
    rows = ids.clamp_min(0)
    m = torch.where(ok, mul[rows], torch.ones((), dtype=a.dtype, device=a.device))
    b = torch.where(ok, add[rows], torch.zeros((), dtype=a.dtype, device=a.device))
    return a * m + b


def glu(gate, up, activation="silu", group_ids=None, mul=None, add=None, compute_dtype=None):
    """Returns (out, act) with act = act_fn(gate) before the intervention.

    Computes in `compute_dtype` (default: float32 for half types, else the input dtype) and casts out
    back to gate.dtype; pass float64 inputs for a float64 ground truth.
    """
    cd = compute_dtype or (torch.float32 if gate.dtype in (torch.float16, torch.bfloat16) else gate.dtype)
    a = act_fn(gate.to(cd), activation)
    out = intervene(a, group_ids, mul, add) * up.to(cd)
    return out.to(gate.dtype), a
