"""NeuronIntervention: a dense per-neuron affine edit of FFN activations, act' = act * mul + add.

Used by `xlkernels.glu(..., intervention=iv)`, which applies it to act_fn(gate) before the product with `up`.
`mul`/`add` are float32 of shape (I,) (every row) or (G, I) (per group, selected by `group_ids`).

Per-group interventions and group id -1: rows whose id is -1 (padding / unlabelled) are left untouched
(mul = 1, add = 0). A per-neuron (I,) intervention applies to every row, -1 rows included.

Gradients: d act'/d act = mul, so zeroed and set neurons pass zero gradient to `gate`, scaled neurons pass the
gradient scaled by the factor. `mul`/`add` themselves are constants (no gradient).
"""
import torch


def _indices(indices, num_neurons: int) -> torch.Tensor:
    idx = torch.as_tensor(indices)
    if idx.dtype == torch.bool:
        if idx.shape != (num_neurons,):
            raise ValueError(f"indices as a bool mask must have shape ({num_neurons},), got {tuple(idx.shape)}")
        idx = idx.nonzero().flatten()
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"indices must be integer neuron ids, got {idx.dtype}")
    idx = idx.to(torch.int64).flatten()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_neurons):
        raise ValueError(f"indices must lie in [0, {num_neurons}), got range "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    return idx


def _check_num(num_neurons) -> int:
    if not isinstance(num_neurons, int) or num_neurons < 1:
        raise ValueError(f"num_neurons must be a positive int, got {num_neurons!r}")
    return num_neurons


def _per_index(x, k: int, name: str) -> torch.Tensor:
    """`x` as float32 of shape (K,) or (G, K); a scalar is broadcast to (K,)."""
    x = torch.as_tensor(x, dtype=torch.float32).cpu()
    if x.dim() == 0:
        x = x.expand(k)
    if x.shape[-1:] != (k,) or x.dim() > 2:
        raise ValueError(f"{name} must be a scalar or have shape ({k},) or (G, {k}), got {tuple(x.shape)}")
    return x


class NeuronIntervention:
    """act' = act * mul + add on FFN neurons; see the module docstring for group and gradient semantics."""

    __slots__ = ("mul", "add")

    def __init__(self, mul: torch.Tensor, add: "torch.Tensor | None" = None):
        if not isinstance(mul, torch.Tensor):
            raise TypeError(f"mul must be a torch.Tensor, got {type(mul).__name__}")
        if mul.dim() not in (1, 2):
            raise ValueError(f"mul must have shape (I,) or (G, I), got {tuple(mul.shape)}")
        if add is None:
            add = torch.zeros_like(mul, dtype=torch.float32)
        if not isinstance(add, torch.Tensor):
            raise TypeError(f"add must be a torch.Tensor, got {type(add).__name__}")
        if mul.shape != add.shape:
            raise ValueError(f"mul {tuple(mul.shape)} and add {tuple(add.shape)} must both be (I,) or (G, I)")
        if mul.device != add.device:
            raise ValueError(f"mul is on {mul.device} but add is on {add.device}")
        self.mul = mul.to(torch.float32).contiguous()
        self.add = add.to(torch.float32).contiguous()

    # ---- builders ---------------------------------------------------------------------------------
    @classmethod
    def identity(cls, num_neurons: int, num_groups: "int | None" = None, device="cpu") -> "NeuronIntervention":
        shape = (_check_num(num_neurons),) if num_groups is None else (num_groups, num_neurons)
        return cls(torch.ones(shape, device=device), torch.zeros(shape, device=device))

    @classmethod
    def zero(cls, indices, num_neurons: int, device="cpu") -> "NeuronIntervention":
        """Deactivate neurons (LAPE-style): act'[idx] = 0."""
        idx = _indices(indices, _check_num(num_neurons))
        mul = torch.ones(num_neurons)
        mul[idx] = 0.0
        return cls(mul.to(device), torch.zeros(num_neurons, device=device))

    @classmethod
    def set(cls, indices, values, num_neurons: int, device="cpu") -> "NeuronIntervention":
        """act'[idx] = values; values (K,) for every row or (G, K) per group (then a (G, I) intervention)."""
        idx = _indices(indices, _check_num(num_neurons))
        values = _per_index(values, idx.numel(), "values")
        lead = values.shape[:-1]
        mul = torch.ones(*lead, num_neurons)
        add = torch.zeros(*lead, num_neurons)
        mul[..., idx] = 0.0
        add[..., idx] = values
        return cls(mul.to(device), add.to(device))

    @classmethod
    def scale(cls, indices, factor, num_neurons: int, device="cpu") -> "NeuronIntervention":
        """act'[idx] = act[idx] * factor; factor scalar, (K,) or (G, K)."""
        idx = _indices(indices, _check_num(num_neurons))
        factor = _per_index(factor, idx.numel(), "factor")
        mul = torch.ones(*factor.shape[:-1], num_neurons)
        mul[..., idx] = factor
        return cls(mul.to(device), torch.zeros_like(mul, device=device))

    def then(self, other: "NeuronIntervention") -> "NeuronIntervention":
        """Apply self, then other: act*(m1*m2) + (a1*m2 + a2) (shapes broadcast (I,) with (G, I))."""
        if not isinstance(other, NeuronIntervention):
            raise TypeError(f"other must be NeuronIntervention, got {type(other).__name__}")
        if other.num_neurons != self.num_neurons:
            raise ValueError(f"other has {other.num_neurons} neurons, self has {self.num_neurons}")
        return NeuronIntervention(self.mul * other.mul, self.add * other.mul + other.add)

    # ---- properties -------------------------------------------------------------------------------
    @property
    def num_neurons(self) -> int:
        return self.mul.shape[-1]

    @property
    def num_groups(self) -> "int | None":
        """G for a per-group intervention, None for a per-neuron (I,) one."""
        return self.mul.shape[0] if self.mul.dim() == 2 else None

    @property
    def device(self) -> torch.device:
        return self.mul.device

    def to(self, device) -> "NeuronIntervention":
        return NeuronIntervention(self.mul.to(device), self.add.to(device))

    def apply(self, act: torch.Tensor, group_ids: "torch.Tensor | None" = None) -> torch.Tensor:
        """Reference application on act (..., I) (pure PyTorch, differentiable in act)."""
        mul, add = self.mul.to(act.device), self.add.to(act.device)
        if mul.dim() == 1:
            return act * mul.to(act.dtype) + add.to(act.dtype)
        if group_ids is None:
            raise ValueError("group_ids is required for a per-group (G, I) intervention")
        ids = group_ids.reshape(act.shape[:-1]).long()
        rows = ids.clamp_min(0)
        m = torch.where((ids >= 0).unsqueeze(-1), mul[rows], torch.ones((), device=act.device))
        a = torch.where((ids >= 0).unsqueeze(-1), add[rows], torch.zeros((), device=act.device))
        return act * m.to(act.dtype) + a.to(act.dtype)

    def __repr__(self) -> str:
        kind = "per-neuron" if self.mul.dim() == 1 else f"per-group G={self.mul.shape[0]}"
        touched = int(((self.mul != 1) | (self.add != 0)).any(0).sum()) if self.mul.dim() == 2 else \
            int(((self.mul != 1) | (self.add != 0)).sum())
        return f"NeuronIntervention({kind}, I={self.num_neurons}, touched={touched})"
