"""The per-worker device state the hooks read: allocated once, when the model is loaded (before any warm-up,
compilation or CUDA-graph capture), and only ever written in place, so every captured kernel keeps reading
the right addresses.

- rows, groups (N,) int64, N >= every padded batch: per token, its plan-table row and statistics group;
  -1 = identity / not counted. Filled before each forward, outside any captured region.
- gate (L, R+1, Hl), shift (L, R+1, Hl, D): head steering per plan row; row R is the identity row.
- mul, add (L, R, Il): neuron interventions per plan row (act' = act * mul + add).
- stats: NeuronStats (L, G, Il) accumulators for G statistics groups.
R = max_plans, G = max_groups (config.py); either may be 0, which removes that part and its kernels.
"""
from __future__ import annotations

import numpy as np
import torch

from ..stats import FIELDS, NeuronStats


class State:
    def __init__(self, dims: dict, num_tokens: int, max_plans: int, max_groups: int, device, rank=0, world=1):
        L, H, D, I = dims["num_layers"], dims["num_heads"], dims["head_dim"], dims["num_neurons"]
        if H % world or I % world:
            raise ValueError(f"{H} heads / {I} neurons do not split over tensor-parallel size {world}")
        self.dims, self.rank, self.world = dict(dims), rank, world
        self.L, self.Hl, self.D, self.Il = L, H // world, D, I // world
        self.R, self.G, self.device = int(max_plans), int(max_groups), torch.device(device)
        kw = dict(device=self.device)
        self.rows = torch.full((num_tokens,), -1, dtype=torch.int64, **kw)
        self.groups = torch.full((num_tokens,), -1, dtype=torch.int64, **kw)
        self.gate = self.shift = self.mul = self.add = self.stats = None
        if self.R:
            self.gate = torch.ones(L, self.R + 1, self.Hl, **kw)
            self.shift = torch.zeros(L, self.R + 1, self.Hl, D, **kw)
            self.mul = torch.ones(L, self.R, self.Il, **kw)
            self.add = torch.zeros(L, self.R, self.Il, **kw)
        if self.G:
            self.stats = NeuronStats.empty(self.G, self.Il, device=self.device, layers=L)
        self.used = [False] * self.R
        self._staging = _Staging(num_tokens, self.device)

    # ------------------------------------------------------------------------------------- per step
    @property
    def capacity(self) -> int:
        return self.rows.numel()

    def identity(self) -> None:
        """Every token unsteered and uncounted (dummy, profiling and capture runs)."""
        self.rows.fill_(-1)
        self.groups.fill_(-1)

    def fill(self, tok_rows: np.ndarray, tok_groups: np.ndarray, padded: int) -> None:
        """Tokens [0, n) get tok_rows / tok_groups, tokens [n, padded) -1 (padding)."""
        n = len(tok_rows)
        if not n <= padded <= self.capacity:
            raise RuntimeError(f"xlkernels.vllm: a step of {n} tokens padded to {padded} does not fit the "
                               f"{self.capacity}-token buffers sized at load time")
        self._staging.upload(self.rows, tok_rows, padded)
        self._staging.upload(self.groups, tok_groups, padded)

    # ------------------------------------------------------------------------------------- plan rows
    def take_rows(self, k: int) -> list:
        free = [r for r in range(self.R) if not self.used[r]]
        if len(free) < k:
            raise ValueError(f"the plan needs {k} plan-table rows, {len(free)} of max_plans={self.R} are free "
                             f'(raise additional_config["xlkernels"]["max_plans"])')
        for r in free[:k]:
            self.used[r] = True
        return free[:k]

    def write_row(self, r: int, gate, shift, mul) -> None:
        """gate (L,Hl), shift (L,Hl,D), mul (L,Il): this rank's slices, copied in place."""
        self.gate[:, r].copy_(gate)
        self.shift[:, r].copy_(shift)
        self.mul[:, r].copy_(mul)
        self.add[:, r].zero_()

    def free_row(self, r: int) -> None:
        self.gate[:, r].fill_(1.0)
        self.shift[:, r].zero_()
        self.mul[:, r].fill_(1.0)
        self.add[:, r].zero_()
        self.used[r] = False

    # ------------------------------------------------------------------------------------- statistics
    def stats_reset(self) -> None:
        for f in FIELDS:
            t = getattr(self.stats, f)
            t.fill_(float("-inf")) if f == "max" else t.zero_()

    def stats_take(self, k: int) -> NeuronStats:
        """The first k groups' statistics on the CPU, then the accumulators reset."""
        out = NeuronStats(**{f: getattr(self.stats, f)[:, :k].to("cpu", copy=True) for f in FIELDS})
        self.stats_reset()
        return out

    def tensors(self) -> dict:
        """Every state tensor by name (their addresses must never change)."""
        out = {"rows": self.rows, "groups": self.groups}
        for name in ("gate", "shift", "mul", "add"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.stats is not None:
            out.update({f"stats.{f}": getattr(self.stats, f) for f in FIELDS})
        return out


class _Staging:
    """Host -> device copies of the per-token arrays. On CUDA: pinned host buffers used in turn, each reused
    only after its last copy finished (an event), so a copy never races the next step's host writes."""

    def __init__(self, n, device, ring=4):
        self.cuda = device.type == "cuda"
        self.bufs = [torch.empty(n, dtype=torch.int64, pin_memory=True) for _ in range(ring)] if self.cuda else []
        self.events = [None] * len(self.bufs)
        self.i = 0

    def upload(self, dst: torch.Tensor, values: np.ndarray, padded: int) -> None:
        n = len(values)
        src = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
        if not self.cuda:
            dst[:n].copy_(src)
            dst[n:padded].fill_(-1)
            return
        k = self.i = (self.i + 1) % len(self.bufs)
        if self.events[k] is not None:
            self.events[k].synchronize()
        host = self.bufs[k]
        host[:n].copy_(src)
        host[n:padded].fill_(-1)
        dst[:padded].copy_(host[:padded], non_blocking=True)
        self.events[k] = torch.cuda.Event()
        self.events[k].record()
