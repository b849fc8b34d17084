"""Matched random controls: the same intervention on random units, matched in count, per-layer layout and
norm, one draw per seed (>= SEEDS seeds for a row to hold). Where a control costs a model pass per item,
item i gets seed i mod S (round_robin): S draws at the price of one."""
from __future__ import annotations

import random

import torch

SEEDS = 10


def random_neurons(layers: dict, num_neurons: int, seed: int, exclude: dict | None = None) -> dict:
    """{layer: LongTensor}: as many neurons in each layer as `layers` has there, drawn from the neurons not
    in `exclude[layer]` (default: not in `layers[layer]`)."""
    rng = random.Random(seed)
    out = {}
    for l, idx in layers.items():
        k = len(idx)
        if k == 0:
            continue
        skip = set(int(i) for i in (exclude or layers).get(l, []))
        pool = [i for i in range(num_neurons) if i not in skip]
        if len(pool) < k:
            raise ValueError(f"layer {l}: {k} neurons asked, {len(pool)} outside the excluded set")
        out[l] = torch.tensor(sorted(rng.sample(pool, k)), dtype=torch.long)
    return out


def random_heads(heads, num_layers: int, num_heads: int, seed: int, exclude=()) -> list:
    """Flat head ids, one per head of `heads`, in the same layer, not in `exclude` nor `heads` (a layer with
    no free head draws from all free heads)."""
    rng = random.Random(seed)
    taken = set(int(h) for h in heads) | set(int(h) for h in exclude)
    out = []
    for h in heads:
        layer = int(h) // num_heads
        pool = [layer * num_heads + j for j in range(num_heads) if layer * num_heads + j not in taken]
        if not pool:
            pool = [i for i in range(num_layers * num_heads) if i not in taken]
        if not pool:
            raise ValueError("no head left to draw")
        pick = rng.choice(pool)
        taken.add(pick)
        out.append(pick)
    return out


def random_like(v: torch.Tensor, seed: int, dims: int = 1) -> torch.Tensor:
    """A Gaussian direction with the norm of `v` over its last `dims` dimensions (per head for (..., H, D),
    per layer for (L, D)); zero where v is zero."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(v.shape, generator=g, dtype=torch.float64)
    ax = tuple(range(-dims, 0))
    vn = v.double().norm(dim=ax, keepdim=True)
    rn = r.norm(dim=ax, keepdim=True).clamp_min(1e-30)
    return (r / rn * vn).to(v.dtype)


def round_robin(n: int, seeds: int) -> list:
    """[[item ids with i mod seeds == s] for s in range(seeds)]: which items each seed's draw is measured on."""
    if n < 0 or seeds < 1:
        raise ValueError(f"need n >= 0 and seeds >= 1, got n={n}, seeds={seeds}")
    return [list(range(s, n, seeds)) for s in range(seeds)]
