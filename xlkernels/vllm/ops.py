"""The hook ops, graph-safe by construction.

Each body below launches the same kernels on the same addresses at every step: it reads the per-token rows
and groups and the plan tables from the state (state.py), takes the layer index as an argument, and has no
Python branch on data, no .item(), no nonzero or boolean indexing, no host sync and no new persistent buffer.
Which kernels run depends only on the engine's settings (plans / statistics on or off), fixed at load time.
So a body may run once (CUDA-graph capture, trace-once compilation) and be replayed: the replays read what the
step filled in before it. tests/test_vllm_graph.py compiles the bodies with torch.compile(fullgraph=True).

- `mlp`: act(gate) * up of a (T, 2I) gate_up row block (vLLM's SiluAndMul / GeluAndMul tanh) with this step's
  neuron statistics (PRE-intervention activations, rows of group -1 skipped) and neuron interventions (plan
  row -1 = identity), through xlkernels' fused GLU kernels.
- `heads`: in place on an attention output (T, Hl, D): out = gate * out + shift per token's plan row, through
  xlkernels' head_steer kernel; the identity row is the tables' last.
"""
from __future__ import annotations

import torch

from .. import backends

GLU_OPS = {"cpu": ("glu_fwd", "glu_fwd_stats"), "cuda": ("glu_fwd", "glu_fwd_stats"),
           "triton": ("glu_fwd_triton", "glu_fwd_stats_triton")}
STEER_OPS = {"cpu": "head_steer", "cuda": "head_steer", "triton": "head_steer_triton"}


def kernels(device) -> dict:
    """The raw xlkernels ops the bodies call on `device` (chosen once, by backends.select)."""
    from ..ops import glu as _glu, head_steer as _hs  # noqa: F401 (registers the Triton ops)
    g, h = backends.select("glu", device), backends.select("head_steer", device)
    if g not in GLU_OPS or h not in STEER_OPS:
        raise RuntimeError(f"xlkernels.vllm needs a compiled or Triton glu/head_steer on {device}, "
                           f"backends.select gave {g!r} / {h!r}")
    ops = torch.ops.xlkernels
    return {"fwd": getattr(ops, GLU_OPS[g][0]), "fwd_stats": getattr(ops, GLU_OPS[g][1]),
            "steer": getattr(ops, STEER_OPS[h])}


def mlp(x, layer: int, activation: str, rows, groups, mul, add, stats, fwd, fwd_stats):
    """x (T, 2I): gate then up. rows/groups (N >= T,): plan row / statistics group per token. mul/add
    (L, R, I) or None (steering off); stats: the five (L, G, I) accumulators or None (statistics off)."""
    t, i = x.shape[0], x.shape[-1] // 2
    gate, up = x[:, :i].contiguous(), x[:, i:].contiguous()
    out = None
    if stats is not None:
        out = fwd_stats(gate, up, activation, groups[:t], None, None, *[s[layer] for s in stats])
    if mul is not None:
        out = fwd(gate, up, activation, rows[:t], mul[layer], add[layer])
    if out is None:
        out = fwd(gate, up, activation, None, None, None)
    return out


def heads(output, layer: int, rows, gate, shift, steer) -> None:
    """output (T, Hl, D) contiguous, in place. gate (L, R+1, Hl), shift (L, R+1, Hl, D); row R = identity."""
    t, hl, d = output.shape[0], gate.shape[-1], shift.shape[-1]
    r = rows[:t]
    idx = torch.where(r >= 0, r, gate.shape[1] - 1)
    g = gate[layer].index_select(0, idx)
    s = shift[layer].index_select(0, idx)
    output.copy_(steer(output.view(t, 1, hl, d), g, s).view(output.shape))


# ---------------------------------------------------------------------------------------------- the MLP op
STATE = None   # the worker's state.State with .kernels, set by setup.py (one engine per worker process)
SEEN = set()   # ("mlp" | "heads", layer) pairs whose hook ran: the install check after warm-up


@torch.library.custom_op("xlkernels_vllm::act_and_mul", mutates_args=())
def act_and_mul(x: torch.Tensor, layer: int, activation: str) -> torch.Tensor:
    """`mlp` on the worker's state (opaque to torch.compile: one node, its body run or captured as is)."""
    s = STATE
    SEEN.add(("mlp", layer))
    stats = None if s.stats is None else [getattr(s.stats, f) for f in ("tokens", "positive", "sum", "sum_sq",
                                                                       "max")]
    k = s.kernels
    return mlp(x, layer, activation, s.rows, s.groups, s.mul, s.add, stats, k["fwd"], k["fwd_stats"])


@act_and_mul.register_fake
def _(x, layer, activation):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def steer_heads(output, layer: int) -> None:
    s = STATE
    SEEN.add(("heads", layer))
    if s.gate is not None:
        heads(output, layer, s.rows, s.gate, s.shift, s.kernels["steer"])
